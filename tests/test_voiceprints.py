"""On-device use of the global model: the operating point's threshold saved with it, the TorchScript
export, enrolment and verification, and their error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedspeaker
from fedspeaker import cli
from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.files import file_sha256
from fedspeaker.model.bundle import SpeakerModel
from fedspeaker.training.local import LocalTrainer
from fedspeaker.evaluation.metrics import eer_operating_point
from fedspeaker.evaluation.operating_point import Calibration, threshold_at_far
from fedspeaker.evaluation.scoring import EvaluationSet, embed, evaluate, voiceprints
from fedspeaker.evaluation.trials import all_pairs, trial_scores
from fedspeaker.evaluation.voiceprint import voiceprint
from fedspeaker.model.backend import encoder_fingerprint, install_backend
from fedspeaker.model.bundle import model_bundle
from fedspeaker.privacy.backend_stats import clipped_sums
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.device.voiceprints import EnrolmentStore, load_embedder, verify
from tests.conftest import make_corpus

pytestmark = pytest.mark.usefixtures("single_thread")


MODELS = {"ge2e": dict(model="ge2e"),
          "tdnn": dict(model="tdnn", channels=16, embedding_dim=16, crop_frames=40)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A small model trained on 4 synthetic speakers (2 more are unseen), as a bundle:
    the fine-tuned GE2E encoder, and the TDNN."""
    root = tmp_path_factory.mktemp("voice")
    corpus = make_corpus(root / "corpus", seconds=1.0)
    settings = RunSettings(data_dir=str(corpus.root), cache_dir=str(root / "cache"), dp=False,
                           local_epochs=15, lr=0.05, **MODELS[request.param])
    data = load_speaker_data(settings)
    trainer = LocalTrainer(settings, data.n_speakers)
    feats, labels = data.train_examples()
    trainer.train(feats, labels, PrivacyLedger(), seed=0)
    if settings.model == "ge2e":  # with a scoring back end: export, enrol and verify must apply it
        # (the tiny TDNN's tones are told apart mostly by their mean direction: not centred)
        sums = clipped_sums(embed(trainer.model, feats, raw=True), labels, "utterance")
        install_backend(trainer.model, sums.total / sums.count, encoder_fingerprint(trainer.model), sums.count)
    bundle = root / "global_model.pt"
    evaluation = EvaluationSet.of(data, settings)
    scores = evaluate(trainer.model, evaluation)
    torch.save(model_bundle(settings, data.split.speakers, trainer.model, scores, evaluation), bundle)
    return bundle, corpus, data, settings


def test_one_voiceprint_for_torch_and_numpy() -> None:
    embeddings = torch.randn(7, 16, generator=torch.Generator().manual_seed(0)) * 3
    made = voiceprint(embeddings)
    # bit for bit what the server and devices computed before they shared it
    assert torch.equal(made, F.normalize(F.normalize(embeddings, dim=1).mean(dim=0), dim=0))
    assert float(made.norm()) == pytest.approx(1.0)
    assert np.allclose(voiceprint(embeddings.numpy()), made.numpy(), atol=1e-6)
    assert voiceprint(embeddings.numpy()).dtype == np.float32
    assert not voiceprint(torch.zeros(2, 16)).isnan().any()  # eps, as F.normalize
    prints = voiceprints(embeddings, [0, 2, 0, 2, 2, 0, 2], 3)
    assert torch.equal(prints[0], voiceprint(embeddings[[0, 2, 5]])) and torch.equal(prints[1], torch.zeros(16))


def test_the_eer_threshold_gives_the_eer() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(np.r_[rng.normal(1, 1, 300), rng.normal(-1, 1, 700)], 1)  # with ties
    same = np.r_[np.ones(300, bool), np.zeros(700, bool)]
    eer, threshold = eer_operating_point(scores, same)
    false_reject = np.mean(scores[same] < threshold)
    false_accept = np.mean(scores[~same] >= threshold)
    assert (false_reject + false_accept) / 2 == pytest.approx(eer)
    assert abs(false_reject - false_accept) < 0.05


def test_the_bundle_holds_the_threshold_fitted_on_validation_speakers(trained) -> None:
    bundle, _, data, settings = trained
    model = SpeakerModel.load(bundle)
    v = model.verification
    assert v["operating_point"] == "far:0.01" and v["enrol_recordings"] == 3
    # refitted here from the validation trials: the training speakers' held-out recordings
    # against voiceprints of 3 of their training recordings
    evaluation = EvaluationSet.of(data, settings)
    val = evaluation.validation
    enrol_feats, _ = data.train_examples()
    test_feats, _ = data.test_examples()
    scores = val.scores(embed(model.model, enrol_feats), embed(model.model, test_feats))
    assert v["threshold"] == pytest.approx(threshold_at_far(scores, val.target, 0.01))
    fitted = Calibration.fit(scores, val.target)
    assert v["calibration"] == pytest.approx({"scale": fitted.scale, "offset": fitted.offset}, rel=1e-4)
    assert v["validation_speakers"] == len(data.split.speakers)
    # the unseen speakers are the test: never fitted on, only measured
    assert v["unseen"]["speakers"] == len(data.split.unseen) and v["unseen"]["trials"] == len(evaluation.unseen)
    assert set(data.split.unseen).isdisjoint(data.split.speakers)


def test_export_needs_torch_alone_and_embeds_like_the_training_stack(trained, tmp_path: Path) -> None:
    bundle, corpus, _, settings = trained
    assert cli.main(["export", "--model", str(bundle), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["size_bytes"] == (tmp_path / "export" / "embedder.pt").stat().st_size
    assert manifest["sha256"] == file_sha256(tmp_path / "export" / "embedder.pt")
    assert manifest["fedspeaker"] == fedspeaker.__version__ and manifest["torch"] == torch.__version__
    assert manifest["verification"] == SpeakerModel.load(bundle).verification
    if settings.model == "ge2e":
        assert manifest["backend"]["fingerprint"] == encoder_fingerprint(SpeakerModel.load(bundle).model)
    audio = corpus.files["spk00"][0]
    from fedspeaker.data.audio import load_audio

    np.save(tmp_path / "wave.npy", load_audio(audio).numpy())
    script = ("import sys, numpy, torch\n"
              f"m = torch.jit.load({str(tmp_path / 'export' / 'embedder.pt')!r})\n"
              f"e = m(torch.from_numpy(numpy.load({str(tmp_path / 'wave.npy')!r})))\n"
              "assert not any(n.split('.')[0] in ('fedspeaker', 'flwr', 'opacus', 'torchaudio') "
              "for n in sys.modules), 'training stack imported'\n"
              "print(' '.join(str(float(x)) for x in e))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    on_device = torch.tensor([float(x) for x in done.stdout.split()])
    reference = SpeakerModel.load(bundle).embed_file(audio)
    assert (on_device - reference).abs().max() < 1e-4
    model = SpeakerModel.load(bundle).model
    raw = F.normalize(embed(model, [SpeakerModel.load(bundle).features(audio)], raw=True), dim=1)[0]
    if settings.model == "ge2e":
        assert (on_device - raw).abs().max() > 1e-2  # the back end is applied on the device too
    assert on_device.norm() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("use_export", [False, True])
def test_enrol_then_verify_the_speaker_and_an_impostor(trained, tmp_path: Path, use_export: bool,
                                                        capsys: pytest.CaptureFixture) -> None:
    bundle, corpus, data, _ = trained
    model = str(bundle)
    if use_export:
        model = str(tmp_path / "export")
        assert cli.main(["export", "--model", str(bundle), "--out", model]) == 0
    speaker, impostor = data.split.speakers[:2]
    enrolments = tmp_path / "enrolments.json"
    files = [str(p) for p in corpus.files[speaker]]
    assert cli.main(["enroll", "--model", model, "--enrolments", str(enrolments), "--speaker", "ann",
                     *files[:3]]) == 0
    assert "enrolled 'ann' from 3 file(s)" in capsys.readouterr().out

    embedder = load_embedder(Path(model))
    store = EnrolmentStore(enrolments, embedder.model_id)
    claim, attack = Path(files[4]), corpus.files[impostor][4]
    same = verify(embedder, store, "ann", claim)
    other = verify(embedder, store, "ann", attack)
    assert same.score > other.score
    assert same.threshold == SpeakerModel.load(bundle).verification["threshold"]

    def run(audio: Path, threshold: float | None = None) -> tuple[int, str]:
        args = ["verify", "--model", model, "--enrolments", str(enrolments), "--speaker", "ann", str(audio)]
        code = cli.main(args + (["--threshold", repr(threshold)] if threshold is not None else []))
        return code, capsys.readouterr().out

    code, out = run(claim)
    assert code == (0 if same.accept else 1) and "operating point FAR 1 %, fitted on 4 validation speakers" in out
    assert "LLR" in out
    middle = (same.score + other.score) / 2
    code, out = run(claim, middle)
    assert code == 0 and out.startswith("accept")
    code, out = run(attack, middle)
    assert code == 1 and out.startswith("reject") and "given with --threshold" in out


def test_clear_messages_for_what_cannot_be_verified(trained, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    bundle, corpus, _, _ = trained
    enrolments = tmp_path / "enrolments.json"
    base = ["--model", str(bundle), "--enrolments", str(enrolments)]
    good = str(corpus.files["spk01"][0])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio")

    assert cli.main(["verify", *base, "--speaker", "ann", good]) == 2
    assert "no enrolment file; enrol first" in capsys.readouterr().err
    assert cli.main(["enroll", *base, "--speaker", "ann", str(broken)]) == 2
    assert "no usable audio to enrol 'ann'" in capsys.readouterr().err
    assert not enrolments.exists()  # nothing written
    assert cli.main(["enroll", *base, "--speaker", "ann", str(broken), good]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.wav" in out and "from 1 file(s)" in out
    assert cli.main(["verify", *base, "--speaker", "bob", good]) == 2
    err = capsys.readouterr().err
    assert "'bob' is not enrolled" in err and "enrolled: ann" in err
    assert cli.main(["verify", *base, "--speaker", "ann", str(broken)]) == 2
    assert "broken.wav: not readable audio" in capsys.readouterr().err
    assert cli.main(["verify", *base, "--speaker", "ann", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav: no such file" in capsys.readouterr().err

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"model": SpeakerModel.load(bundle).model_id, "speakers": {}}))
    assert cli.main(["verify", "--model", str(bundle), "--enrolments", str(empty), "--speaker",
                     "ann", good]) == 2
    assert "no speaker is enrolled yet" in capsys.readouterr().err

    old = torch.load(bundle, weights_only=True)
    del old["verification"]  # a model saved before thresholds were
    torch.save(old, tmp_path / "old.pt")
    assert cli.main(["verify", "--model", str(tmp_path / "old.pt"), "--enrolments", str(enrolments),
                     "--speaker", "ann", good]) == 2
    assert "made with another model" in capsys.readouterr().err
    old_base = ["--model", str(tmp_path / "old.pt"), "--enrolments", str(tmp_path / "old-enrolments.json")]
    assert cli.main(["enroll", *old_base, "--speaker", "ann", good]) == 0
    capsys.readouterr()
    assert cli.main(["verify", *old_base, "--speaker", "ann", good]) == 2
    assert "give --threshold" in capsys.readouterr().err
