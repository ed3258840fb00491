"""The server keeps a round going when one client sends NaN or infinite weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedspeaker.config import RunSettings
from server.strategies import ScreenedStrategy, build_strategy


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def reply(weights: np.ndarray, examples: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(weights)}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0})})
    return Message(content=content, dst_node_id=7, message_type="train")


def plain_mean(replies, weight_key):
    return MetricRecord({"train-loss": 1.0})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_update_is_dropped_and_named(bad: float, caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy(RunSettings())
    assert isinstance(strategy, ScreenedStrategy)
    poisoned = np.array([1.0, bad, 3.0], dtype=np.float32)
    replies = [reply(np.array([1.0, 2.0, 3.0], np.float32), 10),
               reply(np.array([3.0, 4.0, 5.0], np.float32), 30),
               reply(poisoned, 1000)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    # FedAvg of the two finite updates, weighted 10:30; the poisoned one is gone
    np.testing.assert_allclose(arrays["w"].numpy(), [2.5, 3.5, 4.5])
    assert "NaN or infinite" in caplog.text and "round 1" in caplog.text


def test_all_finite_updates_are_all_averaged() -> None:
    strategy = build_strategy(RunSettings())
    arrays, _ = strategy.aggregate_train(
        2, [reply(np.zeros(2, np.float32), 1), reply(np.full(2, 4.0, np.float32), 3)])
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 3.0])


def test_only_nonfinite_updates_leave_the_model_unchanged() -> None:
    strategy = build_strategy(RunSettings())
    arrays, metrics = strategy.aggregate_train(3, [reply(np.full(2, np.nan, np.float32), 5)])
    assert arrays is None and (metrics["clients"], metrics["dropped"]) == (0, 1)


def test_the_scores_are_cached_only_for_the_same_weights_and_back_end() -> None:
    """A round's cohort threshold and its row score one model once; anything that changes
    the scores (a weight, the back end) changes the key."""
    import torch

    from fedspeaker.model import build_model
    from fedspeaker.model.backend import encoder_fingerprint, install_backend
    from server.app import _model_key

    model = build_model(RunSettings(model="tdnn", channels=16, embedding_dim=8), 4)
    key = _model_key(model)
    assert _model_key(model) == key
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    moved = _model_key(model)
    assert moved != key
    install_backend(model, torch.full((8,), 0.1), encoder_fingerprint(model))
    assert _model_key(model) != moved
