"""Enrol speakers on a device and verify a claimed speaker against the enrolment.

A voiceprint is the mean of the unit-length embeddings of a speaker's enrolment files,
made unit-length again; a trial's score is its cosine with the test file's embedding.
The default threshold is the one saved with the model: the run's operating point (a
target false-accept rate, or the EER), fitted on validation trials of this very type
(a voiceprint of a few recordings against one), with a calibration of scores to
log-likelihood ratios fitted on the same trials. Enrolments remember which model made them:
embeddings of another model are not comparable.

numpy only, so that the torch path (a global_model.pt or a TorchScript export) and the
torch-free one (fedspeaker/device/edge.py, ONNX) share one enrolment file format, one
threshold and one accept rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedspeaker.errors import AudioError, FedSpeakerError
from fedspeaker.evaluation.operating_point import Calibration, OperatingPoint, accepts
from fedspeaker.evaluation.voiceprint import voiceprint
from fedspeaker.files import atomic_write


class Embedder(Protocol):
    model_id: str
    verification: dict | None

    def embed_file(self, path: Path) -> Any: ...  # a unit-length vector (torch tensor or numpy array)


def load_embedder(path: Path) -> Embedder:
    """A global_model.pt (the training stack) or an export folder (torch alone)."""
    if path.is_dir():
        from fedspeaker.device.export import ExportedEmbedder

        return ExportedEmbedder(path)
    from fedspeaker.model.bundle import SpeakerModel

    return SpeakerModel.load(path)


def default_enrolments(model_path: Path) -> Path:
    """Next to the model: the export folder itself, or the bundle's folder."""
    return (model_path if model_path.is_dir() else model_path.parent) / "enrolments.json"


@dataclass
class Enrolment:
    files: int
    skipped: list[str]  # "path: reason" for each file that could not be used


class EnrolmentStore:
    """The enrolment file: voiceprints by speaker name, for one model."""

    def __init__(self, path: Path, model_id: str) -> None:
        self.path, self.model_id = path, model_id
        self.speakers: dict[str, dict] = {}
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                made_with, self.speakers = saved["model"], dict(saved["speakers"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FedSpeakerError(f"{path}: not a fedspeaker enrolment file ({exc})") from None
            if made_with != model_id:
                raise FedSpeakerError(f"{path}: these voiceprints were made with another model "
                                      f"(sha256 {made_with[:12]}…, this one is {model_id[:12]}…); "
                                      "enrol again with this model, or give --enrolments FILE")

    def enroll(self, embedder: Embedder, speaker: str, audio: list[Path]) -> Enrolment:
        """Embed every usable file and store their voiceprint; nothing is stored if none is usable."""
        if not speaker.strip():
            raise FedSpeakerError("--speaker needs a name")
        embeddings, skipped = [], []
        for path in audio:
            try:
                embeddings.append(_vector(embedder.embed_file(path)))
            except AudioError as exc:
                skipped.append(str(exc))
        if not embeddings:
            raise FedSpeakerError(f"no usable audio to enrol {speaker!r}: " + "; ".join(skipped))
        vector = voiceprint(np.stack(embeddings))
        self.speakers[speaker] = {"voiceprint": [round(float(x), 7) for x in vector],
                                  "files": len(embeddings),
                                  "enrolled": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write(self.path, lambda f: f.write(json.dumps(
            {"model": self.model_id, "speakers": self.speakers}, indent=1).encode()))
        return Enrolment(len(embeddings), skipped)

    def voiceprint(self, speaker: str) -> np.ndarray:
        if not self.speakers:
            raise FedSpeakerError(f"{self.path}: no speaker is enrolled yet; first run "
                                  f"`fedspeaker enroll --model M --speaker {speaker} AUDIO...`")
        if speaker not in self.speakers:
            raise FedSpeakerError(f"{speaker!r} is not enrolled in {self.path}; enrolled: "
                                  + ", ".join(sorted(self.speakers)))
        return np.asarray(self.speakers[speaker]["voiceprint"], dtype=np.float32)


@dataclass
class Decision:
    accept: bool
    score: float
    threshold: float
    threshold_source: str
    llr: float | None = None  # the calibrated score; None where the model has no calibration


def verify(embedder: Embedder, store: EnrolmentStore, speaker: str, audio: Path,
           threshold: float | None = None) -> Decision:
    """Is ``audio`` the enrolled ``speaker``? Accept when the cosine score reaches the
    threshold (:func:`~fedspeaker.evaluation.operating_point.accepts`, the server's rule)."""
    voiceprint = store.voiceprint(speaker)
    v = embedder.verification or {}
    if threshold is not None:
        source = "given with --threshold"
    elif "operating_point" in v:
        threshold = float(v["threshold"])
        unseen = v["unseen"]
        source = (f"operating point {OperatingPoint.parse(v['operating_point']).describe()}, fitted on "
                  f"{v['validation_speakers']} validation speakers with {v['enrol_recordings']}-recording "
                  f"voiceprints; on {unseen['speakers']} unseen speakers FAR {unseen['far']:.3f}, "
                  f"FRR {unseen['frr']:.3f}")
    elif v:  # a bundle from before operating points: the EER point of single-recording pairs
        threshold = float(v["threshold"])
        source = (f"the EER operating point on {v['unseen_speakers']} speakers unseen in "
                  f"training, EER {v['eer']:.3f}")
    else:
        raise FedSpeakerError("this model has no saved verification threshold (it was trained "
                              "before fedspeaker saved one): give --threshold T")
    score = float(np.dot(_vector(embedder.embed_file(audio)), voiceprint))
    if not math.isfinite(score):
        raise FedSpeakerError(f"{audio}: the score is not a number")
    llr = Calibration(**v["calibration"]).llr(score) if "calibration" in v else None
    return Decision(bool(accepts(score, threshold)), score, threshold, source, llr)


def _vector(embedding: Any) -> np.ndarray:
    """An embedding as float32 numpy, whichever runtime made it."""
    return np.asarray(embedding.detach() if hasattr(embedding, "detach") else embedding, dtype=np.float32)
