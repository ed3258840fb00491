"""A run's per-round figures as TensorBoard event files, under ``<out>/tensorboard/``.

Researchers compare runs as curves side by side; TensorBoard overlays every run found
below the folder it is given, so ``tensorboard --logdir <comparison>`` shows a grid's
cells (``cells/<cell>/tensorboard``) together. TensorBoard's own writer
(torch.utils.tensorboard) writes the files; the scalars are rounds.csv's columns, the
round as the step, grouped by what they measure; the run config goes in as
hyper-parameters, with the round figures as the metrics the HPARAMS tab lists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

# the dashboard's sections: a column not named here goes under "run/"
_GROUPS = {
    "verification": ("eer", "min_dcf", "enrol_eer", "enrol_min_dcf", "cllr", "act_dcf"),
    "identification": ("accuracy", "voiceprint_accuracy"),
    "decision": ("threshold", "far", "frr", "frr_at_far_1pct", "val_frr"),
    "privacy": ("epsilon_max", "epsilon_mean", "device_epsilon", "lifetime_epsilon_max"),
    "clients": ("clients", "asked", "sat_out", "refused", "no_reply", "dropped"),
    "loss": ("loss", "train_loss"),
    "devices": ("device_accuracy", "device_frr", "device_far", "device_target_trials",
                "device_impostor_trials", "devices_evaluated"),
    "cost": ("upload_bytes", "client_train_seconds", "client_startup_seconds", "client_fit_seconds",
             "client_peak_rss_mb", "server_peak_rss_mb", "backend_devices", "backend_seconds",
             "round_seconds", "seconds"),
}
TAGS = {column: f"{group}/{column}" for group, columns in _GROUPS.items() for column in columns}
# the figures the HPARAMS tab shows for each run (their last value)
_HPARAM_METRICS = ("verification/eer", "verification/min_dcf", "identification/voiceprint_accuracy",
                   "identification/accuracy", "decision/far", "decision/frr", "privacy/epsilon_max")


def tag(column: str) -> str:
    """The scalar's name in TensorBoard for a rounds.csv column."""
    return TAGS.get(column, f"run/{column}")


class RoundBoard:
    """Writes each finished round's figures to ``log_dir`` as it comes, so a running
    federation can be watched live."""

    def __init__(self, log_dir: Path, run_config: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard: only where a report is written
        from torch.utils.tensorboard.summary import hparams

        log_dir.mkdir(parents=True, exist_ok=True)
        for old in log_dir.glob("events.out.tfevents.*"):  # a resumed run writes its history anew
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if run_config:
            for summary in hparams(_hparam_values(run_config), dict.fromkeys(_HPARAM_METRICS, math.nan)):
                self.writer.file_writer.add_summary(summary)  # in this run, not a sub-run of its own

    def add_round(self, row: Mapping[str, float], columns: tuple[str, ...]) -> None:
        step = int(row["round"])
        for column in columns:
            value = row.get(column, math.nan)
            if column != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag(column), float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _hparam_values(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as TensorBoard takes hyper-parameters: numbers as numbers, the rest
    as text (booleans as true/false: torch would store them as 1.0/0.0)."""
    return {key: str(value).lower() if isinstance(value, bool) else
            value if isinstance(value, (int, float)) else str(value)
            for key, value in sorted(run_config.items())}
