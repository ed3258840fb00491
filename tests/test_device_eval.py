"""Evaluation without central data: a device scores the model on its own held-out audio
and only counts travel; the server sums them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.evaluate import score_on_device
from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.data.partition import client_shards, client_test_shards
from fedspeaker.data.speakers import load_speaker_data, load_split
from fedspeaker.model import build_model
from server.device_eval import DeviceEvaluation

import pytest

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread")


class _Model(torch.nn.Module):
    """Embeds a (channels, frames) input as its first column; the head is the identity."""

    eval_frames = 10
    embedding_dim = 2

    def raw_embed(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0]

    embed = raw_embed  # no scoring back end

    def backend(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def head(self, e: torch.Tensor) -> torch.Tensor:
        return e


def _utt(x: float, y: float) -> torch.Tensor:
    return torch.tensor([[x], [y]])


def test_the_counts_are_what_the_threshold_decides():
    enrol = ([_utt(1, 0), _utt(1, 0.1), _utt(0, 1)], [0, 0, 1])  # speakers 0 and 1
    held_out = ([_utt(1, 0.05), _utt(0.2, 1), _utt(1, 1)], [0, 1, 1])
    cohort = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    counts = score_on_device(_Model(), enrol=enrol, held_out=held_out, cohort=cohort, threshold=0.9)
    assert counts[wire.NUM_EXAMPLES] == 3 and counts[wire.ID_CORRECT] == 2  # (1, 1) is a tie: 0
    assert counts[wire.TARGET_TRIALS] == 3
    assert counts[wire.FALSE_REJECTS] == 1  # (1, 1) against speaker 1's print: cos 0.71 < 0.9
    assert counts[wire.IMPOSTOR_TRIALS] == 6  # 2 voiceprints x 3 cohort embeddings
    assert counts[wire.FALSE_ACCEPTS] == 2  # each print accepts the cohort member at its angle
    nothing = score_on_device(_Model(), enrol=enrol, held_out=([], []), cohort=cohort, threshold=0.9)
    assert set(nothing.values()) == {0}


def test_a_simulated_device_scores_its_held_out_share_and_sends_only_counts(synthetic_corpus, cache_dir):
    from client.app import evaluate

    settings = RunSettings(model="tdnn", head_lr=0.0, data_dir=str(synthetic_corpus.root),
                           cache_dir=str(cache_dir), num_clients=2, partition="iid",
                           channels=16, embedding_dim=8, crop_frames=40, fraction_evaluate=1.0)
    data = load_speaker_data(settings)
    tests = client_test_shards(settings)
    assert sorted(i for shard in tests for i in shard) == list(range(len(data.split.test)))
    for client, shard in enumerate(tests):  # a device's held-out speakers are ones it trains on
        trains_on = {data.split.train[i].speaker for i in client_shards(settings)[client]}
        assert {data.split.test[i].speaker for i in shard} <= trains_on
    model = build_model(settings, data.n_speakers)
    cohort = torch.randn(5, 8)
    msg = Message(content=RecordDict({
        wire.ARRAYS: ArrayRecord(model.state_dict()),
        wire.CONFIG: ConfigRecord({wire.THRESHOLD: 0.5, wire.SPEAKERS: list(data.split.speakers)}),
        wire.COHORT: ArrayRecord({wire.COHORT_EMBEDDINGS: cohort})}), dst_node_id=1, message_type="evaluate")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=settings.to_run_config())
    reply = evaluate(msg, context).content
    assert not reply.array_records  # no model, no embedding, no audio: counts only
    metrics = reply[wire.METRICS]
    assert set(metrics) == set(wire.EVALUATION_COUNTS)
    assert metrics[wire.NUM_EXAMPLES] == len(tests[1]) > 0
    assert metrics[wire.IMPOSTOR_TRIALS] == 5 * len({data.split.test[i].speaker for i in tests[1]}
                                                    | {data.split.train[i].speaker
                                                       for i in client_shards(settings)[1]})


class _Inner:
    """Stands in for the run's strategy: one evaluate message per node, sharing a content."""

    def configure_evaluate(self, server_round, arrays, config, grid):
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
        return [Message(content=content, dst_node_id=n, message_type="evaluate") for n in (1, 2)]


def _reply(**counts: int) -> Message:
    metrics = dict.fromkeys(wire.EVALUATION_COUNTS, 0) | {k.replace("_", "-"): v for k, v in counts.items()}
    msg = Message(content=RecordDict({wire.METRICS: MetricRecord(metrics)}), dst_node_id=1,
                  message_type="evaluate")
    return Message(content=msg.content, reply_to=msg)


def test_the_server_sends_threshold_and_cohort_and_sums_the_counts():
    seen = {}
    wrapper = DeviceEvaluation(_Inner(), cohort=lambda arrays: (0.7, torch.ones(3, 4)),
                               on_counts=lambda rnd, totals: seen.update(totals, round=rnd))
    messages = wrapper.configure_evaluate(2, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord(), grid=None)
    for m in messages:
        assert m.content[wire.CONFIG][wire.THRESHOLD] == 0.7
        assert m.content[wire.COHORT][wire.COHORT_EMBEDDINGS].numpy().shape == (3, 4)
    wrapper.aggregate_evaluate(2, [_reply(num_examples=3, id_correct=2, target_trials=3, false_rejects=1),
                                   _reply(num_examples=1, impostor_trials=6, false_accepts=2)])
    assert seen["round"] == 2 and seen["devices"] == 2
    assert (seen[wire.NUM_EXAMPLES], seen[wire.ID_CORRECT], seen[wire.FALSE_REJECTS],
            seen[wire.IMPOSTOR_TRIALS], seen[wire.FALSE_ACCEPTS]) == (4, 2, 1, 6, 2)
