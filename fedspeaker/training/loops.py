"""The training loop shared by clients and `central`: random crops, epochs, steps; and,
for speaker-level DP-SGD, batches of speakers rather than of utterances."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedspeaker.data.features import fit_length


class CropDataset(Dataset):
    """Random fixed-length crops: augmentation and equal-size batches in one.

    An utterance given as (copies, channels, frames), its clean features and augmented
    copies (data/augment.py), is still one item: each draw takes one copy at random,
    then a crop of it, so a DP-SGD sample stays one recording however many copies it has.
    """

    def __init__(self, feats: Sequence[torch.Tensor], labels: Sequence[int], frames: int):
        self.feats, self.labels, self.frames = feats, labels, frames

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f = self.feats[i]
        if f.dim() == 3:  # one of the recording's copies
            f = f[int(torch.randint(0, f.shape[0], ()))]
        start = int(torch.randint(0, max(1, f.shape[1] - self.frames + 1), ()))
        return fit_length(f, self.frames, start), self.labels[i]


class SpeakerDataset(Dataset):
    """One item per speaker: ``windows`` random crops of that speaker's utterances (each an
    utterance drawn uniformly, then a random crop of it), stacked (windows, channels, frames).

    Under dp-unit=speaker one Opacus sample is one of these, so a speaker is clipped as a
    whole however many utterances it has, and a step's Poisson sampling draws speakers.
    """

    def __init__(self, feats: Sequence[torch.Tensor], labels: Sequence[int], frames: int, windows: int):
        self.crops = CropDataset(feats, labels, frames)
        self.speakers = sorted(set(labels))
        self.utterances = {s: [i for i, label in enumerate(labels) if label == s] for s in self.speakers}
        self.windows = windows

    def __len__(self) -> int:
        return len(self.speakers)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        mine = self.utterances[self.speakers[j]]
        picks = torch.randint(0, len(mine), (self.windows,))
        return torch.stack([self.crops[mine[int(p)]][0] for p in picks]), self.speakers[j]


def windows_per_speaker(n_speakers: int, batch_size: int) -> int:
    """Windows each speaker brings to a step: about ``batch_size`` windows a step in all, as
    a step of utterance-level DP-SGD has (per-window gradients are held before they are
    folded per speaker, so this bounds the memory a step takes)."""
    return max(1, batch_size // max(1, min(batch_size, n_speakers)))


def make_loader(feats: Sequence[torch.Tensor], labels: Sequence[int], frames: int, batch_size: int,
                seed: int, *, windows: int = 0) -> DataLoader:
    """Batches of utterance crops, or with ``windows`` > 0 batches of speakers (SpeakerDataset)."""
    generator = torch.Generator().manual_seed(seed)
    data = SpeakerDataset(feats, labels, frames, windows) if windows else CropDataset(feats, labels, frames)
    return DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, generator=generator)


class PerSpeaker(nn.Module):
    """Runs ``model`` on a batch of speakers (speakers, windows, channels, frames) as one
    batch of windows, speaker by speaker: the logits of speaker b's windows are rows
    b*windows .. (b+1)*windows - 1. ``per_speaker_loss`` averages the loss over each
    speaker's windows; ``fold_per_speaker`` turns Opacus's per-window gradients into
    per-speaker ones before they are clipped."""

    def __init__(self, model: nn.Module, windows: int) -> None:
        super().__init__()
        self.model, self.windows = model, windows

    def forward(self, speakers: torch.Tensor) -> torch.Tensor:
        return self.model(speakers.flatten(0, 1))


def per_speaker_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], windows: int
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn`` over every window, each labelled with its speaker: with equal windows per
    speaker, the mean over the batch is the mean of each speaker's mean loss."""
    return lambda logits, labels: loss_fn(logits, labels.repeat_interleave(windows))


def fold_per_speaker(params: Sequence[nn.Parameter], windows: int) -> Callable[[], None]:
    """After backward, before the DP optimizer clips: each parameter's per-window gradients
    (Opacus's ``grad_sample``, one row per window, speaker by speaker) become one row per
    speaker, the mean over its windows: the gradient of that speaker's mean loss. Opacus
    then clips each speaker's row to the clipping norm, so a speaker moves a step by at
    most that norm, whatever number of utterances it has."""

    @torch.no_grad()
    def fold() -> None:
        for p in params:
            sample = getattr(p, "grad_sample", None)
            if isinstance(sample, torch.Tensor):
                p.grad_sample = sample.reshape(-1, windows, *sample.shape[1:]).mean(dim=1)

    return fold


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 after_step: Callable[[], None] | None = None, max_steps: int | None = None,
                 after_backward: Callable[[], None] | None = None) -> float:
    """Run ``epochs`` passes (or ``max_steps`` steps); return the mean training loss.

    ``loss_fn(logits, labels)`` is the model's own loss (cross-entropy, or GE2E's margin
    loss); ``after_backward`` runs between backward and the optimizer step (per-speaker
    gradients), ``after_step`` after each optimizer step (FedProx's proximal pull).
    """
    model.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            if max_steps is not None and steps >= max_steps:
                return total / max(count, 1)
            steps += 1
            optimizer.zero_grad()
            logits = model(x)
            # Poisson sampling can draw an empty batch: still a (noise-only) DP step,
            # taken and accounted like any other
            loss = loss_fn(logits, y) if len(y) else logits.sum()
            loss.backward()
            if after_backward:
                after_backward()
            optimizer.step()
            if after_step:
                after_step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)
