"""Which round's model a run releases (saves, exports): the best by validation, or the last.

The choice reads only the validation signal (``val_frr``: the validation trials' false
rejects at the run's operating point, whose threshold was fitted there), never the
unseen-speaker test figures, so those stay an unbiased report of what was released.
Round 0, the starting model, competes; a tie keeps the earlier round. Where some rounds
were scored with the devices' scoring back end (round 0 and the last, fedspeaker/model/
backend.py), only those compete: a round between them was scored without one, so its
figures would not be those of a model that could be released with a back end.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

SIGNAL = "val_frr"
BACKEND = "backend_devices"  # a round scored with the devices' back end has it


def candidates(rows: Sequence[Mapping[str, float]]) -> list[Mapping[str, float]]:
    """The rounds that may be released by validation: those with a validation signal and,
    where any round was scored with the back end, only those."""
    scored = [r for r in rows if not math.isnan(r.get(SIGNAL, math.nan))]
    with_backend = [r for r in scored if not math.isnan(r.get(BACKEND, math.nan))]
    return with_backend or scored


def released_row(rows: Sequence[Mapping[str, float]], release: str) -> Mapping[str, float]:
    """The row of the round to release among ``rows`` (round order)."""
    if not rows:
        raise ValueError("no round to release")
    if release == "last":
        return rows[-1]
    scored = candidates(rows)
    return min(scored, key=lambda r: r[SIGNAL]) if scored else rows[-1]  # min keeps the first of ties


def release_reason(row: Mapping[str, float], rows: Sequence[Mapping[str, float]], release: str,
                   operating_point: str) -> str:
    """One sentence for the summary: which round, and why."""
    if release == "last":
        return f"round {int(row['round'])}: the last round (release=last)"
    competed = [int(r["round"]) for r in candidates(rows)]
    if len(competed) == len(rows):
        among = f"rounds {int(rows[0]['round'])} to {int(rows[-1]['round'])}"
    else:
        among = "rounds " + ", ".join(map(str, competed)) + " (those scored with the devices' back end)"
    return (f"round {int(row['round'])}: the lowest validation false-reject rate at the operating "
            f"point {operating_point} ({row[SIGNAL]:.3f}) of {among} "
            "(validation: the training speakers' held-out recordings; the unseen-speaker test "
            "played no part)")
