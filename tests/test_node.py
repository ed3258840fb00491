"""A ClientApp's node is read from Flower's context in one place, with one rule for its
partition id: a simulated node's own, 0 on a device for its seeds, -1 when the server asks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from client.node import LEDGER_FILE, Node
from fedspeaker import wire
from fedspeaker.config import RunSettings


def context(**node_config) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_simulated_node_is_its_partition(tmp_path) -> None:
    node = Node.of(context(**{"partition-id": 3, "num-partitions": 5}))
    settings = RunSettings(cache_dir=str(tmp_path))
    assert node.simulated and node.partition == node.reported_partition == 3 and node.num_partitions == 5
    assert node.policy() is None and node.seeded_noise(settings)
    assert not node.seeded_noise(settings.replace(seeded_noise=False))
    assert node.cache_dir(settings) == tmp_path
    assert node.ledger_path(settings, "fed") == tmp_path / "client-state" / "fed" / "partition-3" / LEDGER_FILE
    assert not node.ledger(settings, "fed").durable  # a simulation has no power cut to survive
    assert Node.of(context()).partition == 0  # a node Flower gave no partition is the only one


def test_a_device_seeds_as_partition_0_and_tells_the_server_minus_1(tmp_path) -> None:
    settings = RunSettings(cache_dir=str(tmp_path / "cache"))
    node = Node.of(context(**{"data-dir": str(tmp_path / "data"), "partition-id": 4}))
    assert not node.simulated and node.partition == 0 and node.reported_partition == -1
    assert not node.seeded_noise(settings)  # a device's noise is its own secret
    assert node.policy() is not None and node.cache_dir(settings) == tmp_path / "cache"
    digest = hashlib.sha256(str((tmp_path / "data").resolve()).encode()).hexdigest()[:16]
    assert node.ledger_path(settings, "fed") == tmp_path / "cache" / "devices" / digest / LEDGER_FILE
    assert node.ledger_path(settings, "other") == node.ledger_path(settings, "fed")  # one for its life
    assert node.ledger(settings, "fed").durable  # synced: a power cut must not forget spent privacy


def test_a_device_keeps_its_state_in_its_own_folder() -> None:
    node = Node.of(context(**{"data-dir": "~/voice", "state-dir": "~/state"}))
    assert node.data_dir == Path.home() / "voice" and node.state_dir == Path.home() / "state"
    assert node.cache_dir(RunSettings()) == Path.home() / "state"
    assert node.ledger_path(RunSettings(), "fed") == Path.home() / "state" / LEDGER_FILE


@pytest.mark.usefixtures("flower_task_identity")
def test_the_partition_query_answers_the_reported_partition() -> None:
    from client.app import partition

    def asked(**node_config) -> int:
        query = Message(RecordDict({}), dst_node_id=1, message_type=wire.QUERY_PARTITION)
        return int(partition(query, context(**node_config)).content[wire.NODE][wire.PARTITION_ID])

    assert asked(**{"partition-id": 2, "num-partitions": 3}) == 2
    assert asked(**{"data-dir": "/tmp/voice", "partition-id": 2}) == -1
