"""The scoring back end: what devices release, its privacy, and where it may be applied."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.backend import backend_statistics
from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError, ModelError
from fedspeaker.evaluation.metrics import eer_operating_point
from fedspeaker.model import build_model
from fedspeaker.model.backend import encoder_fingerprint, install_backend, mean_of_sums
from fedspeaker.model.bundle import SpeakerModel, save_bundle
from fedspeaker.privacy.backend_stats import (SENSITIVITY, backend_noise_multiplier, clipped_sums,
                                              noised)
from fedspeaker.privacy.ledger import PrivacyLedger, epsilon_of
from fedspeaker.training.local import dp_plan
from server.backend import Collected, combine, device_level_noise

DIM = 256


def _states(n: int, seed: int) -> torch.Tensor:
    """GE2E model inputs (frozen LSTM states): (n, 256, 3 windows)."""
    return torch.randn(n, DIM, 3, generator=torch.Generator().manual_seed(seed))


def _shifted_corpus(speakers: int, per_speaker: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Unit embeddings of a population far from the encoder's training domain: every
    speaker's direction plus one large shared offset (the domain), plus session noise."""
    domain = 2.0 * F.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(99)), dim=0)
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(speakers, DIM, generator=g), dim=1)
    labels = [s for s in range(speakers) for _ in range(per_speaker)]
    raw = domain + centres[labels] + 2.0 * torch.randn(len(labels), DIM, generator=g) / math.sqrt(DIM)
    return F.normalize(raw, dim=1), labels


def _eer(embeddings: torch.Tensor, labels: list[int]) -> float:
    unit = F.normalize(embeddings, dim=1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = (unit[i] * unit[j]).sum(dim=1)
    target = torch.tensor([labels[a] == labels[b] for a, b in zip(i.tolist(), j.tolist())])
    return eer_operating_point(scores, target)[0]


def test_the_back_end_lowers_eer_on_a_domain_shift():
    """Devices' sums of a shifted population's embeddings, turned into a mean and
    subtracted, separate unseen speakers of that population better than raw cosine."""
    train, train_labels = _shifted_corpus(20, 10, seed=1)
    unseen, unseen_labels = _shifted_corpus(8, 6, seed=2)  # the same domain, other speakers
    devices = [clipped_sums(train[k::4], train_labels[k::4], "utterance") for k in range(4)]
    mean = mean_of_sums(sum(d.total for d in devices), sum(d.count for d in devices))
    centred = F.normalize(unseen - mean, dim=1)
    raw_eer, centred_eer = _eer(unseen, unseen_labels), _eer(centred, unseen_labels)
    assert centred_eer < 0.75 * raw_eer, (raw_eer, centred_eer)


def test_a_device_sends_the_clipped_sum_it_claims():
    """Without DP: each utterance's unit embedding under the sent model, summed, and the
    count, recomputed here; under dp-unit=speaker one mean per speaker."""
    settings = RunSettings(dp=False)
    model = build_model(settings, 4)
    feats, labels = list(_states(9, seed=3)), [0, 0, 1, 1, 1, 2, 2, 3, 3]
    sums, metrics = backend_statistics(settings, model, feats, labels, PrivacyLedger())
    unit = F.normalize(torch.stack([model.raw_embed(f[None])[0] for f in feats]).detach(), dim=1)
    assert torch.allclose(sums.total, unit.sum(dim=0), atol=1e-5) and sums.count == metrics["count"] == 9
    per_speaker = clipped_sums(unit, labels, "speaker")
    assert per_speaker.count == 4
    expected = sum(unit[[i for i, l in enumerate(labels) if l == s]].mean(dim=0) for s in range(4))
    assert torch.allclose(per_speaker.total, expected, atol=1e-5)
    assert clipped_sums(unit * 7, labels, "device").total.norm() <= 1 + 1e-6  # clipped, whatever the scale


def test_noise_has_the_scale_the_accountant_is_told():
    """The device's Gaussian noise on (sum, count) has std sqrt(2) * z, where z is the noise
    multiplier its ledger records; over 400 draws with a fixed generator the sample std
    is within 5 % of it, and the count's noise too."""
    settings = RunSettings()  # sample-level DP, epsilon 8, back end on
    z = backend_noise_multiplier(settings)
    exact = clipped_sums(F.normalize(torch.randn(30, DIM), dim=1), list(range(30)), "utterance")
    g = torch.Generator().manual_seed(0)
    draws = [noised(exact, z, g) for _ in range(400)]
    sum_noise = torch.stack([d.total - exact.total for d in draws])
    count_noise = np.array([d.count - exact.count for d in draws])
    assert abs(float(sum_noise.std()) / (SENSITIVITY * z) - 1) < 0.05
    assert abs(count_noise.std() / (SENSITIVITY * z) - 1) < 0.15  # 400 draws of one coordinate
    ledger = PrivacyLedger()
    model = build_model(settings, 3)
    backend_statistics(settings, model, list(_states(5, seed=4)), [0, 1, 2, 0, 1], ledger)
    assert ledger.history == [(z, 1.0, 1)]


def test_the_ledger_counts_the_release_and_the_split_keeps_the_run_within_epsilon():
    settings = RunSettings()
    ledger = PrivacyLedger()
    model = build_model(settings, 3)
    before = ledger.epsilon(settings.delta)
    _, metrics = backend_statistics(settings, model, list(_states(5, seed=5)), [0, 1, 2, 0, 1], ledger)
    assert before == 0 and ledger.epsilon(settings.delta) > 0
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon(settings.delta))
    # both releases alone spend at most the back end's share, and with the whole DP-SGD plan
    # of a client the run stays within epsilon
    z = backend_noise_multiplier(settings)
    releases = [(z, 1.0, 1)] * settings.backend_releases
    assert epsilon_of("rdp", releases, settings.delta) <= settings.backend_privacy + 1e-3
    whole = releases + [tuple(dp_plan(settings, 80))] * settings.rounds
    assert settings.dpsgd_epsilon < epsilon_of("rdp", whole, settings.delta) <= settings.epsilon


def test_a_client_past_its_budget_releases_nothing():
    settings = RunSettings(epsilon_budget=0.1)
    sums, metrics = backend_statistics(settings, build_model(settings, 3), list(_states(3, seed=6)),
                                       [0, 1, 2], PrivacyLedger())
    assert sums is None and metrics[wire.SAT_OUT] == 1


def test_a_back_end_is_refused_by_a_model_with_other_weights(tmp_path):
    settings = RunSettings(dp=False)
    model = build_model(settings, 3)
    fingerprint = encoder_fingerprint(model)
    other = build_model(settings, 3)
    with torch.no_grad():
        other.projection.bias.add_(0.01)
    with pytest.raises(ModelError, match="computed from encoder weights"):
        install_backend(other, torch.full((DIM,), 0.1), fingerprint)
    install_backend(model, torch.full((DIM,), 0.1), fingerprint)
    x = _states(2, seed=7)
    assert not torch.allclose(model.embed(x), model.raw_embed(x))
    # loading other weights drops it; loading the same keeps it
    model.load_state_dict(model.state_dict())
    assert model.backend.active
    model.load_state_dict(other.state_dict())
    assert not model.backend.active and torch.equal(model.embed(x), model.raw_embed(x))
    # a saved model whose back end does not match its weights is refused with a clear error
    install_backend(other, torch.full((DIM,), 0.1), encoder_fingerprint(other))
    fresh = build_model(settings, 3)
    bundle = {"state_dict": fresh.state_dict(), "backend": other.backend.to_dict(), "speakers": ["a", "b", "c"],
              "settings": settings.to_run_config(), "verification": None}
    save_bundle(bundle, tmp_path / "global_model.pt")
    with pytest.raises(FedSpeakerError, match="computed from encoder weights"):
        SpeakerModel.load(tmp_path / "global_model.pt")
    bundle["backend"] = {"mean": torch.full((DIM,), 0.1), "fingerprint": fingerprint}
    save_bundle(bundle, tmp_path / "global_model.pt")
    loaded = SpeakerModel.load(tmp_path / "global_model.pt")
    assert loaded.model.backend.active and torch.allclose(loaded.model.embed(x), F.normalize(
        F.normalize(fresh.raw_embed(x), dim=1) - 0.1, dim=1), atol=1e-6)


def _query() -> Message:
    return Message(RecordDict({}), dst_node_id=1, message_type=wire.QUERY_BACKEND)


def _reply(total: torch.Tensor, count: float, fingerprint: str, **metrics: float) -> Message:
    return Message(RecordDict({wire.BACKEND: ArrayRecord({wire.BACKEND_SUM: total}),
                               wire.METRICS: MetricRecord({wire.BACKEND_COUNT: count, **metrics}),
                               wire.CONFIG: ConfigRecord({wire.FINGERPRINT: fingerprint})}), reply_to=_query())


@pytest.mark.usefixtures("flower_task_identity")
def test_the_server_counts_only_devices_that_answered_under_its_weights():
    ones = torch.ones(DIM)
    sat_out = Message(RecordDict({wire.METRICS: MetricRecord({wire.SAT_OUT: 1, wire.EPSILON: 7.5}),
                                  wire.CONFIG: ConfigRecord({wire.FINGERPRINT: "f"})}), reply_to=_query())
    from flwr.app import Error

    failed = Message(Error(0, "device failed"), reply_to=_query())
    replies = [_reply(ones, 10.0, "f", epsilon=2.0), _reply(3 * ones, 30.0, "f", epsilon=3.0),
               _reply(100 * ones, 5.0, "stale"), sat_out, failed]
    collected = combine(replies, "f")
    assert collected.devices == 2 and collected.sums.count == 40.0
    assert torch.equal(collected.sums.total, 4 * ones) and collected.epsilon_max == 3.0 and collected.epsilon_mean == 2.5
    with pytest.raises(FedSpeakerError, match="no device answered"):
        combine([sat_out, failed], "f")


def test_device_level_noise_is_added_once_with_the_device_noise_multiplier():
    """Under device-level DP each device sends one vector of norm <= 1 (its mean) and the
    server adds Gaussian noise of std device-noise-multiplier to the sum, once."""
    vectors = F.normalize(torch.randn(40, DIM), dim=1)
    device = clipped_sums(vectors, [0] * 40, "device")
    assert device.count == 1 and float(device.total.norm()) <= 1 + 1e-6
    exact = Collected(clipped_sums(vectors, [0] * 40, "utterance"), 5, float("nan"), float("nan"))
    g = torch.Generator().manual_seed(0)
    noise = torch.stack([device_level_noise(exact, 0.8, g).sums.total - exact.sums.total for _ in range(200)])
    assert abs(float(noise.std()) / 0.8 - 1) < 0.05
    assert device_level_noise(exact, 0.8, g).sums.count == exact.sums.count


@pytest.mark.usefixtures("flower_task_identity")
def test_a_device_policy_decides_whether_the_back_end_statistics_leave():
    """backend-statistics = false sends nothing; require-dp (the default) refuses a run
    without DP the raw sums too; a policy that accepts the run lets the noised sums go."""
    from fedspeaker.privacy.policy import DevicePolicy

    feats, labels = list(_states(4, seed=8)), [0, 1, 2, 0]
    for settings, policy, refused in ((RunSettings(), DevicePolicy(backend_statistics=False), "backend:"),
                                      (RunSettings(dp=False), DevicePolicy(), "dp-off:"),
                                      (RunSettings(), DevicePolicy(), None)):
        ledger = PrivacyLedger()
        sums, metrics = backend_statistics(settings, build_model(settings, 3), feats, labels, ledger,
                                           refusal=lambda step: policy.backend_refusal(settings, ledger, step))
        if refused:
            assert sums is None and str(metrics[wire.REFUSAL]).startswith(refused) and not ledger.history
        else:
            assert sums is not None and len(ledger.history) == 1
    refusal = Message(RecordDict({wire.REFUSAL: ConfigRecord({wire.REASON: "backend: no"})}), reply_to=_query())
    collected = combine([refusal, _reply(torch.ones(DIM), 2.0, "f")], "f")
    assert collected.refused == 1 and collected.devices == 1


def test_under_device_level_dp_the_back_end_spends_its_own_share_not_the_rounds_noise():
    """Device-level DP: the server's noise on the devices' sum is calibrated so that the
    back end's releases (every device in each) alone spend backend-epsilon (default
    epsilon/8), whatever noise multiplier the rounds use."""
    from fedspeaker.privacy.backend_stats import device_backend_noise_multiplier

    for share in (0.0, 2.0):
        settings = RunSettings(dp=False, device_dp="server-fixed", device_noise_multiplier=1.0, backend_epsilon=share)
        z = device_backend_noise_multiplier(settings)
        spent = epsilon_of("rdp", [(z, 1.0, 1)] * settings.backend_releases, settings.delta)
        assert spent == pytest.approx(settings.backend_share, rel=0.02) and z > settings.device_noise_multiplier
