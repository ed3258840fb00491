"""Speaker models: the pretrained GE2E encoder fine-tuned at the top (the default), or a
TDNN trained from scratch; how they are built; the saved global model (bundle).

A speaker model maps (batch, channels, frames) inputs to logits over the training
speakers and has ``raw_embed`` (what the head reads), ``backend`` (the scoring back end,
model/backend.py), ``embed`` (``raw_embed`` through the back end: what is scored), ``head``,
``loss(logits, labels)``, ``train_frames`` (a training crop) and ``eval_frames`` (what
scoring reads of an utterance). Its state dict is what trains and what travels: GE2E's
frozen LSTM is not part of it (its output is cached as features), so it never leaves
the machine it runs on.
"""

from __future__ import annotations

import torch
from torch import nn

from fedspeaker.config import RunSettings
from fedspeaker.model.tdnn import SpeakerNet

__all__ = ["SpeakerNet", "build_model"]


def build_model(settings: RunSettings, n_speakers: int) -> nn.Module:
    """The run's model over ``n_speakers`` training speakers. The same seed gives the
    same initial weights on the server, in every client and in `central`."""
    # the CPU generator alone: every weight is drawn on the CPU, and seeding a CUDA build's
    # other devices costs each client execution half a millisecond of lazy-init bookkeeping
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(settings.seed)
        if settings.model == "ge2e":
            from fedspeaker.model.ge2e import GE2ESpeakerNet

            return GE2ESpeakerNet.pretrained(n_speakers, margin=settings.margin, scale=settings.scale)
        return SpeakerNet(settings.n_mels, n_speakers, settings.channels, settings.embedding_dim,
                          settings.crop_frames)

