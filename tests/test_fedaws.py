"""class-vectors=own (FedAwS): a device trains only its own speakers' class vectors, the
server averages each over its owners and spreads them apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedspeaker.config import RunSettings
from fedspeaker.errors import ConfigError
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.training.local import LocalTrainer
from server.fedaws import CLASS_VECTORS, OwnClassVectors, owners_mean, spread_out
from server.strategies import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _close_vectors(n: int = 26, dim: int = 256, seed: int = 0) -> np.ndarray:
    """Class vectors as GE2E's voiceprints are: all near one direction (cosines ~0.8)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    return common + 0.5 * rng.standard_normal((n, dim)) * np.linalg.norm(common) / np.sqrt(dim)


def _cosines(vectors: np.ndarray) -> np.ndarray:
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return (units @ units.T)[~np.eye(len(units), dtype=bool)]


@pytest.mark.parametrize("ceiling", [0.0, 0.3, 0.5])
def test_spreadout_brings_every_pair_under_the_ceiling_without_collapsing(ceiling: float) -> None:
    vectors = _close_vectors()
    assert _cosines(vectors).min() > 0.6
    spread = spread_out(vectors, ceiling=ceiling, steps=200)
    assert _cosines(spread).max() <= ceiling + 0.02
    np.testing.assert_allclose(np.linalg.norm(spread, axis=1), np.linalg.norm(vectors, axis=1), rtol=1e-9)
    # each vector stays closest to where it was: the speakers keep their own directions
    units = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    assert ((units(spread) @ units(vectors).T).argmax(axis=1) == np.arange(len(vectors))).all()


def test_spreadout_leaves_vectors_already_apart_alone() -> None:
    vectors = _close_vectors()
    np.testing.assert_array_equal(spread_out(vectors, ceiling=1.0), vectors)


def test_a_class_vector_is_the_mean_of_its_owners_only() -> None:
    start = np.zeros((4, 3), np.float32)
    a, b, c = start.copy(), start.copy(), start.copy()
    a[0], b[0], c[2] = 1.0, 3.0, 5.0
    b[2] = 7.0  # b's copy of a row it did not train is not counted
    mean = owners_mean(start, [(a, [0], 1.0), (b, [0], 3.0), (c, [2], 2.0)])
    np.testing.assert_allclose(mean[0], 2.5)  # two owners, weighted 1:3
    np.testing.assert_allclose(mean[2], 5.0)  # not diluted by the devices that did not train it
    np.testing.assert_array_equal(mean[[1, 3]], start[[1, 3]])


@pytest.mark.parametrize("dp", [False, True])
def test_a_device_changes_only_its_own_speakers_class_vectors(dp: bool) -> None:
    torch.set_num_threads(1)
    settings = RunSettings(class_vectors="own", dp=dp, epsilon=8.0, rounds=1, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    feats = [torch.rand(256, 3, generator=gen) for _ in range(16)]
    labels = [2] * 10 + [5] * 6  # a household of two of the 8 training speakers
    trainer = LocalTrainer(settings, n_speakers=8)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(feats, labels, PrivacyLedger(), seed=1)
    after = trainer.model.state_dict()
    changed = (after[CLASS_VECTORS] != before[CLASS_VECTORS]).any(dim=1)
    assert changed.tolist() == [i in (2, 5) for i in range(8)]
    assert not torch.equal(after["projection.weight"], before["projection.weight"])


def test_the_server_sends_each_device_only_its_own_class_vectors_averages_them_by_owner_and_spreads_them(
        ) -> None:
    settings = RunSettings(class_vectors="own", num_clients=2, dp=False)
    strategy = build_strategy(settings)
    assert isinstance(strategy.strategy, OwnClassVectors)
    start = _close_vectors(n=3, dim=8).astype(np.float32)
    sent = ArrayRecord({CLASS_VECTORS: Array(start), "projection.weight": Array(np.zeros(2, np.float32))})

    class TwoNodes:
        """Node 1 holds speaker 0, node 2 speaker 1; they answer the server's query so."""

        queries: list[Message] = []

        def get_node_ids(self) -> list[int]:
            return [1, 2]

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            self.queries += messages
            return [Message(RecordDict({"fedaws": ConfigRecord({"own-classes": [m.metadata.dst_node_id - 1]})}),
                            reply_to=m) for m in messages]

    grid = TwoNodes()

    def train_round() -> list[Message]:
        return list(strategy.configure_train(1, sent, ConfigRecord({"speakers": ["a", "b", "c"]}), grid))

    requests = train_round()
    assert [q.metadata.message_type for q in grid.queries] == ["query.own_classes"] * 2  # asked first
    for request in requests:  # then sent its own row, and none of the others
        received = request.content["arrays"][CLASS_VECTORS].numpy()
        row = request.metadata.dst_node_id - 1
        np.testing.assert_array_equal(received[row], start[row])
        assert not np.delete(received, row, axis=0).any()
    replies = []
    for request in requests:
        node = request.metadata.dst_node_id
        row = node - 1
        mine = np.zeros_like(start)
        mine[row] = -start[row]  # each device turned its own speaker's vector around
        replies.append(Message(content=RecordDict({
            "arrays": ArrayRecord({CLASS_VECTORS: Array(mine),
                                   "projection.weight": Array(np.full(2, float(node), np.float32))}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0}),
            "fedaws": ConfigRecord({"own-classes": [row]})}), reply_to=request))
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["projection.weight"].numpy(), 1.5)  # FedAvg's, as ever
    vectors = arrays[CLASS_VECTORS].numpy()
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert units[0] @ (-start[0]) / np.linalg.norm(start[0]) > 0.5  # the owner's version, undiluted
    assert _cosines(vectors).max() <= settings.spreadout_cosine + 0.02
    train_round()
    assert len(grid.queries) == 2  # nodes heard from are not asked again


def test_a_device_not_sent_its_class_vector_starts_from_the_seeded_initial_one() -> None:
    settings = RunSettings(class_vectors="own", dp=False, batch_size=8, lr=1e-9, head_lr=1e-9)
    trainer = LocalTrainer(settings, n_speakers=4)
    initial = trainer.model.head.weight.detach().clone()
    assert torch.equal(initial, LocalTrainer(settings, n_speakers=4).model.head.weight)  # seeded
    with torch.no_grad():
        trainer.model.head.weight.zero_()  # as sent: nothing known about this device yet
    gen = torch.Generator().manual_seed(0)
    trainer.train([torch.rand(256, 3, generator=gen) for _ in range(4)], [1] * 4, PrivacyLedger(), seed=0)
    after = trainer.model.head.weight.detach()
    torch.testing.assert_close(after[1], initial[1])  # a tiny step from the seeded start
    assert not after[[0, 2, 3]].any()


@pytest.mark.parametrize("changes", [{"model": "tdnn"}, {"device_dp": "server-fixed"}, {"secagg": True},
                                     {"dp_unit": "speaker"}])
def test_own_class_vectors_are_refused_where_they_cannot_work(changes: dict) -> None:
    with pytest.raises(ConfigError, match="class-vectors=own"):
        RunSettings(class_vectors="own", **changes).validate()
