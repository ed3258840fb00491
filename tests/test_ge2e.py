"""The pretrained GE2E encoder: its weights, the torchaudio port against resemblyzer's own
embeddings, what fine-tuning trains (and so what travels), and the TDNN still selectable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from fedspeaker.config import RunSettings
from fedspeaker.data.features import FeatureSpec, compute_features
from fedspeaker.model import SpeakerNet, build_model
from fedspeaker.data import ge2e
from fedspeaker.model.ge2e import GE2ESpeakerNet, aam_softmax
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.training.local import LocalTrainer

REPO = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((REPO / "tests" / "data" / "ge2e_reference_embeddings.json").read_text())
CORPUS = REPO / "data" / "dspspeech20-mini"

pytestmark = pytest.mark.usefixtures("single_thread")


def embed_utterance(
    model: nn.Module, wave: torch.Tensor, rate: float = 1.3, min_coverage: float = 0.75
) -> torch.Tensor:
    """Unit-length 256-d embedding of one 16 kHz utterance (samples,).

    ``model`` is a ``GE2E`` (its LSTM may be an ``opacus.layers.DPLSTM``). ``wave`` is
    used as given: ``embed_utterance(model, normalize_volume(wave))`` equals resemblyzer's
    ``embed_utterance(normalize_volume(wav, -30, increase_only=True))``. Resemblyzer's
    ``preprocess_wav`` would also cut silences with webrtcvad, which is not reproduced:
    on ~2 s utterances it drops about half the audio and moves the embedding (cosine
    0.70-1.0, mean 0.96, to the untrimmed one) without improving zero-shot EER.
    """
    wave = wave.float()
    wav_slices, mel_slices = ge2e.partial_slices(wave.numel(), rate, min_coverage)
    pad = wav_slices[-1].stop - wave.numel()
    if pad > 0:
        wave = nn.functional.pad(wave, (0, pad))
    mel = ge2e.power_mel(wave)
    mels = torch.stack([mel[s] for s in mel_slices])
    with torch.no_grad():
        partial = model(mels.to(next(model.parameters()).device))
    embed = partial.mean(dim=0)
    return embed / embed.norm().clamp_min(1e-12)


def test_the_weights_load_from_the_wheel_without_importing_resemblyzer():
    import sys

    encoder = ge2e.GE2E.pretrained()
    assert "resemblyzer" not in sys.modules and "librosa" not in sys.modules
    assert sum(p.numel() for p in encoder.parameters()) == 1_423_616  # 3-layer LSTM + 256x256 linear
    assert encoder.lstm.num_layers == 3 and encoder.lstm.input_size == 40
    state = torch.load(ge2e.weights_path(), map_location="cpu", weights_only=True)["model_state"]
    assert torch.equal(encoder.linear.weight, state["linear.weight"])


@pytest.mark.parametrize("name", sorted(REFERENCE["embeddings"]))
def test_the_port_matches_resemblyzers_own_embedding(name: str):
    wave, rate = sf.read(str(CORPUS / name), dtype="float32")
    assert rate == ge2e.SAMPLE_RATE
    ours = embed_utterance(ge2e.frozen_encoder(), ge2e.normalize_volume(torch.from_numpy(wave)))
    reference = torch.tensor(REFERENCE["embeddings"][name])
    assert float(ours @ F.normalize(reference, dim=0)) >= 0.99
    # the fine-tuning path (cached LSTM states, then the projection) embeds the same
    states = compute_features(torch.from_numpy(wave), FeatureSpec("ge2e"))
    net = GE2ESpeakerNet.pretrained(4)
    with torch.no_grad():
        assert float(net.embed(states[None])[0] @ ours) > 0.9999


def test_partial_windows_are_resemblyzers():
    # 1.6 s windows every 77 frames; the last one kept only if 75 % covered
    wav_slices, mel_slices = ge2e.partial_slices(32_000)
    assert [(s.start, s.stop) for s in mel_slices] == [(0, 160), (77, 237)]
    assert ge2e.partial_slices(4_000)[1] == [slice(0, 160)]  # a short clip: one padded window
    assert ge2e.power_mel(torch.zeros(16_000)).shape == (101, 40)


def test_only_the_projection_and_head_train_and_travel(tmp_path: Path):
    model = build_model(RunSettings(), n_speakers=5)
    keys = set(model.state_dict())
    assert keys == {"projection.weight", "projection.bias", "head.weight"}  # no lstm.*: it stays home
    assert sum(v.numel() for v in model.state_dict().values()) == 256 * 256 + 256 + 5 * 256
    lstm_before = {k: v.clone() for k, v in ge2e.frozen_encoder().lstm.state_dict().items()}

    settings = RunSettings(rounds=1, local_epochs=1, batch_size=4, noise_multiplier=1.0)
    trainer = LocalTrainer(settings, 5)
    feats = [torch.rand(256, 2) for _ in range(12)]
    labels = [i % 5 for i in range(12)]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ledger = PrivacyLedger()
    trainer.train(feats, labels, ledger, seed=0)
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every travelling tensor trained
    assert ledger.history and ledger.history[0][0] == 1.0  # and was noised (DP-SGD steps recorded)
    for k, v in ge2e.frozen_encoder().lstm.state_dict().items():
        assert torch.equal(v, lstm_before[k])  # the frozen part never changes


def test_aam_softmax_widens_the_true_speakers_angle():
    cosines = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.2, 0.8]])
    labels = torch.tensor([0, 2])
    plain = F.cross_entropy(30 * cosines, labels)
    assert aam_softmax(cosines, labels, margin=0.0, scale=30) == pytest.approx(float(plain), rel=1e-5)
    assert aam_softmax(cosines, labels, margin=0.2, scale=30) > plain
    # cos(theta + m) for the true speaker
    widened = math.cos(math.acos(0.9) + 0.2)
    expected = F.cross_entropy(30 * torch.tensor([[widened, 0.1, -0.2]]), torch.tensor([0]))
    assert aam_softmax(cosines[:1], labels[:1], margin=0.2, scale=30) == pytest.approx(
        float(expected), rel=1e-4)


def test_the_model_option_switches_back_to_the_tdnn():
    tdnn = build_model(RunSettings(model="tdnn", head_lr=0.0, channels=16, embedding_dim=8), n_speakers=3)
    assert isinstance(tdnn, SpeakerNet) and tdnn.input_channels == 40 and tdnn.train_frames == 200
    assert FeatureSpec.of(RunSettings(model="tdnn")) == FeatureSpec("fbank", 40)
    assert FeatureSpec.of(RunSettings()) == FeatureSpec("ge2e")
