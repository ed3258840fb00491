"""Checkpoints: strategy state survives a restart; a resume with other settings, without
a checkpoint, or with nothing left to do is refused; client ledgers live on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedspeaker.config import RENAMED_OPTIONS, RunSettings, saved_run_config
from fedspeaker.errors import ConfigError, FedSpeakerError
from fedspeaker.privacy.ledger import PrivacyLedger
from server.checkpoint import Checkpoint, restore_strategy_state, strategy_state
from server.strategies import build_strategy, device_epsilon_of
from tests.conftest import EightNodes

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def run_round(strategy, server_round: int, arrays: ArrayRecord, seed: int) -> ArrayRecord:
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), EightNodes()))
    rng = np.random.default_rng(seed)
    replies = [Message(content=RecordDict({
        "arrays": ArrayRecord({"w": Array((arrays["w"].numpy() + rng.standard_normal(4)).astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": 10, "unit-weight": 1})}),
        dst_node_id=m.metadata.dst_node_id, message_type="train") for m in sent]
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


@pytest.mark.parametrize("name,device_dp", [("fedadam", "off"), ("fedavgm", "off"), ("fedavg", "server-fixed")])
def test_a_restored_strategy_goes_on_exactly_like_the_original(name: str, device_dp: str) -> None:
    settings = RunSettings(strategy=name, num_clients=8, device_dp=device_dp)
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    original = build_strategy(settings)
    for r in (1, 2):
        arrays = run_round(original, r, arrays, seed=r)
    state = strategy_state(original)
    restored = build_strategy(settings)
    restore_strategy_state(restored, state)
    np.random.seed(7)  # server-side DP noise comes from numpy's generator
    want = run_round(original, 3, arrays, seed=3)["w"].numpy()
    np.random.seed(7)
    got = run_round(restored, 3, arrays, seed=3)["w"].numpy()
    np.testing.assert_array_equal(got, want)
    if name != "fedavg":  # FedAdam's moments and FedAvgM's momentum change the step: not restoring them shows
        fresh = build_strategy(settings)
        assert not np.array_equal(run_round(fresh, 3, arrays, seed=3)["w"].numpy(), want)
    if device_dp != "off":
        assert device_epsilon_of(restored) == pytest.approx(device_epsilon_of(original))


def checkpoint_for(settings: RunSettings, done: int) -> Checkpoint:
    return Checkpoint(round=done, arrays={"w": np.zeros(2)}, strategy=[], rows=[], seconds=1.0,
                      federation_id="f", run_config=settings.to_run_config())


def test_resume_refuses_other_settings_and_names_them(tmp_path: Path) -> None:
    settings = RunSettings(out_dir=str(tmp_path), rounds=5)
    checkpoint_for(settings, 2).save(tmp_path)
    assert Checkpoint.load(settings.replace(resume=True)).round == 2
    with pytest.raises(ConfigError, match=r"lr \(0.02 then, 0.5 now\)"):
        Checkpoint.load(settings.replace(resume=True, lr=0.5))


def test_a_checkpoint_from_before_the_rename_resumes_under_the_new_names(tmp_path: Path) -> None:
    """Its run config says user-dp, its rows user_epsilon: both read back as device-..."""
    settings = RunSettings(out_dir=str(tmp_path), rounds=5, device_dp="server-fixed", device_clip_norm=0.5)
    old_names = {new: old for old, new in RENAMED_OPTIONS.items()}
    old_config = {old_names.get(k, k): v for k, v in settings.to_run_config().items()}
    Checkpoint(round=2, arrays={"w": np.zeros(2)}, strategy=[], rows=[{"round": 1.0, "user_epsilon": 0.7}],
               seconds=1.0, federation_id="f", run_config=old_config).save(tmp_path)
    checkpoint = Checkpoint.load(settings.replace(resume=True))
    assert checkpoint.rows == [{"round": 1.0, "device_epsilon": 0.7}]


def test_resume_without_checkpoint_or_with_every_round_done(tmp_path: Path) -> None:
    settings = RunSettings(out_dir=str(tmp_path / "run"), rounds=3, resume=True)
    with pytest.raises(ConfigError, match="checkpoint.pt not found"):
        Checkpoint.load(settings)
    (tmp_path / "run").mkdir()
    checkpoint_for(settings, 3).save(tmp_path / "run")
    with pytest.raises(ConfigError, match="are done already"):
        Checkpoint.load(settings)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"half a file")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        Checkpoint.load(settings)


def test_resume_is_refused_with_secagg_and_without_out_dir() -> None:
    with pytest.raises(ConfigError, match="not available with secagg"):
        RunSettings.from_run_config({"resume": True, "secagg": True, "out-dir": "/tmp/x"})
    with pytest.raises(ConfigError, match="needs out-dir"):
        RunSettings.from_run_config({"resume": True})


def test_a_ledger_on_disk_never_silently_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledgers" / "f.json"
    ledger = PrivacyLedger("rdp", [(1.1, 0.1, 30)])
    ledger.save(path)
    assert PrivacyLedger.load(path, "rdp") == ledger
    assert PrivacyLedger.load(tmp_path / "none.json", "rdp").history == []
    path.write_text("{not json")
    with pytest.raises(FedSpeakerError, match="unreadable privacy ledger"):
        PrivacyLedger.load(path, "rdp")


def test_the_checkpoint_keeps_the_release_candidate(tmp_path: Path) -> None:
    settings = RunSettings(out_dir=str(tmp_path), rounds=5)
    checkpoint = checkpoint_for(settings, 3)
    checkpoint.release = {"round": 1, "arrays": {"w": np.array([1.5, -2.0], np.float32)}}
    checkpoint.save(tmp_path)
    release = Checkpoint.load(settings.replace(resume=True)).release
    assert release["round"] == 1 and np.array_equal(release["arrays"]["w"], [1.5, -2.0])
    checkpoint_for(settings, 3).save(tmp_path)  # release=last keeps none
    assert Checkpoint.load(settings.replace(resume=True)).release is None


OLD = Path(__file__).parent / "data" / "checkpoint-v1"  # written at ad8df77 (written_at_ad8df77.py)


class _Nodes(EightNodes):
    """Eight nodes that answer the server's queries: partition ids, FedAwS's own classes."""

    def send_and_receive(self, messages, *, timeout=None):
        def answer(m: Message) -> Message:
            node = m.metadata.dst_node_id
            record = ({"fedaws": ConfigRecord({"own-classes": [node % 3]})}
                      if m.metadata.message_type == "query.own_classes"
                      else {"node": ConfigRecord({"partition-id": node - 1})})
            return Message(RecordDict(record), reply_to=m)
        return [answer(m) for m in messages]


def _round(strategy, server_round: int, arrays: ArrayRecord, seed: int) -> ArrayRecord:
    """The round written_at_ad8df77.py ran: each node adds seeded noise to every array."""
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord({"speakers": ["a", "b", "c"]}),
                                         _Nodes()))
    replies = []
    for m in sent:  # in the order Flower's unseeded sampling gave: each node's noise its own
        node = m.metadata.dst_node_id
        rng = np.random.default_rng([seed, node])
        content = RecordDict({
            "arrays": ArrayRecord({k: Array((a.numpy() + rng.standard_normal(a.numpy().shape)).astype(np.float32))
                                   for k, a in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10 + node, "unit-weight": 1, "train-loss": 1.0})})
        if "head.weight" in arrays:
            content["fedaws"] = ConfigRecord({"own-classes": [node % 3]})
        replies.append(Message(content, reply_to=m))
    return strategy.aggregate_train(server_round, replies)[0]


@pytest.mark.parametrize("name", ["fedadam-device-eval", "fedavg-device-dp-poisson", "fedavgm-own-class-vectors",
                                  "fedavg-server-adaptive"])
def test_a_checkpoint_written_before_explicit_state_resumes_as_that_code_went_on(name: str) -> None:
    """A checkpoint of the old format (every non-function attribute, pickled) loads, and
    round 3 from it is, bit for bit, what the code that wrote it computed."""
    import torch

    expected = torch.load(OLD / "expected.pt", weights_only=False)[name]
    checkpoint = Checkpoint.read(OLD / name)
    # its run config, written before the rename, names device-level DP user-dp
    assert "user-dp" in checkpoint.run_config and "device-dp" not in checkpoint.run_config
    settings = RunSettings.from_run_config(saved_run_config(checkpoint.run_config))
    assert settings.device_dp == expected["settings"].get("user_dp", "off")
    assert checkpoint.check(settings.replace(resume=True, out_dir=str(OLD / name))) is checkpoint  # resumable
    strategy = build_strategy(settings, cohort=lambda arrays: (0.5, torch.zeros(1, 2)),
                              on_counts=lambda server_round, totals: None)
    restore_strategy_state(strategy, checkpoint.strategy)
    np.random.seed(7)
    arrays = _round(strategy, 3, ArrayRecord({k: Array(a) for k, a in checkpoint.arrays.items()}), seed=3)
    assert arrays.keys() == expected["arrays"].keys()
    for key, want in expected["arrays"].items():
        np.testing.assert_array_equal(arrays[key].numpy(), want)
    np.testing.assert_equal(device_epsilon_of(strategy), expected["user_epsilon"])  # the fixture's own key
    if name == "fedadam-device-eval":  # FedAdam's moments were restored: a fresh FedAdam steps otherwise
        fresh = build_strategy(settings, cohort=lambda arrays: (0.5, torch.zeros(1, 2)),
                               on_counts=lambda server_round, totals: None)
        np.random.seed(7)
        moved = _round(fresh, 3, ArrayRecord({k: Array(a) for k, a in checkpoint.arrays.items()}), seed=3)
        assert not np.array_equal(moved["w"].numpy(), expected["arrays"]["w"])
    # and what it saves now is only the state each strategy carries, as plain data
    state = strategy_state(strategy)
    assert all(not callable(v) and not isinstance(v, (RunSettings,)) for d in state for v in d.values())
