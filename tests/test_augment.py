"""On-device augmentation (issue 23): copies made once per recording, deterministic; and
under DP-SGD the unit does not change: a recording's copies are one sample."""

from __future__ import annotations

import pytest
import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.augment import augmented_examples
from fedspeaker.data.corpus import Utterance
from fedspeaker.data.features import FeatureCache, FeatureSpec
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.training.local import LocalTrainer
from fedspeaker.training.loops import make_loader


def _copies(n: int, copies: int, windows: int = 6) -> list[torch.Tensor]:
    """Recording i's copy k is filled with i * 100 + k, so a drawn crop says where it came from."""
    return [torch.stack([torch.full((256, windows), float(i * 100 + k)) for k in range(copies + 1)])
            for i in range(n)]


def test_a_recording_and_its_copies_are_one_item_and_each_draw_one_copy():
    feats, labels = _copies(12, copies=4), [i % 3 for i in range(12)]
    loader = make_loader(feats, labels, frames=1, batch_size=4, seed=0)
    assert len(loader.dataset) == 12  # recordings, not recordings x copies
    seen: dict[int, set[int]] = {}
    for _ in range(40):
        for x, y in loader:
            for crop, label in zip(x, y):
                value = int(crop[0, 0])
                recording, copy = divmod(value, 100)
                assert torch.all(crop == value)  # one copy per example, never a mixture
                assert labels[recording] == int(label)
                seen.setdefault(recording, set()).add(copy)
    assert all(copies == set(range(5)) for copies in seen.values()) and len(seen) == 12


@pytest.mark.parametrize("unit", ["utterance", "speaker"])
def test_under_dp_the_copies_of_a_recording_are_one_sample(unit, single_thread):
    """The same recordings with 4 copies each take the same DP-SGD steps at the same sample
    rate and noise, so spend the same epsilon, as without copies."""
    settings = RunSettings(dp=True, epsilon=8.0, rounds=2, batch_size=8, dp_unit=unit, backend=False,
                           augment="standard", augment_copies=4)
    labels = [i % 4 for i in range(24)]
    augmented = _copies(24, copies=4)
    clean = [f[0] for f in augmented]
    ledgers = []
    for feats in (clean, augmented):
        torch.manual_seed(0)
        trainer = LocalTrainer(settings, n_speakers=4)
        ledger = PrivacyLedger(settings.accountant)
        trainer.train(feats, labels, ledger, seed=1, seeded_noise=True)
        ledgers.append(ledger)
    assert ledgers[0].history == ledgers[1].history
    assert ledgers[0].epsilon(settings.delta) == ledgers[1].epsilon(settings.delta) <= 8.0
    units = 24 if unit == "utterance" else 4
    noise, sample_rate, steps = ledgers[1].history[0]
    assert sample_rate == pytest.approx(1 / -(-units // min(8, units)))


def test_copies_are_made_once_deterministically_and_differ(synthetic_corpus, cache_dir, single_thread,
                                                           monkeypatch):
    from fedspeaker.data import augment, features

    monkeypatch.setattr(augment, "ROOMS", 2)  # two quick rooms rather than eight
    monkeypatch.setattr(augment, "RT60_RANGE", (0.2, 0.3))
    settings = RunSettings(data_dir=str(synthetic_corpus.root))
    speakers = synthetic_corpus.speakers[:3]
    utts = [Utterance(p, s) for s in speakers for p in synthetic_corpus.files[s][:2]]
    labels = [speakers.index(u.speaker) for u in utts]
    args = ("babble,white,room", 3, 0, FeatureSpec.of(settings))
    feats, kept = augmented_examples(*args, cache_dir, utts, labels)
    assert kept == labels and all(f.shape[0] == 4 for f in feats)
    clean = FeatureCache(cache_dir, FeatureSpec.of(settings))
    for f, u in zip(feats, utts):
        assert torch.equal(f[0], clean.get(u.path))  # the clean features first
        assert all(not torch.equal(f[0], f[k]) for k in range(1, 4))
    again, _ = augmented_examples(*args, cache_dir / "fresh", utts, labels)  # made anew elsewhere
    assert all(torch.equal(a, b) for a, b in zip(feats, again))
    def no_decoding(*_):
        raise AssertionError("decoded audio although every copy is cached")

    monkeypatch.setattr(features.audio, "load_audio", no_decoding)
    cached, _ = augmented_examples(*args, cache_dir, utts, labels)
    assert all(torch.equal(a, b) for a, b in zip(feats, cached))


def test_augment_is_checked():
    from fedspeaker.errors import ConfigError

    with pytest.raises(ConfigError, match="augment: unknown family 'echo'"):
        RunSettings.from_run_config({"augment": "echo"})
    with pytest.raises(ConfigError, match="augment-copies"):
        RunSettings.from_run_config({"augment": "standard", "augment-copies": 0})


def test_each_units_scatter_is_clipped_and_the_release_noised_for_its_sensitivity():
    from fedspeaker.privacy.backend_stats import SCATTER_CLIP, SCATTER_WEIGHT, Sums, noised, unit_scatters

    copies = torch.randn(40, 5, 16)
    scatters = unit_scatters(copies, list(range(40)), "utterance")
    rows, cols = torch.triu_indices(16, 16)
    unit = torch.nn.functional.normalize(copies, dim=-1)
    deviations = unit - unit.mean(dim=1, keepdim=True)
    for scatter, d in zip(scatters, deviations):
        full = torch.zeros(16, 16)
        full[rows, cols] = scatter
        exact = d.T @ d / 5
        assert torch.linalg.norm(full + full.T - torch.diag(full.diagonal())) <= SCATTER_CLIP + 1e-5
        assert torch.allclose(full[rows, cols] / full[0, 0], exact[rows, cols] / exact[0, 0], atol=1e-4)
    small = unit_scatters(copies * 0 + torch.randn(1, 1, 16) + 0.01 * torch.randn(40, 5, 16), [0] * 40,
                          "utterance")  # copies close together: below the clip, kept exactly
    assert torch.linalg.norm(small, dim=1).max() < SCATTER_CLIP
    zeros = Sums(torch.zeros(64), 0.0, torch.zeros(20_000))
    released = noised(zeros, 2.0, torch.Generator().manual_seed(0))
    # one unit moves (sum, count, scatter / (clip / weight)) by at most sqrt(1 + 1 + weight^2)
    std = (2 + SCATTER_WEIGHT ** 2) ** 0.5 * 2.0
    assert float(released.total.std()) == pytest.approx(std, rel=0.2)
    assert float(released.scatter.std()) == pytest.approx(std * SCATTER_CLIP / SCATTER_WEIGHT, rel=0.03)


def test_whitening_shrinks_the_direction_degradation_moves_along():
    from fedspeaker.model import build_model
    from fedspeaker.model.backend import encoder_fingerprint, install_backend, install_saved_backend, \
        whitening_of_scatter

    dim = 256
    nuisance = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    rows, cols = torch.triu_indices(dim, dim)
    scatter = 0.2 * torch.outer(nuisance, nuisance) + 1e-3 * torch.eye(dim)
    whiten = whitening_of_scatter(scatter[rows, cols] * 10, 10, dim)
    model = build_model(RunSettings(), 4)
    install_backend(model, torch.zeros(dim), encoder_fingerprint(model), 10, whiten)
    clean = torch.nn.functional.normalize(torch.rand(dim), dim=0)
    degraded = clean + 0.5 * nuisance  # the same voice, moved along the nuisance direction
    other = torch.nn.functional.normalize(torch.rand(dim), dim=0)
    cos = torch.nn.functional.cosine_similarity
    before = float(cos(clean, degraded, dim=0))
    after = float(cos(model.backend(clean[None])[0], model.backend(degraded[None])[0], dim=0))
    assert after > before and after > 0.99
    saved = model.backend.to_dict()
    again = build_model(RunSettings(), 4)
    install_saved_backend(again, saved)
    assert torch.equal(again.backend(other[None]), model.backend(other[None]))
    with pytest.raises(Exception, match="backend-whiten"):
        RunSettings.from_run_config({"backend-whiten": True})


def test_central_with_augmentation_whitening_and_conditions(synthetic_corpus, cache_dir, tmp_path, single_thread):
    """`central` end to end on a small corpus: augmented training, the whitened back end
    (released under DP and saved with the model), degraded conditions in every report."""
    import csv
    import json

    from fedspeaker.model.bundle import SpeakerModel
    from simulations.central import run_central

    out = tmp_path / "run"
    settings = RunSettings.from_run_config({
        "data-dir": str(synthetic_corpus.root), "cache-dir": str(cache_dir), "out-dir": str(out),
        "rounds": 1, "num-clients": 2, "augment": "babble,white", "augment-copies": 2,
        "backend-whiten": True, "test-conditions": "babble5,white0"})
    summary = run_central(settings, on_round=lambda line: None)
    for part in ("start", "released"):
        assert set(summary[part]["conditions"]) == {"babble5", "white0"}
        assert 0 <= summary[part]["degraded_eer_mean"] <= 1
    with open(out / "rounds.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"eer_babble5", "min_dcf_white0", "degraded_eer_mean"} <= set(header)
    model = SpeakerModel.load(out / "global_model.pt").model
    assert model.backend.whitened and not torch.equal(model.backend.whiten, torch.eye(256))
    assert "scatter of its augmented copies" in json.loads((out / "summary.json").read_text())["privacy"]
