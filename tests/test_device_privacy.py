"""Privacy the device enforces: noise only it knows, one ledger for its whole life, and a
policy that no run config can switch off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import ConfigError
from fedspeaker.evaluation.scoring import EvaluationSet
from fedspeaker.model import build_model
from fedspeaker.privacy.dpsgd import make_private
from fedspeaker.privacy.guarantee import guarantee_sentence
from fedspeaker.privacy.ledger import DeviceLedger, DPSteps, PrivacyLedger, epsilon_of
from fedspeaker.privacy.noise import noise_generator
from fedspeaker.privacy.policy import DevicePolicy, device_policy
from fedspeaker.reporting.run_report import refusals, run_summary
from fedspeaker.training.local import LocalTrainer, round_seed

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread")


def small(corpus_root: Path, cache_dir: Path, **changes) -> RunSettings:
    return RunSettings(model="tdnn", head_lr=0.0, data_dir=str(corpus_root), cache_dir=str(cache_dir),
                       num_clients=1, partition="iid", noise_multiplier=1.0, rounds=3, local_epochs=1,
                       channels=16, embedding_dim=16, crop_frames=40, batch_size=8, **changes)


def device(settings: RunSettings, data_dir: Path, state_dir: Path, **node) -> Context:
    """A deployed SuperNode's context: its own recordings and state folder."""
    return Context(run_id=7, node_id=1, node_config={"data-dir": str(data_dir), "state-dir": str(state_dir), **node},
                   state=RecordDict(), run_config=settings.to_run_config())


def train_message(settings: RunSettings, speakers: list[str], server_round: int, federation: str) -> Message:
    model = build_model(settings, len(speakers))
    torch.manual_seed(0)
    return Message(content=RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({wire.SERVER_ROUND: server_round, wire.SPEAKERS: speakers,
                                wire.FEDERATION_ID: federation})}), dst_node_id=1, message_type="train")


def weights(reply: Message) -> torch.Tensor:
    state = reply.content["arrays"].to_torch_state_dict()
    return torch.cat([t.flatten().float() for t in state.values()])


def test_two_devices_with_the_same_config_and_data_draw_different_noise_nobody_can_regenerate(
        synthetic_corpus, cache_dir, tmp_path):
    from client.app import train

    settings = small(synthetic_corpus.root, cache_dir)
    speakers = synthetic_corpus.speakers
    replies = [train(train_message(settings, speakers, 1, "fed"),
                     device(settings, synthetic_corpus.root, tmp_path / name)) for name in ("phone", "car")]
    assert not torch.equal(weights(replies[0]), weights(replies[1]))

    # what a server holding the run config would compute: the seeded run, bit for bit
    from client.data import training_examples
    from client.node import Node

    phone = Node.of(device(settings, synthetic_corpus.root, tmp_path / "phone"))
    feats, labels = training_examples(settings, phone, speakers)
    guessed = []
    for _ in range(2):
        trainer = LocalTrainer(settings, len(speakers))
        trainer.model.load_state_dict(train_message(settings, speakers, 1, "fed").content["arrays"]
                                      .to_torch_state_dict())
        trainer.train(feats, labels, PrivacyLedger(), seed=round_seed(settings.seed, 0, 1), seeded_noise=True)
        guessed.append(torch.cat([t.flatten().float() for t in trainer.model.state_dict().values()]))
    assert torch.equal(guessed[0], guessed[1])  # seeded noise does repeat...
    assert not any(torch.equal(guessed[0], weights(r)) for r in replies)  # ...but no device used it


def test_a_simulated_client_keeps_seeded_noise_only_when_the_run_asks(synthetic_corpus, cache_dir):
    from client.app import train

    def twice(settings: RunSettings) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for run in ("a", "b"):  # separate ledgers, same round
            context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                              state=RecordDict(), run_config=settings.to_run_config())
            speakers = list(load_speaker_data(settings).split.speakers)
            out.append(weights(train(train_message(settings, speakers, 1, run), context)))
        return out[0], out[1]

    assert torch.equal(*twice(small(synthetic_corpus.root, cache_dir, seeded_noise=True)))
    assert not torch.equal(*twice(small(synthetic_corpus.root, cache_dir, seeded_noise=False)))


def test_the_privacy_sentence_says_where_the_noise_came_from():
    settings = RunSettings()
    seeded = guarantee_sentence(settings, 7.9)
    assert "seeded from the run config" in seeded and "regenerate" in seeded
    for text in (guarantee_sentence(settings, 7.9, simulated=False),
                 guarantee_sentence(settings.replace(seeded_noise=False), 7.9)):
        assert "operating system's entropy" in text and "seeded from the run config" not in text
    assert "lifetime epsilon of at most 12.50" in guarantee_sentence(settings, 7.9, simulated=False,
                                                                     lifetime_epsilon=12.5)
    server = guarantee_sentence(settings.replace(dp=False, device_dp="server-fixed"), math.nan, 3.0)
    assert "not against the server" in server


def test_the_device_noise_keeps_the_dp_sgd_noise_scale():
    """Hardened draws (four Gaussians summed, halved) from the device's own generator:
    the noise std is still noise multiplier x clipping norm."""
    model = torch.nn.Linear(200, 100)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 200),
                                                                        torch.zeros(8, 100)), batch_size=4)
    _, _, dp_optimizer, dp_loader = make_private(model=model, optimizer=optimizer, loader=loader,
                                                 ledger=PrivacyLedger(), noise_multiplier=1.3,
                                                 max_grad_norm=0.5, generator=noise_generator(None))
    assert dp_optimizer.secure_mode and dp_loader.batch_sampler.generator is dp_optimizer.generator
    for p in model.parameters():
        p.summed_grad = torch.zeros_like(p)
    dp_optimizer.add_noise()
    noise = model.weight.grad.flatten()
    assert noise.std().item() == pytest.approx(1.3 * 0.5, rel=0.03)
    assert abs(noise.mean().item()) < 0.02


def test_a_second_run_on_the_same_device_continues_its_lifetime_ledger(synthetic_corpus, cache_dir, tmp_path):
    from client.app import train

    settings = small(synthetic_corpus.root, cache_dir)
    phone = tmp_path / "phone"
    first = [train(train_message(settings, synthetic_corpus.speakers, r, "federation-a"),
                   device(settings, synthetic_corpus.root, phone)).content["metrics"] for r in (1, 2)]
    second = train(train_message(settings, synthetic_corpus.speakers, 1, "federation-b"),
                   device(settings, synthetic_corpus.root, phone)).content["metrics"]
    assert second[wire.EPSILON] == pytest.approx(first[0][wire.EPSILON])  # the run's own epsilon
    assert second[wire.LIFETIME_EPSILON] > first[1][wire.LIFETIME_EPSILON] > first[1][wire.EPSILON] - 1e-9
    ledger = json.loads((phone / "privacy-ledger.json").read_text())
    assert sorted(ledger["runs"]) == ["federation-a", "federation-b"]
    history = [(n, r, s) for run in ledger["runs"].values()
               for n, r, s in zip(run["noise"], run["rate"], run["steps"])]
    assert second[wire.LIFETIME_EPSILON] == pytest.approx(epsilon_of("rdp", history, settings.delta))


def test_the_lifetime_ledger_counts_a_resumed_run_once_and_folds_in_old_ledgers(tmp_path):
    old = PrivacyLedger("rdp", [(1.1, 0.1, 30)])
    old.save(tmp_path / "ledgers" / "before.json")  # the older one-file-per-federation layout
    ledger = DeviceLedger(tmp_path / "privacy-ledger.json")
    run = ledger.open("now", "rdp")
    assert run.history == [] and run.earlier == [(1.1, 0.1, 30)]
    run.history = [(1.0, 0.2, 10)]
    ledger.record("now", run)
    again = ledger.open("now", "rdp")  # a resumed run: its own steps, once
    assert again.history == [(1.0, 0.2, 10)] and again.earlier == [(1.1, 0.1, 30)]
    assert again.lifetime_epsilon(1e-5) == pytest.approx(epsilon_of("rdp", [(1.1, 0.1, 30), (1.0, 0.2, 10)], 1e-5))
    (tmp_path / "privacy-ledger.json").write_text("{broken")
    with pytest.raises(Exception, match="unreadable privacy ledger"):
        ledger.open("now", "rdp")


def test_a_device_whose_policy_requires_dp_refuses_a_run_without_it(synthetic_corpus, cache_dir, tmp_path):
    from client.app import train

    settings = small(synthetic_corpus.root, cache_dir, dp=False)
    reply = train(train_message(settings, synthetic_corpus.speakers, 1, "fed"),
                  device(settings, synthetic_corpus.root, tmp_path / "phone"))
    assert "arrays" not in reply.content  # no update leaves the device
    reason = wire.refusal(reply.content)
    assert reason.startswith("dp-off:") and "policy" in reason
    # a device that chose otherwise, in its own file, trains
    (tmp_path / "lax").mkdir()
    (tmp_path / "lax" / "privacy-policy.toml").write_text("require-dp = false\n")
    reply = train(train_message(settings, synthetic_corpus.speakers, 1, "fed"),
                  device(settings, synthetic_corpus.root, tmp_path / "lax"))
    assert "arrays" in reply.content and wire.refusal(reply.content) is None


def test_a_policy_refuses_less_protection_or_a_passed_lifetime_cap_with_the_reason():
    settings = RunSettings(noise_multiplier=1.0)
    plan = DPSteps(1.0, 0.1, 10)
    policy = DevicePolicy()
    assert policy.refusal(settings, PrivacyLedger(), plan) is None
    assert policy.refusal(settings.replace(delta=1e-3), PrivacyLedger(), plan).startswith("delta:")
    assert DevicePolicy(min_unit="speaker").refusal(settings, PrivacyLedger(), plan).startswith("unit:")
    assert DevicePolicy(max_clipping_norm=0.5).refusal(settings, PrivacyLedger(), plan).startswith("clipping:")
    heavy = DPSteps(0.5, 0.5, 200)
    assert policy.refusal(settings, PrivacyLedger(), heavy).startswith("epsilon:")
    spent = PrivacyLedger(earlier=[(0.6, 0.5, 400)] * 6)  # other runs on the same recordings
    assert policy.refusal(settings, spent, plan).startswith("lifetime:")
    assert DevicePolicy(lifetime_epsilon=1e6).refusal(settings, spent, plan) is None


def test_a_bad_policy_file_is_a_clear_error_and_the_node_config_names_the_policy(tmp_path):
    (tmp_path / "privacy-policy.toml").write_text("max-epsilon = 2\n")
    assert device_policy({}, tmp_path).max_epsilon == 2.0
    assert device_policy({}, None) == DevicePolicy()
    named = tmp_path / "mine.toml"
    named.write_text('min-unit = "speaker"\n')
    assert device_policy({"privacy-policy": str(named)}, tmp_path).min_unit == "speaker"
    with pytest.raises(ConfigError, match="no such file"):
        device_policy({"privacy-policy": str(tmp_path / "gone.toml")}, tmp_path)
    for text, match in (("max-epsilon = \"lots\"\n", "must be float"), ("dp = false\n", "unknown privacy-policy key"),
                        ("min-unit = \"device\"\n", "min-unit"), ("max-epsilon = [\n", "unreadable")):
        named.write_text(text)
        with pytest.raises(ConfigError, match=match):
            device_policy({"privacy-policy": str(named)}, tmp_path)


def test_the_server_leaves_policy_refusals_out_and_counts_them_by_reason():
    from server.app import RoundTracker
    from server.client_metrics import train_metrics
    from server.strategies import build_strategy

    trained = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                          "metrics": MetricRecord({"num-examples": 4, "train-loss": 1.0, "epsilon": 2.0,
                                                   wire.LIFETIME_EPSILON: 9.0})})

    def refused(reason: str) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": 0}),
                           wire.REFUSAL: ConfigRecord({wire.REASON: reason})})

    tracker = RoundTracker(RunSettings(), data=None, model=None, report=None)
    replies = [trained, refused("dp-off: no"), refused("dp-off: no"), refused("lifetime: cap")]
    tracker.observe_replies(1, replies, [1, 2, 3, 4], train_metrics(replies, wire.NUM_EXAMPLES))
    m = tracker.client_metrics
    assert (m["clients"], m["refused"], m["refused_dp_off"], m["refused_lifetime"]) == (1, 3, 2, 1)
    assert m["lifetime_epsilon_max"] == 9.0
    assert refusals([m, {"refused_dp_off": 1.0}]) == {"dp-off": 3, "lifetime": 1}

    strategy = build_strategy(RunSettings(), None)
    arrays, _ = strategy.aggregate_train(1, [Message(content=trained, dst_node_id=3, message_type="train"),
                                             Message(content=refused("unit: x"), dst_node_id=4, message_type="train")])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0])


def test_a_deployment_summary_carries_no_simulated_group_bound(synthetic_corpus, cache_dir):
    settings = small(synthetic_corpus.root, cache_dir)
    data = load_speaker_data(settings)
    evaluation = EvaluationSet.of(data, settings)
    rows = [{"round": 0.0, "accuracy": 0.1, "eer": 0.4, "val_frr": 0.5},
            {"round": 1.0, "accuracy": 0.2, "eer": 0.3, "val_frr": 0.4, "epsilon_max": 1.5, "epsilon_mean": 1.5,
             "lifetime_epsilon_max": 4.0}]
    simulated = run_summary(settings, data, rows, 1.0, mode="federated", evaluation=evaluation)
    deployed = run_summary(settings, data, rows, 1.0, mode="federated", evaluation=evaluation, simulated=False)
    assert "A speaker is a group of utterances" in simulated["privacy"]
    assert "group" not in deployed["privacy"]
    assert "lifetime epsilon of at most 4.00" in deployed["privacy"]
    assert deployed["lifetime_epsilon_max"] == 4.0


def test_a_round_asked_again_after_a_server_crash_is_answered_again_and_spends_no_more_ledger(
        synthetic_corpus, cache_dir, tmp_path):
    from client.app import train

    settings = small(synthetic_corpus.root, cache_dir)
    phone = device(settings, synthetic_corpus.root, tmp_path / "phone")
    first = train(train_message(settings, synthetic_corpus.speakers, 1, "fed"), phone)
    again = train(train_message(settings, synthetic_corpus.speakers, 1, "fed"), phone)  # a resumed run
    assert torch.equal(weights(first), weights(again))
    assert again.content["metrics"][wire.EPSILON] == first.content["metrics"][wire.EPSILON]
    runs = json.loads((tmp_path / "phone" / "privacy-ledger.json").read_text())["runs"]
    assert PrivacyLedger.from_lists("rdp", runs["fed"]).epsilon(settings.delta) == pytest.approx(
        first.content["metrics"][wire.EPSILON])  # the ledger holds one round's steps, not two
    nxt = train(train_message(settings, synthetic_corpus.speakers, 2, "fed"), phone)  # a new round trains
    assert nxt.content["metrics"][wire.EPSILON] > first.content["metrics"][wire.EPSILON]


def test_a_durable_ledger_syncs_and_a_simulated_one_does_not(tmp_path: Path, monkeypatch) -> None:
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    from fedspeaker.privacy.ledger import DeviceLedger, PrivacyLedger

    for durable in (True, False):
        synced.clear()
        ledger = DeviceLedger(tmp_path / str(durable) / "privacy-ledger.json", durable=durable)
        ledger.record("fed", PrivacyLedger("rdp", history=[(1.0, 0.1, 10)]))
        assert ledger.open("fed", "rdp").history == [(1.0, 0.1, 10)]  # written either way
        assert bool(synced) == durable
