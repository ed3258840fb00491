"""global_model.pt: the trained global model with its speakers, settings and threshold.

The writer (:func:`model_bundle`, :func:`save_bundle`) and the reader
(:class:`SpeakerModel`, for `identify`, `export`, `enroll`, `verify` and the audit)
live side by side, so the format changes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fedspeaker.data.audio import load_audio
from fedspeaker.config import RunSettings, saved_run_config
from fedspeaker.errors import FedSpeakerError, ModelError
from fedspeaker.files import file_sha256
from fedspeaker.data.features import FeatureSpec, compute_features
from fedspeaker.evaluation.scoring import EvaluationSet, embed
from fedspeaker.model import build_model
from fedspeaker.model.backend import install_saved_backend


def model_bundle(settings: RunSettings, speakers: Sequence[str], model: torch.nn.Module,
                 scores: dict[str, float], evaluation: EvaluationSet) -> dict[str, Any]:
    """Everything `identify`, `export`, `enroll` and `verify` need: the model (with its
    scoring back end, where one is installed), its speakers and settings, and how to decide:
    the threshold of the run's operating point and the score calibration that ``scores``
    (``evaluate``'s, of this model) fitted on validation trials, with what they gave on
    unseen speakers."""
    return {"state_dict": model.state_dict(), "backend": model.backend.to_dict(),
            "speakers": list(speakers),
            "settings": settings.to_run_config(),
            "verification": verification_record(settings, scores, evaluation)}


def verification_record(settings: RunSettings, scores: dict[str, float],
                        evaluation: EvaluationSet) -> dict[str, Any]:
    """The decision rule a device applies (accept a score at or above ``threshold``) and
    where it comes from."""
    return {"threshold": scores["threshold"], "operating_point": str(evaluation.operating_point),
            "enrol_recordings": settings.enrol_recordings,
            "calibration": {"scale": scores["llr_scale"], "offset": scores["llr_offset"]},
            "validation_speakers": evaluation.validation.speakers,
            "fitted_on": evaluation.validation.source,
            "unseen": {"speakers": evaluation.unseen.speakers, "trials": len(evaluation.unseen),
                       "source": evaluation.unseen.source,
                       **{k: scores[k] for k in ("far", "frr", "frr_at_far_1pct", "enrol_eer", "cllr")}}}


def save_bundle(bundle: dict[str, Any], path: Path) -> None:
    torch.save(bundle, path)


@dataclass
class SpeakerModel:
    model: torch.nn.Module
    speakers: list[str]
    settings: RunSettings
    model_id: str  # the bundle file's sha256: enrolments name the model they were made with
    verification: dict | None  # the threshold and calibration (verification_record); None in older bundles

    @classmethod
    def load(cls, path: Path) -> "SpeakerModel":
        try:
            bundle = torch.load(path, map_location="cpu", weights_only=True)
            settings = RunSettings.from_run_config(saved_run_config(bundle["settings"]))
            model = build_model(settings, len(bundle["speakers"]))
            model.load_state_dict(bundle["state_dict"])
            if bundle.get("backend"):  # older bundles, and runs with backend=false, hold none
                install_saved_backend(model, bundle["backend"])
        except FileNotFoundError:
            raise FedSpeakerError(f"{path}: no such model file") from None
        except (KeyError, RuntimeError, TypeError, ValueError, OSError, ModelError) as exc:
            raise FedSpeakerError(f"{path}: not a fedspeaker global_model.pt ({exc})") from None
        model.eval()
        return cls(model, list(bundle["speakers"]), settings, file_sha256(path),
                   bundle.get("verification"))

    def features(self, path: Path) -> torch.Tensor:
        spec = FeatureSpec.of(self.settings)
        return compute_features(load_audio(path, spec.sample_rate), spec)

    @torch.no_grad()
    def embed_file(self, path: Path) -> torch.Tensor:
        """Unit-length embedding of one file, as the server embeds utterances."""
        emb = embed(self.model, [self.features(path)])
        return F.normalize(emb, dim=1)[0]

    @torch.no_grad()
    def identify(self, path: Path, top: int = 3) -> list[tuple[str, float]]:
        """The ``top`` most likely training speakers with their probabilities."""
        probs = self.model.head(embed(self.model, [self.features(path)], raw=True)).softmax(dim=1)[0]
        best = probs.topk(min(top, len(self.speakers)))
        return [(self.speakers[i], float(p)) for p, i in zip(best.values, best.indices)]
