"""Who trained in a round, and why the others did not.

A refused app, a device policy or a dead node shows on the server only as a reply
without weights (or none at all); counted here by reason, so that the round line, the
summary and the exit status say that a run trained nobody, instead of only the
devices' logs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from flwr.app import Message

from fedspeaker import wire

NO_REPLY = "no-reply/error"  # Flower's error reply (node gone, client raised) or none
SAT_OUT = "sat-out"  # stopped for its privacy budget
DROPPED = "dropped"  # replied with weights the server left out (NaN, or unchanged)
POLICY = "policy"  # the default kind of a device's refusal (wire.REFUSAL)
APP_REFUSED = "app-refused"  # the device's runner refused an app the operator did not sign
# How Flower's ClientApp runner words the error reply when our app check raised
# (fedspeaker/deploy/apprunner.py): "<class '...AppVerificationError'>:<'why'>"
_APP_CHECK_ERROR = "AppVerificationError'>:<'"


@dataclass
class RoundOutcome:
    """One round's training clients: how many were asked, trained, and why the rest did not."""

    asked: int
    trained: int
    not_trained: Counter = field(default_factory=Counter)  # reason -> clients
    details: Counter = field(default_factory=Counter)  # "reason: text" -> clients

    def describe(self) -> str:
        """``2 no-reply/error, 1 policy`` (empty when everyone asked trained)."""
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.not_trained.items()))


def refusal_kind(text: str) -> str:
    """The kind of a device's refusal: its text before the colon (``policy: dp-off``)."""
    kind = text.partition(":")[0].strip()
    return kind or POLICY


def reply_reason(reply: Message) -> tuple[str, str] | None:
    """(reason, detail) of a reply from a client that did not train; None if it trained."""
    if reply.has_error():
        error = reply.error
        if _APP_CHECK_ERROR in error.reason:  # a refusal, not a failure: counted as one
            why = error.reason.split(_APP_CHECK_ERROR, 1)[1].removesuffix("'>")
            return APP_REFUSED, f"the device refused the app (not signed by the operator): {why}"
        return NO_REPLY, f"Flower error {error.code}: {error.reason}".strip()
    if not reply.has_content():
        return NO_REPLY, "an empty reply"
    refused = wire.refusal(reply.content)
    if refused is not None:
        return refusal_kind(refused), refused
    if wire.sat_out(reply.content):
        return SAT_OUT, "its privacy budget would be passed"
    if not reply.content.array_records:
        return NO_REPLY, "a reply without weights"
    return None


def round_outcome(asked: int, replies: Sequence[Message], dropped: Iterable[Message] = ()) -> RoundOutcome:
    """Count ``replies`` to ``asked`` train messages; ``dropped``: replies with weights that
    the server left out. Messages never answered count as no reply."""
    dropped_ids = {id(m) for m in dropped}
    outcome = RoundOutcome(asked=asked, trained=0)
    for reply in replies:
        reason = (DROPPED, "update left out by the server") if id(reply) in dropped_ids else reply_reason(reply)
        if reason is None:
            outcome.trained += 1
            continue
        outcome.not_trained[reason[0]] += 1
        outcome.details[f"{reason[0]}: {reason[1]}" if not reason[1].startswith(reason[0]) else reason[1]] += 1
    missing = asked - len(replies)
    if missing > 0:
        outcome.not_trained[NO_REPLY] += missing
        outcome.details[f"{NO_REPLY}: no reply within the round's timeout"] += missing
    return outcome


def row_counts(outcome: RoundOutcome) -> dict[str, float]:
    """The round's rounds.csv columns: asked, trained (``clients``), and the others by reason
    (``refused``: every kind of device refusal: policy, app signature, other)."""
    known = (NO_REPLY, SAT_OUT, DROPPED)
    return {"asked": float(outcome.asked), "clients": float(outcome.trained),
            "sat_out": float(outcome.not_trained[SAT_OUT]),
            "refused": float(sum(n for r, n in outcome.not_trained.items() if r not in known)),
            "no_reply": float(outcome.not_trained[NO_REPLY]),
            "dropped": float(outcome.not_trained[DROPPED])}


def run_outcome(rows: Sequence[dict[str, float]], rounds: int, details: Counter) -> dict:
    """summary.json's ``outcome``: whether any round trained anyone. A run asked for
    rounds whose every round trained nobody has failed: its released model is the
    starting model. ``details``: the reasons counted over the run, with their texts."""
    trained = [int(r["round"]) for r in rows if r.get("round", 0) > 0 and r.get("clients", 0) > 0]
    counts = Counter()
    for text, n in details.items():
        counts[text.partition(":")[0]] += n
    outcome = {"rounds_asked": rounds, "rounds_trained": len(trained),
               "not_trained": dict(sorted(counts.items())), "reasons": dict(details.most_common())}
    if rounds == 0:
        return {"status": "nothing asked", "released_model": "the starting model (--rounds 0)", **outcome}
    if not trained:
        return {"status": "failed", "released_model": "the starting model: no client trained in any round",
                **outcome}
    return {"status": "trained", "released_model": f"trained in {len(trained)} of {rounds} rounds", **outcome}


def failure_message(outcome: dict) -> str:
    """RUN FAILED and why, for the server's log and `fedspeaker simulate`."""
    reasons = "; ".join(f"{n} x {text}" for text, n in outcome["reasons"].items()) or "no reasons reported"
    return (f"RUN FAILED: no client trained in any of the {outcome['rounds_asked']} round(s); the released "
            f"model is the starting model. Not trained: {reasons}")
