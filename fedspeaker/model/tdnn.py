"""A compact TDNN speaker-embedding network that Opacus can train.

GroupNorm instead of BatchNorm (per-sample gradients need layers that do not mix
samples), mean+std statistics pooling, an embedding layer used for verification,
and a classification head over the training speakers used for identification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedspeaker.model.backend import attach_backend


def _tdnn_block(c_in: int, c_out: int, kernel: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2),
        nn.GroupNorm(8, c_out),
        nn.ReLU(),
    )


class SpeakerNet(nn.Module):
    """TDNN over (batch, n_mels, frames) features. Trains on random ``crop_frames``-frame
    crops; scores the centre of an utterance, up to four crops long."""

    # DP-SGD keeps Opacus's hooks: its convolutions have no norm sampler, so ghost clipping
    # would materialise their per-sample gradients all the same, and add a backward pass
    ghost_clipping = False

    def __init__(self, n_mels: int, n_speakers: int, channels: int = 128, embedding_dim: int = 128,
                 crop_frames: int = 200):
        super().__init__()
        self.input_channels = n_mels
        self.train_frames = crop_frames
        self.eval_frames = 4 * crop_frames
        self.frames = nn.Sequential(
            _tdnn_block(n_mels, channels, 5, 1),
            _tdnn_block(channels, channels, 3, 2),
            _tdnn_block(channels, channels, 3, 3),
            _tdnn_block(channels, channels, 1, 1),
        )
        self.embedding = nn.Linear(2 * channels, embedding_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(embedding_dim, n_speakers))
        attach_backend(self, embedding_dim)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """The scoring embedding: :meth:`raw_embed` through the back end (if installed)."""
        return self.backend(self.raw_embed(feats))

    def raw_embed(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, embedding_dim), before the back end."""
        h = self.frames(feats)
        stats = torch.cat([h.mean(dim=2), (h.var(dim=2, unbiased=False) + 1e-5).sqrt()], dim=1)
        return self.embedding(stats)

    @property
    def embedding_dim(self) -> int:
        return self.embedding.out_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.raw_embed(feats))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction=reduction)
