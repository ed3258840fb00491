"""What a run leaves behind: rounds.csv, tensorboard/, summary.json, curves.png
(global_model.pt: model/bundle.py).

Rows are appended as rounds finish, so a user (or `fedspeaker simulate`) can follow
a run by reading rounds.csv, and a run that stops early still leaves its history.
"""

from __future__ import annotations

import csv
import logging
import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import SpeakerData
from fedspeaker.evaluation.release import release_reason, released_row
from fedspeaker.evaluation.scoring import EvaluationSet
from fedspeaker.model.bundle import save_bundle
from fedspeaker.privacy.backend_stats import backend_noise_multiplier, release_step
from fedspeaker.privacy.accounting import GroupBound, group_epsilon, largest_speaker
from fedspeaker.privacy.guarantee import guarantee_sentence
from fedspeaker.reporting.plots import plot_curves
from fedspeaker.reporting.tensorboard import RoundBoard

log = logging.getLogger(__name__)

COLUMNS = ("round", "accuracy", "voiceprint_accuracy", "eer", "min_dcf", "loss", "epsilon_max", "epsilon_mean", "device_epsilon",
           "train_loss",
           # decisions as a device makes them (voiceprints of enrol-recordings recordings): the
           # threshold fitted on validation, the unseen speakers' FAR and FRR there, FRR at FAR
           # 1 %, EER, minDCF, Cllr and actual DCF; the validation FRR the release is chosen by
           "threshold", "far", "frr", "frr_at_far_1pct", "enrol_eer", "enrol_min_dcf", "cllr",
           "act_dcf", "val_frr",
           # the largest lifetime epsilon a device reported (its ledger over every run)
           "lifetime_epsilon_max",
           "clients", "sat_out",
           # train messages sent, and the clients that did not train by reason (server/outcomes.py;
           # refused: by the device's privacy policy, summary.json has them by reason)
           "asked", "refused", "no_reply", "dropped",
           "upload_bytes", "client_train_seconds",
           # a client's footprint: mean start-up (process start to features loaded) and
           # training seconds, the largest peak memory of a client process
           "client_startup_seconds", "client_fit_seconds", "client_peak_rss_mb",
           # the devices' own scoring of the model (fraction-evaluate > 0): their held-out
           # recordings named by the head, owners falsely rejected, cohort impostors accepted
           "device_accuracy", "device_frr", "device_far", "device_target_trials",
           "device_impostor_trials", "devices_evaluated",
           "server_peak_rss_mb",  # the ServerApp's process (in simulation, Flower's engine with it)
           # the scoring back end, where this round computed one: devices counted, seconds taken
           "backend_devices", "backend_seconds",
           "round_seconds", "seconds")

# Columns renamed, old -> new: rows read back (rounds.csv, a checkpoint's) from a run made
# before the rename come in under the new names
RENAMED_COLUMNS = {"user_epsilon": "device_epsilon"}


def current_row(row: Mapping[str, float]) -> dict[str, float]:
    """A row under today's column names, whenever it was written."""
    return {RENAMED_COLUMNS.get(k, k): v for k, v in row.items()}


class RunReport:
    def __init__(self, out_dir: Path, rows: list[dict[str, float]] | None = None,
                 extra_columns: Sequence[str] = (), run_config: Mapping[str, Any] | None = None) -> None:
        """A new rounds.csv and TensorBoard run, holding ``rows`` (those of a resumed run's
        finished rounds); ``extra_columns``: the run's own (its test conditions'), before the
        seconds; ``run_config`` goes to TensorBoard as the run's hyper-parameters."""
        self.out_dir = out_dir
        self.columns = (*COLUMNS[:-2], *extra_columns, *COLUMNS[-2:])
        self.rows: list[dict[str, float]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_csv, "w", newline="") as f:
            csv.writer(f).writerow(self.columns)
        self.board = RoundBoard(out_dir / "tensorboard", run_config)
        for row in rows or []:
            self.add_round(row)

    @property
    def rounds_csv(self) -> Path:
        return self.out_dir / "rounds.csv"

    def add_round(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.rounds_csv, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, math.nan)) for c in self.columns])
        self.board.add_round(row, self.columns)

    def finish(self, summary: dict[str, Any], model_bundle: dict[str, Any]) -> None:
        self.board.close()
        save_bundle(model_bundle, self.out_dir / "global_model.pt")
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        plot_curves(self.rows, self.out_dir / "curves.png", title=summary.get("title", ""),
                    chance=1 / summary["data"]["training_speakers"])


def progress_line(row: dict[str, float]) -> str:
    eps = ""
    if not math.isnan(row.get("epsilon_max", math.nan)):
        eps = f"  eps max {row['epsilon_max']:.2f} mean {row['epsilon_mean']:.2f}"
    if not math.isnan(row.get("device_epsilon", math.nan)):
        eps += f"  device eps {row['device_epsilon']:.2f}"
    clients = row.get("clients", math.nan)
    replies = f"  clients {0 if math.isnan(clients) else int(clients)}"
    if row.get("asked", 0) > 0:  # NaN > 0 is False
        replies += f" of {int(row['asked'])}"
    kinds = ", ".join(f"{int(n)} {k.removeprefix('refused_').replace('_', '-')}"
                      for k, n in sorted(row.items()) if k.startswith("refused_") and n)
    missing = [f"{int(row[key])} {what}" for key, what in (
        ("sat_out", "sat out for budget"), ("refused", f"refused by device policy ({kinds})" if kinds else "refused"),
        ("no_reply", "no reply/error"), ("dropped", "dropped")) if row.get(key, 0) > 0]
    if missing:
        replies += f" (not trained: {', '.join(missing)})"
    if not math.isnan(row.get("device_frr", math.nan)):
        replies += (f"  on {int(row['devices_evaluated'])} devices: accuracy {row['device_accuracy']:.3f} "
                    f"FRR {row['device_frr']:.3f} FAR {row['device_far']:.3f}")
    if int(row["round"]) == 0:
        replies = "  (the starting model, before any round)"
    # what a deployment sees first: identification by voiceprint, unseen-speaker EER/minDCF
    scores = ""
    if not math.isnan(row.get("voiceprint_accuracy", math.nan)):
        scores += f"voiceprint {row['voiceprint_accuracy']:.3f}  "
    scores += f"EER {row['eer']:.3f}"
    if not math.isnan(row.get("min_dcf", math.nan)):
        scores += f"  minDCF {row['min_dcf']:.3f}"
    if not math.isnan(row.get("far", math.nan)):
        scores += f"  FAR {row['far']:.3f} FRR {row['frr']:.3f} (FRR@FAR1% {row['frr_at_far_1pct']:.3f})"
    scores += f"  (training head {row['accuracy']:.3f})"
    degraded = conditions(row)
    if degraded:
        scores += (f"  degraded EER mean {row['degraded_eer_mean']:.3f} ("
                   + ", ".join(f"{name} {c['eer']:.3f}" for name, c in degraded.items()) + ")")
    if not math.isnan(row.get("backend_devices", math.nan)):
        replies += f"  back end from {int(row['backend_devices'])} devices"
    return f"round {int(row['round']):3d}  {scores}{eps}{replies}  {row['round_seconds']:.1f} s"


def conditions(row: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """A round's degraded trial conditions (test-conditions): name -> its EER and minDCF."""
    return {key.removeprefix("eer_"): {"eer": value, "min_dcf": row.get("min_dcf_" + key.removeprefix("eer_"))}
            for key, value in row.items() if key.startswith("eer_") and not math.isnan(value)}


def _degraded(row: Mapping[str, float]) -> dict[str, Any]:
    """summary.json's figures of the degraded conditions, where the run scored any."""
    found = conditions(row)
    return {"conditions": found, "degraded_eer_mean": row.get("degraded_eer_mean")} if found else {}


def read_rounds(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [current_row({k: float(v) for k, v in r.items()}) for r in csv.DictReader(f)]


def _fmt(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def run_summary(settings: RunSettings, data: SpeakerData, rows: list[dict[str, float]],
                seconds: float, *, mode: str, evaluation: EvaluationSet,
                simulated: bool = True, device_epsilons: tuple[list[float], int] | None = None
                ) -> dict[str, Any]:
    """summary.json: the starting (round 0), final and released figures (with the
    operating point's), the best head accuracy, the data and trials used, and the DP
    guarantee.

    ``simulated``: a simulation or `central`, whose parties' data the server knows: under
    utterance-level DP the summary adds the group bound of the speaker with the most
    utterances in one party; a deployment (False) states only what the server can know.
    ``device_epsilons``: each device's epsilon as it last reported it, and how many
    devices sat out for their budget.
    """
    final = rows[-1] if rows else {}
    start = rows[0] if rows and rows[0]["round"] == 0 else {}
    best = max(rows, key=lambda r: r["accuracy"]) if rows else {}
    released = released_row(rows, settings.release) if rows else {}
    eps = final.get("epsilon_max", math.nan)
    return {
        "title": (f"federated ({settings.strategy}, {settings.num_clients} clients, "
                  f"{settings.partition}" if mode == "federated" else "central (")
        + (f", DP ε≤{settings.epsilon:g})" if settings.dp and not settings.noise_multiplier else ")"),
        "mode": mode,
        "final": {**{k: final.get(k) for k in ("round", "accuracy", "voiceprint_accuracy", "eer",
                                               "min_dcf", "epsilon_max", "epsilon_mean", "device_epsilon")},
                  **_decisions(final, settings), **_degraded(final)},
        "start": {**{k: start.get(k) for k in ("accuracy", "voiceprint_accuracy", "eer", "min_dcf")},
                  **_decisions(start, settings), **_degraded(start)},
        # the model saved in global_model.pt: its figures are the run's reported ones
        "released": {"round": released.get("round"),
                     "why": release_reason(released, rows, settings.release, settings.operating_point)
                     if rows else None,
                     **{k: released.get(k) for k in ("accuracy", "voiceprint_accuracy", "eer", "min_dcf")},
                     **_decisions(released, settings), **_degraded(released)},
        "best_accuracy": best.get("accuracy"),
        "best_round": best.get("round"),
        "wall_seconds": round(seconds, 2),
        "client_train_seconds": round(sum(r.get("client_train_seconds", 0.0) for r in rows), 2),
        "sat_out_for_budget": int(sum(r.get("sat_out", 0.0) for r in rows
                                      if not math.isnan(r.get("sat_out", math.nan)))),
        "backend": _backend_words(settings, rows),
        "refused_by_device_policy": refusals(rows),
        "epsilon_spent": epsilon_spread(settings, *device_epsilons) if device_epsilons else None,
        "lifetime_epsilon_max": _largest(rows, "lifetime_epsilon_max"),
        "privacy": guarantee_sentence(
            settings, eps, final.get("device_epsilon", math.nan), simulated=simulated,
            lifetime_epsilon=(_largest(rows, "lifetime_epsilon_max") or math.nan) if not simulated else math.nan,
            group=(speaker_group_bound(settings, _party_speakers(settings, mode),
                                       rounds=int(final.get("round", 0)))
                   if simulated and settings.dp and settings.dp_unit == "utterance" else None)),
        "data": {
            "corpus": str(settings.corpus_dir),
            "training_speakers": data.n_speakers,
            "unseen_speakers": len(data.split.unseen),
            "train_utterances": len(data.split.train),
            "test_utterances": len(data.split.test),
            "verification_utterances": len(data.split.verification),
            "skipped_files": len(data.skipped),
            "skipped": data.skipped,
        },
        "verification": {"trials": len(evaluation.trials), "chosen": evaluation.trials.source,
                         "speakers": evaluation.speakers_scored, "score_norm": settings.score_norm,
                         "test_conditions": _condition_words(settings),
                         "min_dcf": "p_target 0.01, C_miss = C_fa = 1",
                         "enrolment_trials": {
                             "test": f"{len(evaluation.unseen):,} trials: {evaluation.unseen.source}",
                             "validation": f"{len(evaluation.validation):,} trials: "
                                           f"{evaluation.validation.source}",
                             "calibration": "logistic regression of the validation trials' cosines "
                                            "to log-likelihood ratios, prior 0.5; Cllr in bits, "
                                            "actual DCF at p_target 0.01"}},
        "settings": settings.to_run_config(),
    }


def _condition_words(settings: RunSettings) -> str | None:
    """How the degraded trial conditions were made, where the run has any."""
    if not settings.test_conditions:
        return None
    return (f"{settings.test_conditions}: the same trials, the enrolment side clean and the test "
            "side degraded once from the seed and cached; babble: 3 recordings of training speakers "
            "(none in the trials) at equal power; white/pink/brown: Gaussian noise; SNR over the "
            "whole clip; rooms: pyroomacoustics image-method shoeboxes (3-8 x 3-6 x 2.4-3.2 m), "
            "RT60 drawn in the range and measured on the impulse response (T30, within 5 %), "
            "noise added after the room")


def _backend_words(settings: RunSettings, rows: list[dict[str, float]]) -> str:
    """Which rounds were scored with the devices' back end (the mean embedding subtracted)."""
    adapted = [int(r["round"]) for r in rows if not math.isnan(r.get("backend_devices", math.nan))]
    if not adapted:
        return "none: every round scored the encoder's embeddings as they are"
    return (f"rounds {', '.join(map(str, adapted))} scored with the devices' in-domain mean embedding "
            "subtracted (the other rounds without it); the released model holds its round's")


def epsilon_spread(settings: RunSettings, epsilons: list[float], sat_out: int) -> dict[str, Any] | None:
    """How close the devices that trained came to the target: min / median / max of the
    epsilon each reported last, and how many sat out for their budget."""
    if not epsilons:
        return None
    ordered = sorted(epsilons)
    return {"devices": len(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "max": ordered[-1], "target": settings.epsilon if not settings.noise_multiplier else None,
            "sat_out_for_budget": sat_out}


def refusals(rows: list[dict[str, float]]) -> dict[str, int]:
    """Devices' policy refusals over the run, by reason (dp-off, unit, delta, clipping,
    epsilon, lifetime)."""
    counts: dict[str, int] = {}
    for row in rows:
        for key, n in row.items():
            if key.startswith("refused_") and n == n and n:
                kind = key.removeprefix("refused_").replace("_", "-")
                counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def _largest(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return max(values) if values else None


def _decisions(row: Mapping[str, float], settings: RunSettings) -> dict[str, Any]:
    """A round's figures in the enrolment configuration, on unseen speakers: at the stored
    threshold (``operating_point``), and of the calibrated scores."""
    return {"operating_point": {"target": settings.operating_point,
                                **{k: row.get(k) for k in ("threshold", "far", "frr", "frr_at_far_1pct")}},
            "enrol_recordings": settings.enrol_recordings,
            **{k: row.get(k) for k in ("enrol_eer", "enrol_min_dcf", "cllr", "act_dcf", "val_frr")}}


def speaker_group_bound(settings: RunSettings, parties: Sequence[Sequence[str]], *, rounds: int
                        ) -> GroupBound | None:
    """Under utterance-level DP-SGD, the privacy of the speaker with the most utterances in
    one party, over ``rounds`` rounds.

    ``parties``: each party's training utterances, by speaker. The party's DP-SGD is
    rebuilt from the settings as every ``train`` call plans it (dp_plan), as if it trained
    in every round it can (every round, or where its noise is planned for fewer and it
    stops at the target, that many): an upper bound, since rounds it sat out or stopped
    early only remove steps. Where several parties hold a speaker with that many utterances, the largest
    epsilon among them. None where no group is larger than one utterance.
    """
    from fedspeaker.training.local import dp_plan, planned_rounds, spend_cap

    if spend_cap(settings) == settings.epsilon and not settings.epsilon_budget \
            and not settings.straggler_fraction:  # a straggler's short rounds could fit more
        rounds = min(rounds, planned_rounds(settings))
    size = max((largest_speaker(p) for p in parties), default=0)
    if rounds < 1 or size < 2:
        return None
    # the scoring back end's releases: the speaker's utterances all in each, at sample rate 1
    releases = ([tuple(release_step(backend_noise_multiplier(settings)))] * settings.backend_releases
                if settings.backend_privacy else [])
    try:
        epsilons = [group_epsilon(history=[tuple(dp_plan(settings, n))] * rounds + releases, size=size,
                                  delta=settings.delta)
                    for n in sorted({len(p) for p in parties if largest_speaker(p) == size})]
    except Exception as exc:  # noqa: BLE001 - a figure of the summary must not cost the run's outputs
        log.warning("the group-privacy bound could not be computed (%s: %s); the summary leaves it out",
                    type(exc).__name__, exc)
        return None
    return GroupBound(size, max(epsilons), settings.delta)


def _party_speakers(settings: RunSettings, mode: str) -> list[list[str]]:
    """Each party's training utterances by speaker: the simulated clients' shards, or
    `central`'s one party holding them all."""
    from fedspeaker.data.partition import client_shards  # flwr-datasets: not for a deployed client
    from fedspeaker.data.speakers import load_split

    train = load_split(settings).train  # what client_shards indexes
    shards = client_shards(settings)
    if mode == "central":
        return [[train[i].speaker for shard in shards for i in shard]]
    return [[train[i].speaker for i in shard] for shard in shards]
