"""GE2E fine-tuned at the top (:class:`GE2ESpeakerNet`).

The pretrained encoder's LSTM stays frozen, so its final state for every partial window
is computed once per file and cached like the features (data/ge2e.py); local epochs run
only the projection, which is what trains and travels, and a cosine classifier over the
training speakers trained with an additive angular margin (AAM-softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedspeaker.data.ge2e import EMBEDDING_SIZE, HIDDEN_SIZE, frozen_encoder
from fedspeaker.model.backend import attach_backend

POSITIVE_COSINE = 0.9  # FedAwS's positive margin (Yu et al. 2020, "Federated learning with only positive labels")


class CosineHead(nn.Module):
    """Scaled cosine of the embedding with one learned vector per training speaker."""

    def __init__(self, dim: int, n_speakers: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_speakers, dim) / math.sqrt(dim))
        self.scale = scale

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(embeddings, dim=-1), F.normalize(self.weight, dim=-1))


class GE2ESpeakerNet(nn.Module):
    """What fine-tuning trains on top of the frozen LSTM: GE2E's projection (256->256,
    ReLU, L2) applied to each window's state and averaged over the windows, and a cosine
    head over the training speakers for identification and the margin loss.

    Inputs are :func:`~fedspeaker.data.ge2e.frozen_states`: (batch, 256, windows). A
    training crop is one window (``train_frames``); scoring averages every window of the
    utterance (``eval_frames``), as resemblyzer's ``embed_utterance`` does.
    """

    input_channels = HIDDEN_SIZE
    train_frames = 1
    eval_frames = 10_000
    # DP-SGD clips with Opacus's ghost clipping: a batch's per-sample gradients of the
    # projection are 64 copies of its 65k weights, their norms (Opacus's Linear norm
    # sampler, the head's in privacy.grad_samplers) a few numbers a sample
    ghost_clipping = True

    def __init__(self, n_speakers: int, *, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        self.projection = nn.Linear(HIDDEN_SIZE, EMBEDDING_SIZE)
        self.head = CosineHead(EMBEDDING_SIZE, n_speakers, scale)
        self.margin = margin
        attach_backend(self, EMBEDDING_SIZE)

    @classmethod
    def pretrained(cls, n_speakers: int, *, margin: float = 0.2, scale: float = 30.0) -> "GE2ESpeakerNet":
        """The projection as pretrained; the head new (seed it with torch's RNG)."""
        model = cls(n_speakers, margin=margin, scale=scale)
        linear = frozen_encoder().linear
        model.projection.load_state_dict(linear.state_dict())
        return model

    @property
    def embedding_dim(self) -> int:
        return EMBEDDING_SIZE

    def raw_embed(self, states: Tensor) -> Tensor:
        """(batch, 256, windows) -> unit-length (batch, 256), before the back end: what
        the head trains on and what devices sum for the back end."""
        windows = F.normalize(torch.relu(self.projection(states.transpose(1, 2))), dim=-1)
        return F.normalize(windows.mean(dim=1), dim=-1)

    def embed(self, states: Tensor) -> Tensor:
        """The scoring embedding: :meth:`raw_embed` through the back end (if installed)."""
        return self.backend(self.raw_embed(states))

    def forward(self, states: Tensor) -> Tensor:
        return self.head(self.raw_embed(states))

    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """AAM-softmax: the target's angle widened by ``margin`` before the softmax.
        ``reduction="none"``: per sample, as ghost clipping asks."""
        return aam_softmax(logits / self.head.scale, labels, margin=self.margin, scale=self.head.scale,
                           reduction=reduction)

    def positive_loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """FedAwS's loss for a device that holds only its own speakers' class vectors: pull
        each embedding to its speaker's vector until their cosine reaches POSITIVE_COSINE;
        no negatives (the server's spreadout keeps the vectors apart). Times the head's
        scale, so that its gradients are of the size AAM-softmax's are."""
        target = (logits / self.head.scale).gather(1, labels[:, None])[:, 0]
        per_sample = self.head.scale * torch.relu(POSITIVE_COSINE - target).square()
        return per_sample if reduction == "none" else per_sample.mean()


def aam_softmax(cosines: Tensor, labels: Tensor, *, margin: float, scale: float,
                reduction: str = "mean") -> Tensor:
    """Additive angular margin softmax (ArcFace): cross-entropy of scale * cos(theta + m)
    for the true speaker, scale * cos(theta) for the others. Past theta = pi - m, where
    cos(theta + m) would turn back up, it continues as cos(theta) - m * sin(m)."""
    cosines = cosines.clamp(-1 + 1e-7, 1 - 1e-7)
    target = cosines.gather(1, labels[:, None])
    widened = target * math.cos(margin) - (1 - target.square()).sqrt() * math.sin(margin)
    widened = torch.where(target > math.cos(math.pi - margin), widened, target - margin * math.sin(margin))
    return F.cross_entropy(scale * cosines.scatter(1, labels[:, None], widened), labels, reduction=reduction)
