"""SpeakerNet under Opacus, the EER metric, and the privacy ledger across rounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
import torch.nn.functional as F
from torch import nn

from fedspeaker.config import RunSettings
from fedspeaker.training.local import LocalTrainer
from fedspeaker.evaluation.metrics import eer_operating_point
from fedspeaker.model import SpeakerNet, build_model
from fedspeaker.privacy.dpsgd import calibrate_noise, make_private
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.training.loops import make_loader

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # expected noise from Opacus and torch during DP training of a tiny model
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning"),
]


def equal_error_rate(scores: np.ndarray, same: np.ndarray) -> float:
    """EER: the rate where false accepts equal false rejects, over all thresholds."""
    return eer_operating_point(scores, same)[0]


def verification_eer(embeddings: torch.Tensor, speakers: list[str]) -> float:
    """EER over every pair of utterances, scored by cosine similarity."""
    e = F.normalize(embeddings.float(), dim=1)
    scores = (e @ e.T).numpy()
    ids = np.unique(np.asarray(speakers), return_inverse=True)[1]
    rows, cols = np.triu_indices(len(speakers), k=1)
    return equal_error_rate(scores[rows, cols], ids[rows] == ids[cols])


# ------------------------------------------------------------------ model


def tdnn(*, n_mels: int, n_speakers: int, channels: int, embedding_dim: int, seed: int) -> SpeakerNet:
    return build_model(RunSettings(model="tdnn", head_lr=0.0, n_mels=n_mels, channels=channels,
                                   embedding_dim=embedding_dim, seed=seed), n_speakers)


def test_speakernet_is_valid_for_opacus():
    model = tdnn(n_mels=40, n_speakers=10, channels=16, embedding_dim=16, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    assert ModuleValidator.validate(tdnn(n_mels=40, n_speakers=26, channels=128, embedding_dim=128, seed=0), strict=False) == []


def test_batchnorm_model_fails_opacus_validation():
    model = nn.Sequential(nn.Conv1d(40, 16, 3), nn.BatchNorm1d(16), nn.ReLU())
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(model, strict=True)
    errors = ModuleValidator.validate(model, strict=False)
    assert len(errors) == 1 and "BatchNorm" in str(errors[0])


def test_speakernet_with_batchnorm_swapped_in_fails_validation():
    model = SpeakerNet(40, 4, channels=16, embedding_dim=16)
    model.frames[0][1] = nn.BatchNorm1d(16)
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(model, strict=True)


@pytest.mark.parametrize("frames", [20, 57, 100, 201])
def test_forward_shapes(frames):
    model = tdnn(n_mels=40, n_speakers=7, channels=16, embedding_dim=12, seed=0)
    x = torch.randn(3, 40, frames)
    assert model.frames(x).shape == (3, 16, frames)  # 'same' padding keeps time length
    assert model.embed(x).shape == (3, 12)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_embedding_is_independent_of_batch_neighbours():
    # per-sample gradients (Opacus) need layers that do not mix samples
    model = tdnn(n_mels=40, n_speakers=4, channels=16, embedding_dim=8, seed=0).eval()
    x = torch.randn(5, 40, 60)
    together = model.embed(x)
    alone = torch.cat([model.embed(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    a = tdnn(n_mels=40, n_speakers=5, channels=16, embedding_dim=16, seed=3)
    b = tdnn(n_mels=40, n_speakers=5, channels=16, embedding_dim=16, seed=3)
    c = tdnn(n_mels=40, n_speakers=5, channels=16, embedding_dim=16, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tdnn(n_mels=40, n_speakers=5, channels=16, embedding_dim=16, seed=9)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ EER


def test_eer_of_perfectly_separable_scores_is_zero():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.6, 1.0, 50)
    nontarget = rng.uniform(-1.0, 0.5, 200)
    scores = np.concatenate([target, nontarget])
    same = np.concatenate([np.ones(50, bool), np.zeros(200, bool)])
    perm = rng.permutation(len(scores))
    assert equal_error_rate(scores[perm], same[perm]) == 0.0
    # and of perfectly wrong scores it is 1
    assert equal_error_rate(-scores[perm], same[perm]) == 1.0


def test_eer_of_random_scores_is_about_half():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(20_000)
    same = rng.random(20_000) < 0.3
    assert abs(equal_error_rate(scores, same) - 0.5) < 0.02


def test_eer_of_overlapping_gaussians():
    # targets ~ N(1, 1), non-targets ~ N(-1, 1): EER = Phi(-1) = 0.1587
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.normal(1, 1, 20_000), rng.normal(-1, 1, 20_000)])
    same = np.concatenate([np.ones(20_000, bool), np.zeros(20_000, bool)])
    assert equal_error_rate(scores, same) == pytest.approx(0.1587, abs=0.01)


def test_eer_hand_computed_examples():
    # accept top k: k=3 gives FR = 1/3 (one target of 3 rejected), FA = 1/3
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = np.array([True, False, True, True, False, False])
    assert equal_error_rate(scores, same) == pytest.approx(1 / 3)
    # no exact crossing: closest is k=2 with FR = 1/2, FA = 1/3 -> (1/2 + 1/3) / 2
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    same = np.array([True, False, True, False, False])
    assert equal_error_rate(scores, same) == pytest.approx(5 / 12)
    # trial order does not matter when scores are distinct
    for perm in itertools.permutations(range(5)):
        p = list(perm)
        assert equal_error_rate(scores[p], same[p]) == pytest.approx(5 / 12)


def test_eer_needs_both_kinds_of_trials():
    with pytest.raises(ValueError):
        equal_error_rate(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError):
        equal_error_rate(np.array([0.1, 0.2]), np.array([False, False]))


@pytest.mark.parametrize("same", [[True, True, False, False], [False, False, True, True]])
def test_eer_of_constant_scores_is_half(same):
    assert equal_error_rate(np.ones(4), np.array(same)) == pytest.approx(0.5)


def test_verification_eer_of_clustered_embeddings_is_zero():
    rng = np.random.default_rng(3)
    centres = torch.eye(8)[:4] * 5.0
    speakers = [s for s in "abcd" for _ in range(6)]
    emb = torch.stack([centres["abcd".index(s)] for s in speakers])
    emb = emb + 0.1 * torch.from_numpy(rng.standard_normal(emb.shape)).float()
    assert verification_eer(emb, speakers) == 0.0


def test_verification_eer_of_random_embeddings_is_about_half():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 32, generator=g)
    speakers = [f"s{i % 10}" for i in range(200)]
    assert abs(verification_eer(emb, speakers) - 0.5) < 0.05


def test_verification_eer_matches_hand_built_trials():
    # 2-D embeddings at angles; speaker a near 0 deg, b near 90 deg, one a-utterance at 80 deg
    angles = {"a1": 0, "a2": 10, "a3": 80, "b1": 90, "b2": 100}
    names = list(angles)
    emb = torch.tensor([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles.values()])
    speakers = [n[0] for n in names]
    scores, same = [], []
    for i, j in itertools.combinations(range(5), 2):
        scores.append(float(np.cos(np.radians(angles[names[i]] - angles[names[j]]))))
        same.append(speakers[i] == speakers[j])
    expected = equal_error_rate(np.array(scores), np.array(same))
    assert verification_eer(emb, speakers) == pytest.approx(expected)
    # 4 target trials (a1a2, a1a3, a2a3, b1b2), 6 non-target; a3 sits next to b1
    assert 0.0 < expected < 0.5


# ------------------------------------------------------------------ privacy ledger


def test_ledger_round_trips_through_lists():
    ledger = PrivacyLedger("rdp", [(1.1, 0.125, 8), (0.9, 0.25, 4), (1.1, 0.125, 16)])
    columns = ledger.to_lists()
    assert columns == {"noise": [1.1, 0.9, 1.1], "rate": [0.125, 0.25, 0.125], "steps": [8, 4, 16]}
    assert all(type(s) is int for s in columns["steps"])
    assert all(type(n) is float for n in columns["noise"])
    restored = PrivacyLedger.from_lists("rdp", columns)
    assert restored == ledger
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)
    assert ledger.epsilon(1e-5) > 0


def test_ledger_from_lists_coerces_types_and_handles_missing_columns():
    restored = PrivacyLedger.from_lists("prv", {"noise": [1], "rate": ["0.5"], "steps": [3.0]})
    assert restored.accountant == "prv"
    assert restored.history == [(1.0, 0.5, 3)]
    assert type(restored.history[0][2]) is int
    assert PrivacyLedger.from_lists("rdp", {}).history == []


def test_empty_ledger_has_spent_nothing():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    assert ledger.to_lists() == {"noise": [], "rate": [], "steps": []}


def test_ledger_epsilon_matches_opacus_accountant():
    history = [(1.0, 0.1, 30), (2.0, 0.05, 100)]
    acct = RDPAccountant()
    acct.history = list(history)
    assert PrivacyLedger("rdp", history).epsilon(1e-5) == pytest.approx(acct.get_epsilon(1e-5))


def test_make_private_continues_the_ledger():
    feats = [torch.randn(40, 60) for _ in range(16)]
    labels = [i % 2 for i in range(16)]
    model = tdnn(n_mels=40, n_speakers=2, channels=16, embedding_dim=8, seed=0)
    loader = make_loader(feats, labels, 50, 4, seed=0)
    ledger = PrivacyLedger("rdp", [(1.3, 0.25, 12)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, dp_model, _, dp_loader = make_private(model=model, optimizer=optimizer, loader=loader, ledger=ledger,
                                                 noise_multiplier=1.3, max_grad_norm=1.0,
                                                 generator=torch.Generator().manual_seed(0))
    try:
        assert engine.accountant.history == [(1.3, 0.25, 12)]
        assert engine.accountant.history is not ledger.history
        assert dp_loader.sample_rate == pytest.approx(1 / len(loader))
    finally:
        dp_model.remove_hooks()


# ------------------------------------------------------------------ LocalTrainer under DP

SMALL = dict(model="tdnn", head_lr=0.0, channels=16, embedding_dim=16, n_mels=40, crop_frames=100, batch_size=8,
             rounds=3, local_epochs=1, dp=True)


def _random_data(n: int, n_speakers: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(40, 120, generator=g) for _ in range(n)]
    return feats, [i % n_speakers for i in range(n)]


def _total_steps(history) -> int:
    return sum(h[2] for h in history)


def test_ledger_epsilon_grows_over_rounds_and_matches_fresh_accountant():
    settings = RunSettings(**SMALL)
    feats, labels = _random_data(64)
    trainer = LocalTrainer(settings, n_speakers=4)
    before_weights = [p.detach().clone() for p in trainer.model.parameters()]

    ledger = PrivacyLedger(settings.accountant)
    epsilons, steps = [], []
    for rnd in range(settings.rounds):
        # carried between rounds the way a client's ledger file carries it
        ledger = PrivacyLedger.from_lists(settings.accountant, ledger.to_lists())
        before = _total_steps(ledger.history)
        loss = trainer.train(feats, labels, ledger, seed=rnd)
        assert np.isfinite(loss) and loss > 0
        steps.append(_total_steps(ledger.history) - before)
        epsilons.append(ledger.epsilon(settings.delta))

    # 64 utterances, batch 8: Poisson sampling at rate 1/8, 8 steps per epoch
    assert steps == [8, 8, 8]
    assert {h[1] for h in ledger.history} == {0.125}
    noises = {h[0] for h in ledger.history}
    assert len(noises) == 1
    noise = noises.pop()
    # calibrated for the whole run: rounds x local epochs at the loader's sampling rate, for
    # the run's epsilon less the scoring back end's share
    assert settings.dpsgd_epsilon == settings.epsilon - settings.backend_privacy < settings.epsilon
    assert noise == pytest.approx(calibrate_noise(settings.dpsgd_epsilon, settings.delta, 0.125,
                                                  settings.rounds * settings.local_epochs, "rdp"))
    assert 0.5 < noise < 2.0

    assert epsilons[0] > 0
    assert epsilons[0] < epsilons[1] < epsilons[2]

    for r in range(3):
        fresh = RDPAccountant()
        fresh.history = [(noise, 0.125, 8)] * (r + 1)  # the concatenated per-round steps
        assert epsilons[r] == pytest.approx(fresh.get_epsilon(settings.delta), rel=1e-9)

    # the whole run stays within the target, and the noise is not wastefully large
    assert epsilons[-1] <= settings.dpsgd_epsilon
    assert epsilons[-1] > 0.9 * settings.dpsgd_epsilon

    # training changed the model in place and left it usable
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_weights, after))
    assert trainer.model(torch.randn(2, 40, 100)).shape == (2, 4)


def test_small_shard_stays_within_target_epsilon():
    # 10 utterances with batch 8: Opacus samples at 1/ceil(10/8) = 1/2 with 2 steps per
    # epoch; the noise must be calibrated for that, not for a rate of 8/10.
    settings = RunSettings(**SMALL)
    feats, labels = _random_data(10, n_speakers=2, seed=1)
    trainer = LocalTrainer(settings, n_speakers=2)
    ledger = PrivacyLedger()
    for rnd in range(settings.rounds):
        trainer.train(feats, labels, ledger, seed=rnd)
    assert {h[1] for h in ledger.history} == {0.5}
    assert ledger.epsilon(settings.delta) <= settings.epsilon


def test_fixed_noise_multiplier_is_used_as_given():
    settings = RunSettings(**{**SMALL, "noise_multiplier": 1.7})
    feats, labels = _random_data(32)
    ledger = PrivacyLedger()
    LocalTrainer(settings, 4).train(feats, labels, ledger, seed=0)
    assert ledger.history == [(1.7, 0.25, 4)]


def test_training_without_dp_leaves_the_ledger_empty():
    settings = RunSettings(**{**SMALL, "dp": False})
    feats, labels = _random_data(32)
    ledger = PrivacyLedger()
    trainer = LocalTrainer(settings, 4)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.train(feats, labels, ledger, seed=0)
    assert np.isfinite(loss)
    assert ledger.history == [] and ledger.epsilon(settings.delta) == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
