"""A compact TDNN speaker-embedding network that Opacus can train.

GroupNorm instead of BatchNorm (per-sample gradients need layers that do not mix
samples), mean+std statistics pooling, an embedding layer used for verification,
and a classification head over the training speakers used for identification.
"""

from __future__ import annotations

import torch
from torch import nn


def _tdnn_block(c_in: int, c_out: int, kernel: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2),
        nn.GroupNorm(8, c_out),
        nn.ReLU(),
    )


class SpeakerNet(nn.Module):
    def __init__(self, n_mels: int, n_speakers: int, channels: int = 128, embedding_dim: int = 128):
        super().__init__()
        self.frames = nn.Sequential(
            _tdnn_block(n_mels, channels, 5, 1),
            _tdnn_block(channels, channels, 3, 2),
            _tdnn_block(channels, channels, 3, 3),
            _tdnn_block(channels, channels, 1, 1),
        )
        self.embedding = nn.Linear(2 * channels, embedding_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(embedding_dim, n_speakers))

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, embedding_dim)."""
        h = self.frames(feats)
        stats = torch.cat([h.mean(dim=2), (h.var(dim=2, unbiased=False) + 1e-5).sqrt()], dim=1)
        return self.embedding(stats)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(feats))


def build_model(n_mels: int, n_speakers: int, channels: int, embedding_dim: int, seed: int) -> SpeakerNet:
    """The same seed gives the same initial weights on the server and in `central`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SpeakerNet(n_mels, n_speakers, channels, embedding_dim)
