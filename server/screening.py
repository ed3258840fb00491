"""Which training replies reach the aggregation, and in what order.

One broken or hostile client costs its own update, not the round: a reply holding NaN
or infinite weights is dropped, as is (under Flower's server-side clipping, which
divides by the change) one that did not change the model; a client sitting out for its
privacy budget, or refusing the run, sent no weights and is left out.
"""

from __future__ import annotations

import hashlib
from logging import WARNING
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log as flwr_log

from fedspeaker import wire


def in_content_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` in an order set by their content, not by arrival: Flower sums the updates
    in the order given, and float sums depend on it, so a run (or a resumed run) repeats
    bit for bit only this way."""
    return sorted(replies, key=_content_key)


def screen(replies: list[Message], sent: ArrayRecord | None, *, drop_unchanged: bool,
           server_round: int) -> tuple[list[Message], list[Message]]:
    """(kept, dropped): the replies to aggregate, and those with weights left out (each
    named in the log). Replies without weights are in neither."""
    kept, dropped = [], []
    for reply in replies:
        if reply.has_content() and (wire.sent_no_weights(reply.content) or not reply.content.array_records):
            continue  # it spent its privacy budget, or its policy refused the run: no weights
        if drop_unchanged and reply.has_content() and _unchanged(reply.content, sent):
            flwr_log(WARNING, "round %d: left out the update of node %d: it did not change "
                     "the model", server_round, reply.metadata.src_node_id)
            dropped.append(reply)
            continue
        if reply.has_content() and not _all_finite(reply.content):
            flwr_log(WARNING, "round %d: dropped the update of node %d: it holds NaN or "
                     "infinite weights", server_round, reply.metadata.src_node_id)
            dropped.append(reply)
            continue
        kept.append(reply)
    return kept, dropped


def _content_key(reply: Message) -> tuple[bytes, float]:
    """A reply's place in the canonical order: a digest of its weights, then its epsilon
    (what a reply without weights, sitting out, adds to the round's figures)."""
    if not reply.has_content():
        return b"", -1.0
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(reply.content.array_records):
        for key, array in reply.content.array_records[name].items():
            digest.update(key.encode())
            digest.update(array.data)
    metrics = next(iter(reply.content.metric_records.values()), {})
    epsilon = float(metrics.get(wire.EPSILON, -1.0))
    return digest.digest(), epsilon if epsilon == epsilon else -1.0


def _unchanged(content: RecordDict, sent: ArrayRecord | None) -> bool:
    if sent is None:
        return False
    return all(
        all(np.array_equal(array.numpy(), sent[key].numpy()) for key, array in record.items()
            if key in sent)
        for record in content.array_records.values()
    )


def _all_finite(content: RecordDict) -> bool:
    return all(
        np.isfinite(array.numpy()).all()
        for record in content.array_records.values()
        for array in record.values()
    )
