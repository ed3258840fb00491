"""What a round's clients reported, summed up for its row: Flower's train-metrics hook.

Flower's strategies sum their train replies' MetricRecords with a ``train_metrics_aggr_fn``
(by default the weighted mean of every value). A round's row needs other sums: the
largest epsilon any client has reached, not a mean; the trainers' loss weighted by their
examples, whatever the strategy weights updates by; the bytes uploaded. And it needs them
over every reply: Flower's Krum, MultiKrum and Bulyan call the hook with the updates they
select, and a reply without weights (sat out, refused) never reaches a strategy. So the
ScreenedStrategy calls :func:`train_metrics` over every reply, before it screens them,
and returns it to Flower as the round's train metrics.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from flwr.app import MetricRecord, RecordDict

from fedspeaker import wire


def train_metrics(contents: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's ``train_metrics_aggr_fn`` for a round's row: :func:`client_figures` of the
    replies that did not refuse the run, the bytes of every reply's weights, and the
    refusals by kind. The loss is weighted by examples whatever ``weighting_metric_name``
    says: it reports the trainers, not the aggregate."""
    refusals = [reason for c in contents if (reason := wire.refusal(c)) is not None]
    metrics = [next(iter(c.metric_records.values())) for c in contents
               if wire.refusal(c) is None and c.metric_records]
    return MetricRecord({**client_figures(metrics, upload_bytes=sum(map(_array_bytes, contents))),
                         **refusal_counts(refusals)})


def client_figures(metrics: Sequence[Mapping], upload_bytes: float) -> dict[str, float]:
    """Loss (weighted by examples, as Flower does), max/mean epsilon, who sat out for
    budget, summed client time, bytes uploaded."""
    eps = [float(m[wire.EPSILON]) for m in metrics if wire.EPSILON in m]
    lifetime = [float(m[wire.LIFETIME_EPSILON]) for m in metrics if wire.LIFETIME_EPSILON in m]
    trained = [m for m in metrics if not m.get(wire.SAT_OUT, 0)]
    examples = sum(float(m.get(wire.NUM_EXAMPLES, 0)) for m in trained)
    loss = sum(float(m.get(wire.TRAIN_LOSS, math.nan)) * float(m.get(wire.NUM_EXAMPLES, 0))
               for m in trained) / examples if examples else math.nan
    return {
        "train_loss": loss,
        "epsilon_max": max(eps) if eps else math.nan,
        "epsilon_mean": sum(eps) / len(eps) if eps else math.nan,
        "lifetime_epsilon_max": max(lifetime) if lifetime else math.nan,
        "clients": len(trained),
        "sat_out": len(metrics) - len(trained),
        "client_train_seconds": sum(float(m.get(wire.TRAIN_SECONDS, 0.0)) for m in metrics),
        "client_startup_seconds": _mean(trained, wire.STARTUP_SECONDS),
        "client_fit_seconds": _mean(trained, wire.FIT_SECONDS),
        "client_peak_rss_mb": max((float(m[wire.PEAK_RSS_MB]) for m in trained if wire.PEAK_RSS_MB in m),
                                  default=math.nan),
        "upload_bytes": upload_bytes,
    }


def refusal_counts(reasons: list[str]) -> dict[str, float]:
    """``refused`` and ``refused_<kind>`` for one round's refusals (kind: the reason's
    first word, before its colon)."""
    counts = {"refused": float(len(reasons))}
    for reason in reasons:
        key = "refused_" + reason.split(":", 1)[0].strip().replace("-", "_")
        counts[key] = counts.get(key, 0.0) + 1
    return counts


def _mean(metrics: Sequence[Mapping], key: str) -> float:
    values = [float(m[key]) for m in metrics if key in m]
    return sum(values) / len(values) if values else math.nan


def _array_bytes(content: RecordDict) -> int:
    """Bytes of the weights in one client's reply, as they travel."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())
