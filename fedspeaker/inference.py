"""Use a trained global model: load it, embed audio, name the speaker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedspeaker.audio import load_audio
from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError
from fedspeaker.features import FeatureSpec, compute_features
from fedspeaker.model import SpeakerNet, build_model


@dataclass
class SpeakerModel:
    model: SpeakerNet
    speakers: list[str]
    settings: RunSettings

    @classmethod
    def load(cls, path: Path) -> "SpeakerModel":
        try:
            bundle = torch.load(path, map_location="cpu", weights_only=True)
            settings = RunSettings.from_run_config(bundle["settings"])
            model = build_model(settings.n_mels, len(bundle["speakers"]), settings.channels,
                                settings.embedding_dim, settings.seed)
            model.load_state_dict(bundle["state_dict"])
        except FileNotFoundError:
            raise FedSpeakerError(f"{path}: no such model file") from None
        except (KeyError, RuntimeError, TypeError, ValueError, OSError) as exc:
            raise FedSpeakerError(f"{path}: not a fedspeaker global_model.pt ({exc})") from None
        model.eval()
        return cls(model, list(bundle["speakers"]), settings)

    def features(self, path: Path) -> torch.Tensor:
        spec = FeatureSpec(self.settings.features, self.settings.n_mels)
        return compute_features(load_audio(path, spec.sample_rate), spec)

    @torch.no_grad()
    def identify(self, path: Path, top: int = 3) -> list[tuple[str, float]]:
        """The ``top`` most likely training speakers with their probabilities."""
        probs = self.model(self.features(path).unsqueeze(0)).softmax(dim=1)[0]
        best = probs.topk(min(top, len(self.speakers)))
        return [(self.speakers[i], float(p)) for p, i in zip(best.values, best.indices)]
