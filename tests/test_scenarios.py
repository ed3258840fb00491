"""Scenario roles are seeded and exact; each attack sends what it says."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedspeaker.config import RunSettings
from fedspeaker.training.local import LocalTrainer
from fedspeaker.privacy.ledger import PrivacyLedger
from client.scenarios import client_role, drops_out, flip_labels, poison_update


def test_roles_take_the_configured_share_and_repeat_with_the_seed() -> None:
    settings = RunSettings(num_clients=10, byzantine_fraction=0.2, straggler_fraction=0.3)
    roles = [client_role(settings, i) for i in range(10)]
    assert sum(r.byzantine for r in roles) == 2 and sum(r.straggler for r in roles) == 3
    assert roles == [client_role(settings, i) for i in range(10)]
    other = [client_role(settings.replace(seed=1), i) for i in range(10)]
    assert other != roles
    assert not any(client_role(RunSettings(), i).byzantine for i in range(10))


def test_dropout_rate_matches_the_probability() -> None:
    settings = RunSettings(dropout=0.3)
    draws = [drops_out(settings, c, r) for c in range(20) for r in range(1, 101)]
    assert 0.26 < sum(draws) / len(draws) < 0.34
    assert not any(drops_out(RunSettings(), c, r) for c in range(10) for r in range(1, 20))


def states() -> tuple[OrderedDict, OrderedDict]:
    start = OrderedDict(w=torch.tensor([1.0, 2.0, 3.0]), steps=torch.tensor(4))
    local = OrderedDict(w=torch.tensor([1.5, 1.0, 3.0]), steps=torch.tensor(4))
    return start, local


def test_sign_flip_sends_the_negated_change() -> None:
    start, local = states()
    out = poison_update(start, local, "sign-flip", 10.0, seed=0)
    assert torch.equal(out["w"], torch.tensor([0.5, 3.0, 3.0]))
    assert torch.equal(out["steps"], local["steps"])  # integer buffers pass through


def test_scale_multiplies_the_change() -> None:
    start, local = states()
    out = poison_update(start, local, "scale", 10.0, seed=0)
    assert torch.allclose(out["w"], torch.tensor([6.0, -8.0, 3.0]))


def test_noise_replaces_the_change_with_gaussian_noise() -> None:
    start = OrderedDict(w=torch.zeros(10_000))
    local = OrderedDict(w=torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 0.1)
    out = poison_update(start, local, "noise", 5.0, seed=0)["w"]
    assert abs(float(out.std()) - 5.0 * float(local["w"].std())) < 0.05
    assert abs(float((out * local["w"]).mean())) < 0.01  # unrelated to the honest change


def test_label_flip_renames_every_speaker_of_a_byzantine_client_only() -> None:
    settings = RunSettings(num_clients=10, byzantine_fraction=0.2, attack="label-flip")
    byzantine = [i for i in range(10) if client_role(settings, i).byzantine]
    honest = next(i for i in range(10) if i not in byzantine)
    assert flip_labels(settings, byzantine[0], [0, 1, 2, 5], n_speakers=6) == [5, 4, 3, 0]
    assert flip_labels(settings, honest, [0, 1, 2, 5], n_speakers=6) == [0, 1, 2, 5]
    sign_flip = settings.replace(attack="sign-flip")  # poisons weights, not labels
    assert flip_labels(sign_flip, byzantine[0], [0, 1, 2, 5], n_speakers=6) == [0, 1, 2, 5]


def test_a_straggler_takes_a_quarter_of_the_steps() -> None:
    torch.set_num_threads(1)
    settings = RunSettings(model="tdnn", head_lr=0.0, rounds=1, local_epochs=2, channels=16, embedding_dim=16,
                           crop_frames=40, batch_size=4, epsilon=50.0)
    feats = [torch.randn(40, 50) for _ in range(32)]
    labels = [i % 2 for i in range(32)]

    def steps(fraction: float) -> int:
        ledger = PrivacyLedger()
        LocalTrainer(settings, 2).train(feats, labels, ledger, seed=0, step_fraction=fraction)
        return sum(h[2] for h in ledger.history)

    assert steps(1.0) == 16  # 2 epochs x 8 Poisson batches
    assert steps(0.25) == 4


@pytest.mark.parametrize("key, value", [("dropout", 1.0), ("byzantine-fraction", 1.5),
                                        ("attack", "flood"), ("straggler-steps", 0.0)])
def test_bad_scenario_values_name_the_option(key: str, value: object) -> None:
    from fedspeaker.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{key}"):
        RunSettings.from_run_config({key: value})
