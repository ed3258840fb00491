"""Verification without torch: the ONNX export embeds real recordings as the TorchScript one
does, and the torch-free path (fedspeaker/device/edge.py) enrols and verifies, with the same
enrolment file and threshold, in a process where `import torch` fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.device.edge import OnnxEmbedder, load_wave
from fedspeaker.device.export import ExportedEmbedder, export_embedder
from fedspeaker.device.voiceprints import EnrolmentStore, verify
from fedspeaker.errors import AudioError
from fedspeaker.evaluation.scoring import EvaluationSet, embed, evaluate
from fedspeaker.model import build_model
from fedspeaker.model.backend import encoder_fingerprint, install_backend
from fedspeaker.model.bundle import model_bundle
from fedspeaker.privacy.backend_stats import clipped_sums

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "dspspeech20-mini"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    """The pretrained GE2E model on the bundled corpus, its data and trials, loaded once for
    the module (the features in a cache of its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSPEAKER_CACHE", str(tmp_path_factory.mktemp("onnx-cache")))
        settings = RunSettings()
        data = load_speaker_data(settings)
        return settings, data, build_model(settings, data.n_speakers), EvaluationSet.of(data, settings)


def _export(root: Path, pretrained, *, backend: bool) -> Path:
    """The pretrained model (its threshold measured on its unseen speakers), exported; with
    ``backend``, with a scoring back end (the training utterances' mean), which ONNX must
    apply as TorchScript does."""
    settings, data, model, evaluation = pretrained
    model.backend.clear()
    if backend:
        sums = clipped_sums(embed(model, evaluation.enrol_feats, raw=True), evaluation.enrol_labels, "utterance")
        install_backend(model, sums.total / sums.count, encoder_fingerprint(model), sums.count)
    torch.save(model_bundle(settings, data.split.speakers, model, evaluate(model, evaluation), evaluation),
               root / "global_model.pt")
    export_embedder(root / "global_model.pt", root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, pretrained) -> Path:
    return _export(tmp_path_factory.mktemp("onnx"), pretrained, backend=False)


@pytest.fixture(scope="module")
def exported_with_backend(tmp_path_factory: pytest.TempPathFactory, pretrained) -> Path:
    return _export(tmp_path_factory.mktemp("onnx-backend"), pretrained, backend=True)


def recordings(speaker: str) -> list[Path]:
    return sorted((CORPUS / speaker).glob("*.flac"))


@pytest.mark.parametrize("which", ["exported", "exported_with_backend"])
def test_onnx_embeds_real_recordings_as_torchscript_does(which: str, request: pytest.FixtureRequest) -> None:
    exported = request.getfixturevalue(which)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["onnx"]["min_cosine_vs_torchscript"] >= 0.9999
    onnx, scripted = OnnxEmbedder(exported), ExportedEmbedder(exported)
    speakers = sorted(p.name for p in CORPUS.iterdir())
    files = [recordings(s)[i] for s in speakers[:4] for i in (0, 7)]  # 8 files of 4 speakers
    cosines = [float(onnx.embed_file(f) @ scripted.embed_file(f).numpy()) for f in files]
    assert min(cosines) >= 0.9999, cosines


EDGE_SCRIPT = """
import sys
sys.modules["torch"] = None  # `import torch` fails from here on
from fedspeaker.device.edge import main
code = main(sys.argv[1:])
loaded = [m for m, module in sys.modules.items() if module is not None]
assert not any(m.split(".")[0] in ("torch", "torchaudio", "flwr", "opacus") for m in loaded), loaded
sys.exit(code)
"""


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", EDGE_SCRIPT, *args], cwd=ROOT, capture_output=True, text=True)


def test_torch_free_path_accepts_the_speaker_and_rejects_another(exported: Path, tmp_path: Path) -> None:
    speaker, other = sorted(p.name for p in CORPUS.iterdir())[:2]
    enrolments = tmp_path / "enrolments.json"
    base = ["--model", str(exported), "--enrolments", str(enrolments)]
    done = edge("enroll", *base, "--speaker", "ann", *map(str, recordings(speaker)[:5]))
    assert done.returncode == 0, done.stderr
    claim, impostor = recordings(speaker)[10], recordings(other)[10]
    # a threshold given, as an operator may: the stored FAR 1 % one rejects half the owners
    accepted = edge("verify", *base, "--speaker", "ann", str(claim), "--threshold", "0.7")
    rejected = edge("verify", *base, "--speaker", "ann", str(impostor), "--threshold", "0.7")
    assert accepted.returncode == 0 and accepted.stdout.startswith("accept"), accepted.stdout + accepted.stderr
    assert rejected.returncode == 1 and rejected.stdout.startswith("reject"), rejected.stdout + rejected.stderr

    # the same enrolment file, threshold and rule in the torch path: the same decisions
    scripted = ExportedEmbedder(exported)
    store = EnrolmentStore(enrolments, scripted.model_id)
    same, diff = verify(scripted, store, "ann", claim, 0.7), verify(scripted, store, "ann", impostor, 0.7)
    assert same.accept and not diff.accept
    assert f"score {same.score:.3f}" in accepted.stdout and f"threshold {same.threshold:.3f}" in accepted.stdout


def test_torch_free_path_says_what_is_wrong(exported: Path, tmp_path: Path) -> None:
    done = edge("verify", "--model", str(exported), "--enrolments", str(tmp_path / "none.json"),
                "--speaker", "ann", str(recordings(sorted(p.name for p in CORPUS.iterdir())[0])[0]))
    assert done.returncode == 2 and "no enrolment file" in done.stderr
    done = edge("enroll", "--model", str(tmp_path), "--speaker", "ann", "x.wav")
    assert done.returncode == 2 and "not a fedspeaker export" in done.stderr


def test_other_sample_rates_are_refused_clearly(tmp_path: Path) -> None:
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 8000)
    with pytest.raises(AudioError, match="8000 Hz; the torch-free path takes 16000 Hz"):
        load_wave(tmp_path / "a.wav")
