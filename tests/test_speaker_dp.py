"""Speaker-level DP-SGD (dp-unit=speaker) and the group bound a speaker gets under
utterance-level DP-SGD: one Opacus sample is one speaker, so a speaker with many
utterances moves a step by at most the clipping norm (an utterance-level step lets it
move by one norm per utterance); the gradient clipped is that of the speaker's mean loss
over its windows; the ledger counts speakers; the group bound is the mixture-of-Gaussians
bound the summary states, for the speaker with the most utterances in one client."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.optimizers import DPOptimizer

from fedspeaker.config import RunSettings
from fedspeaker.errors import ConfigError, FedSpeakerError
from fedspeaker.model.ge2e import GE2ESpeakerNet
from fedspeaker.privacy.accounting import GROUP_DISCRETIZATION, GroupBound, group_epsilon
from fedspeaker.privacy.guarantee import guarantee_sentence
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.reporting.run_report import speaker_group_bound
from fedspeaker.privacy.backend_stats import backend_noise_multiplier, release_step
from fedspeaker.training.local import LocalTrainer, dp_plan
from fedspeaker.training.loops import (
    CropDataset,
    PerSpeaker,
    SpeakerDataset,
    fold_per_speaker,
    per_speaker_loss,
    windows_per_speaker,
)

CLIP = 1e-3  # small enough that every gradient here is clipped


def corpus(counts: list[int], channels: int = 256, frames: int = 3) -> tuple[list[torch.Tensor], list[int]]:
    """counts[s] utterances of speaker s: GE2E-like (256, windows) features."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = [], []
    for speaker, n in enumerate(counts):
        centre = torch.randn(channels, 1, generator=gen)
        for _ in range(n):
            feats.append(centre + 0.1 * torch.randn(channels, frames, generator=gen))
            labels.append(speaker)
    return feats, labels


def summed_clipped_gradient(model: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor,
                            windows: int = 0) -> tuple[torch.Tensor, int]:
    """The sum of the clipped per-sample gradients Opacus forms for one step (no noise), and
    how many samples it clipped: per speaker with ``windows``, per utterance without."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    wrapped = GradSampleModule(PerSpeaker(model, windows) if windows else model)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=CLIP,
                            expected_batch_size=1)  # grad = the plain sum of the clipped samples
    loss_fn = per_speaker_loss(model.loss, windows) if windows else model.loss
    optimizer.zero_grad()
    loss_fn(wrapped(batch), labels).backward()
    if windows:
        fold_per_speaker(params, windows)()
    samples = len(params[0].grad_sample)
    optimizer.pre_step()
    total = torch.cat([p.grad.flatten() for p in params]).clone()
    wrapped.remove_hooks()
    return total, samples


def test_a_speaker_item_is_a_fixed_number_of_that_speakers_windows() -> None:
    feats, labels = corpus([5, 1, 2])
    data = SpeakerDataset(feats, labels, frames=1, windows=4)
    assert len(data) == 3
    for j in range(3):
        x, y = data[j]
        assert x.shape == (4, 256, 1) and y == j
        mine = {tuple(f[:, k].tolist()) for f, lab in zip(feats, labels) if lab == j for k in range(3)}
        assert all(tuple(x[w, :, 0].tolist()) in mine for w in range(4))  # only its own windows
    assert windows_per_speaker(3, 64) == 21 and windows_per_speaker(100, 64) == 1


def test_a_speaker_with_many_utterances_moves_a_step_by_at_most_the_clipping_norm() -> None:
    torch.manual_seed(0)
    model = GE2ESpeakerNet(3)
    feats, labels = corpus([40, 2, 3])
    windows = 8
    speakers = SpeakerDataset(feats, labels, frames=1, windows=windows)
    items = [speakers[j] for j in range(3)]
    batch = torch.stack([x for x, _ in items])
    with_heavy, samples = summed_clipped_gradient(model, batch, torch.tensor([0, 1, 2]), windows)
    without, _ = summed_clipped_gradient(model, batch[1:], torch.tensor([1, 2]), windows)
    assert samples == 3  # one clipped sample per speaker, not per window
    moved = (with_heavy - without).norm()
    assert 0.9 * CLIP < moved <= CLIP * (1 + 1e-4)  # clipped, and clipped as one
    # the same data under utterance-level DP-SGD: each of the 40 utterances is clipped on
    # its own, so that speaker moves the step by up to 40 norms (here by most of that)
    crops = CropDataset(feats, labels, frames=1)
    utterances = torch.stack([crops[i][0] for i in range(len(feats))])
    every, samples = summed_clipped_gradient(model, utterances, torch.tensor(labels))
    others, _ = summed_clipped_gradient(model, utterances[40:], torch.tensor(labels[40:]))
    assert samples == 45 and (every - others).norm() > 20 * CLIP


def test_the_gradient_clipped_is_that_of_the_speakers_mean_loss_over_its_windows() -> None:
    torch.manual_seed(1)
    model = GE2ESpeakerNet(2)
    feats, labels = corpus([6, 3])
    speakers = SpeakerDataset(feats, labels, frames=1, windows=5)
    (a, _), (b, _) = speakers[0], speakers[1]
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(PerSpeaker(model, 5))
    per_speaker_loss(model.loss, 5)(wrapped(torch.stack([a, b])), torch.tensor([0, 1])).backward()
    fold_per_speaker(params, 5)()
    folded = torch.cat([p.grad_sample[1].flatten() for p in params])
    wrapped.remove_hooks()
    plain = GE2ESpeakerNet(2)
    plain.load_state_dict(model.state_dict())
    plain.loss(plain(b), torch.ones(5, dtype=torch.long)).backward()  # speaker 1's mean loss alone
    expected = torch.cat([p.grad.flatten() for p in plain.parameters() if p.requires_grad])
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-6)


def test_the_trainer_under_speaker_dp_counts_speakers_in_its_ledger() -> None:
    settings = RunSettings(model="tdnn", head_lr=0.0, noise_multiplier=1.3, local_epochs=2, channels=16,
                           embedding_dim=16, crop_frames=40, batch_size=8, dp_unit="speaker")
    feats = [torch.randn(40, 50) for _ in range(21)]
    labels = [i % 3 for i in range(21)]
    trainer, ledger = LocalTrainer(settings, 3), PrivacyLedger()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(feats, labels, ledger, seed=0)
    # 3 speakers in batches of up to 8: one batch, sample rate 1, one step an epoch
    assert ledger.history == [(1.3, 1.0, 2)] and ledger.unit == "speaker"
    assert tuple(dp_plan(trainer.settings, len(feats), speakers=3)) == (1.3, 1.0, 2)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    restored = PrivacyLedger.from_lists("rdp", ledger.to_lists())
    assert restored == ledger
    # under utterance-level DP-SGD the same data is 21 utterances: 3 batches an epoch
    utterance = LocalTrainer(settings.replace(dp_unit="utterance"), 3)
    assert tuple(dp_plan(utterance.settings, len(feats))) == (1.3, 1 / 3, 6)
    with pytest.raises(ConfigError, match="dp-unit=speaker"):
        dp_plan(trainer.settings, len(feats))  # a budget check that counts only utterances
    with pytest.raises(FedSpeakerError, match="cannot mix"):
        utterance.train(feats, labels, ledger, seed=1)


# ------------------------------------------------------------------ the group bound


def test_the_group_bound_is_the_mixture_of_gaussians_of_the_binomial_count() -> None:
    noise, rate, steps, delta = 1.8, 0.5, 20, 1e-5
    by_hand = {}
    for k in (1, 2, 5):
        acct = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                             value_discretization_interval=GROUP_DISCRETIZATION)
        weights = [math.comb(k, j) * rate ** j * (1 - rate) ** (k - j) for j in range(k + 1)]
        acct.compose(dp_accounting.dp_event.MixtureOfGaussiansDpEvent(noise, list(range(k + 1)), weights), steps)
        by_hand[k] = acct.get_epsilon(delta)
        # a history in several pieces composes to the same as one
        history = [(noise, rate, 5), (noise, rate, 15)]
        assert group_epsilon(history=history, size=k, delta=delta) == pytest.approx(by_hand[k], rel=1e-6)
    assert by_hand[1] < by_hand[2] < by_hand[5]
    # a group of one is the utterance itself: another accountant agrees
    prv = PRVAccountant()
    prv.history = [(noise, rate, steps)]
    assert by_hand[1] == pytest.approx(prv.get_epsilon(delta), rel=0.02)


def test_the_summary_bounds_the_speaker_with_the_most_utterances_in_one_client() -> None:
    settings = RunSettings(noise_multiplier=1.5, batch_size=16, rounds=4)
    parties = [["a"] * 3 + ["b"] * 9, ["c"] * 12 + ["d"] * 10, ["e"] * 5]
    bound = speaker_group_bound(settings, parties, rounds=3)
    plan = tuple(dp_plan(settings, 22))  # that client's DP-SGD: 22 utterances
    releases = [tuple(release_step(backend_noise_multiplier(settings)))] * 2  # and the back end's, rate 1
    assert bound == GroupBound(12, pytest.approx(group_epsilon(history=[plan] * 3 + releases, size=12,
                                                               delta=1e-5)), 1e-5)
    alone = speaker_group_bound(settings.replace(backend=False), parties, rounds=3)
    assert alone == GroupBound(12, pytest.approx(group_epsilon(history=[plan] * 3, size=12, delta=1e-5)), 1e-5)
    assert alone.epsilon < bound.epsilon
    assert speaker_group_bound(settings, [["a", "b"], ["c"]], rounds=3) is None  # nobody has two
    text = guarantee_sentence(settings, 4.0, group=bound)
    assert "the unit is one utterance" in text and "(12 utterances) is protected only at epsilon=" in text
    assert "arXiv:2401.10294" in text
    speaker = guarantee_sentence(settings.replace(dp_unit="speaker"), 4.0)
    assert "speaker-level (epsilon=4.00, delta=1e-05)" in speaker and "the unit is one speaker" in speaker


def test_the_budget_check_plans_by_speakers_as_training_takes_them() -> None:
    from fedspeaker.privacy.ledger import PrivacyLedger
    from fedspeaker.training.local import LocalTrainer

    settings = RunSettings(model="tdnn", head_lr=0.0, dp_unit="speaker", epsilon_budget=5.0, rounds=2,
                           local_epochs=2, batch_size=4, channels=8, embedding_dim=8, crop_frames=20,
                           noise_multiplier=1.0)
    feats = [torch.randn(40, 30) for _ in range(24)]
    labels = [i % 6 for i in range(24)]  # 6 speakers
    trainer = LocalTrainer(settings, 6)
    planned = dp_plan(trainer.settings, len(feats), speakers=len(set(labels)))  # what client/app.py asks
    ledger = PrivacyLedger()
    trainer.train(feats, labels, ledger, seed=0)
    assert [tuple(h) for h in ledger.history] == [tuple(planned)]
    assert planned.sample_rate == pytest.approx(1 / 2)  # 6 speakers in batches of 4 speakers' windows


def test_a_group_sampled_whole_every_step_is_a_gaussian_of_its_size() -> None:
    """With sampling rate 1 (a device holding fewer utterances than a batch) the group's k
    utterances are in every step together: a Gaussian mechanism of sensitivity k."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from fedspeaker.privacy.accounting import group_epsilon

    acct = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acct.compose(dp_accounting.GaussianDpEvent(1.1 / 21), 3)
    got = group_epsilon(history=[(1.1, 1.0, 1)] * 3, size=21, delta=1e-5)
    assert got == pytest.approx(acct.get_epsilon(1e-5), rel=1e-3)
