"""The training loop shared by clients and `central`: random crops, epochs, steps."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


def fit_length(feats: torch.Tensor, frames: int, start: int | None = None) -> torch.Tensor:
    """Crop (at ``start``, or centred) or repeat-pad (n_mels, T) to exactly ``frames``."""
    length = feats.shape[1]
    if length < frames:
        feats = feats.repeat(1, math.ceil(frames / length))
        length = feats.shape[1]
    if start is None:
        start = (length - frames) // 2
    return feats[:, start : start + frames]


class CropDataset(Dataset):
    """Random fixed-length crops: augmentation and equal-size batches in one."""

    def __init__(self, feats: Sequence[torch.Tensor], labels: Sequence[int], frames: int):
        self.feats, self.labels, self.frames = feats, labels, frames

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f = self.feats[i]
        start = int(torch.randint(0, max(1, f.shape[1] - self.frames + 1), ()))
        return fit_length(f, self.frames, start), self.labels[i]


def make_loader(feats: Sequence[torch.Tensor], labels: Sequence[int], frames: int, batch_size: int,
                seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(CropDataset(feats, labels, frames), batch_size=min(batch_size, len(feats)),
                      shuffle=True, generator=generator)


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 after_step: Callable[[], None] | None = None, max_steps: int | None = None) -> float:
    """Run ``epochs`` passes (or ``max_steps`` steps); return the mean training loss.

    ``loss_fn(logits, labels)`` is the model's own loss (cross-entropy, or GE2E's margin
    loss); ``after_step`` runs after each optimizer step (FedProx's proximal pull).
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
            optimizer.step()
            if after_step:
                after_step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)
