"""Which round's model a run releases (saves, exports): the best by validation, or the last.

The choice reads only the validation signal (``val_frr``: the validation trials' false
rejects at the run's operating point, whose threshold was fitted there), never the
unseen-speaker test figures, so those stay an unbiased report of what was released.
Round 0, the starting model, competes; a tie keeps the earlier round.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

SIGNAL = "val_frr"


def released_row(rows: Sequence[Mapping[str, float]], release: str) -> Mapping[str, float]:
    """The row of the round to release among ``rows`` (round order)."""
    if not rows:
        raise ValueError("no round to release")
    if release == "last":
        return rows[-1]
    scored = [r for r in rows if not math.isnan(r.get(SIGNAL, math.nan))]
    return min(scored, key=lambda r: r[SIGNAL]) if scored else rows[-1]  # min keeps the first of ties


def release_reason(row: Mapping[str, float], rows: Sequence[Mapping[str, float]], release: str,
                   operating_point: str) -> str:
    """One sentence for the summary: which round, and why."""
    if release == "last":
        return f"round {int(row['round'])}: the last round (release=last)"
    first, last = int(rows[0]["round"]), int(rows[-1]["round"])
    return (f"round {int(row['round'])}: the lowest validation false-reject rate at the operating "
            f"point {operating_point} ({row[SIGNAL]:.3f}) of rounds {first} to {last} "
            "(validation: the training speakers' held-out recordings; the unseen-speaker test "
            "played no part)")
