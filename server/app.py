"""The Flower ServerApp: aggregate client updates, score the global model every round."""

from __future__ import annotations

import hashlib
import math
import random
import resource
import time
import uuid
from collections import Counter
from functools import cached_property
from logging import ERROR, INFO, WARNING
from typing import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the Simulation Engine's grid

from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import SpeakerData, load_speaker_data
from fedspeaker.model import build_model
from fedspeaker.errors import FedSpeakerError
from fedspeaker.evaluation.scoring import EvaluationSet, embed, evaluate
from fedspeaker.evaluation.conditions import condition_columns
from fedspeaker.evaluation.release import released_row
from fedspeaker.model.backend import (
    encoder_fingerprint,
    install_backend,
    install_saved_backend,
    mean_of_sums,
    whitening_of_scatter,
)
from fedspeaker.privacy.backend_stats import device_backend_noise_multiplier
from fedspeaker.privacy.noise import noise_generator, release_seed
from fedspeaker.model.bundle import model_bundle
from fedspeaker.reporting.run_report import RunReport, progress_line, run_summary
from server.checkpoint import (
    Checkpoint,
    portable_arrays,
    random_state,
    restored_arrays,
    restore_random_state,
    restore_strategy_state,
    strategy_state,
)
from server.backend import ask_nodes, combine, device_level_noise
from server.outcomes import RoundOutcome, failure_message, run_outcome
from server.strategies import build_strategy, device_dp_of, device_epsilon_of

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    torch.set_num_threads(1)
    data = load_speaker_data(settings)
    model = build_model(settings, data.n_speakers)
    checkpoint = Checkpoint.load(settings) if settings.resume else None
    report = RunReport(settings.out_dir_path, checkpoint.rows if checkpoint else [],
                       condition_columns(settings), settings.to_run_config())
    rounds = RoundTracker(settings, data, model, report, checkpoint, grid=grid,
                          simulated=isinstance(grid, InMemoryGrid))
    if settings.secagg:
        from server.secure import run_secure_aggregation

        rounds.finish(run_secure_aggregation(grid, context, settings, rounds, model))
        return
    strategy = build_strategy(settings, rounds.observe_replies, rounds.observe_outcome, cohort=rounds.cohort,
                              on_counts=rounds.observe_device_counts,
                              round_offset=rounds.offset)  # Flower counts the remaining rounds from 1
    rounds.strategy = strategy
    if checkpoint:
        restore_strategy_state(strategy, checkpoint.strategy)
        restore_random_state(checkpoint.random_state)
        flwr_log(INFO, "resuming from round %d of %d (%s)", checkpoint.round, settings.rounds,
                 settings.out_dir_path / "checkpoint.pt")
    result = strategy.start(
        grid=grid,
        initial_arrays=restored_arrays(checkpoint.arrays) if checkpoint else ArrayRecord(model.state_dict()),
        num_rounds=settings.rounds - rounds.offset,
        timeout=settings.round_timeout,
        train_config=ConfigRecord({wire.NUM_ROUNDS: settings.rounds,
                                   # the label space, so a device maps its own speakers onto it
                                   wire.SPEAKERS: list(data.split.speakers),
                                   wire.FEDERATION_ID: rounds.federation_id}),
        evaluate_config=ConfigRecord({wire.SPEAKERS: list(data.split.speakers)}),
        evaluate_fn=rounds.evaluate,
    )
    rounds.finish(result.arrays or ArrayRecord(model.state_dict()))


class RoundTracker:
    """Joins each round's client metrics with the central evaluation into one report row."""

    def __init__(self, settings: RunSettings, data: SpeakerData, model: torch.nn.Module,
                 report: RunReport, checkpoint: Checkpoint | None = None, grid: Grid | None = None, *,
                 simulated: bool = True) -> None:
        self.settings, self.data, self.model, self.report = settings, data, model, report
        self.grid = grid  # to ask the devices for the scoring back end's statistics
        self.simulated = simulated  # False: real devices, whose data the server never sees
        self.offset = checkpoint.round if checkpoint else 0  # rounds done before a resume
        self.federation_id = checkpoint.federation_id if checkpoint else uuid.uuid4().hex
        if checkpoint:
            model.load_state_dict(restored_arrays(checkpoint.arrays).to_torch_state_dict())
        self.started = time.monotonic() - (checkpoint.seconds if checkpoint else 0.0)
        self.round_started = time.monotonic()
        self.client_metrics: dict[str, float] = {}
        self.device_metrics: dict[str, float] = {}  # the devices' own scoring, where asked for
        self.strategy: Strategy | None = None  # for the device-level epsilon, where accounted
        # each device's latest epsilon as it reported it (DP-SGD's), and who sat out for budget
        # (since this launch)
        self.reported_epsilon: dict[int, float] = {}
        self.devices_sat_out: set[int] = set()
        self.not_trained: Counter = Counter()  # "reason: text" -> clients, over this launch's rounds
        # the release candidate under release=best: the best round so far and its arrays
        self.release: dict | None = checkpoint.release if checkpoint else None
        self.scored: tuple[bytes, dict[str, float]] | None = None  # the last score() and its model

    @cached_property
    def evaluation(self) -> EvaluationSet:
        return EvaluationSet.of(self.data, self.settings)

    def observe_replies(self, server_round: int, replies: list[RecordDict], nodes: list[int],
                        metrics: Mapping[str, float]) -> None:
        """Every reply of the round, selected by the strategy or not; ``nodes``: who sent
        each, for the spread of epsilon over the devices; ``metrics``: what the strategy's
        train-metrics hook made of them (server/client_metrics.py), the row's columns."""
        for node, reply in zip(nodes, replies):
            reported = next(iter(reply.metric_records.values()), {})
            if wire.EPSILON in reported:
                self.reported_epsilon[node] = float(reported[wire.EPSILON])
            if reported.get(wire.SAT_OUT, 0):
                self.devices_sat_out.add(node)
        for reply in replies:
            if (reason := wire.refusal(reply)) is not None:
                flwr_log(WARNING, "round %d: a device refused the run: %s", server_round, reason)
        self.client_metrics = dict(metrics)

    def observe_outcome(self, server_round: int, outcome: RoundOutcome) -> None:
        """Who trained this round and why the others did not; said in the log at once
        (its counts are in the round's train metrics already)."""
        self.not_trained.update(outcome.details)
        if outcome.details:
            flwr_log(WARNING, "round %d: %d of %d client(s) trained; not trained: %s", server_round,
                     outcome.trained, outcome.asked,
                     "; ".join(f"{n} x {text}" for text, n in outcome.details.most_common()))

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's hook after every round, and before the first: round 0, the starting
        model (the pretrained encoder), so every report shows what federating added."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        first = server_round == 0 and self.offset == 0
        adapted = self.adapt_backend(arrays) if first or (
            server_round > 0 and server_round + self.offset == self.settings.rounds) else {}
        scores = self.score()
        if first:
            now = time.monotonic()
            row = {"round": 0, **scores, **adapted, "round_seconds": now - self.round_started,
                   "seconds": now - self.started}
            if adapted and self.strategy is not None:  # device-level DP: the back end's release
                row["device_epsilon"] = device_epsilon_of(self.strategy)
            self.report.add_round(row)
            self.keep_if_released(arrays)
            flwr_log(INFO, "%s", progress_line(row))
        elif server_round > 0:
            server_round += self.offset
            now = time.monotonic()
            row = {"round": server_round, **scores, **self.client_metrics, **self.device_metrics, **adapted,
                   "device_epsilon": device_epsilon_of(self.strategy) if self.strategy else math.nan,
                   "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "round_seconds": now - self.round_started, "seconds": now - self.started}
            # checkpoint first: a round that rounds.csv shows can always be resumed from
            rows = [*self.report.rows, row]
            self.keep_if_released(arrays, rows)
            if self.strategy is not None:  # the SecAgg+ workflow keeps its state inside Flower
                self.checkpoint(server_round, arrays, rows, now - self.started)
            self.report.add_round(row)
            flwr_log(INFO, "%s", progress_line(row))  # Flower's logger: `flwr run --stream` shows it
            self.client_metrics, self.device_metrics = {}, {}
        self.round_started = time.monotonic()
        return MetricRecord(scores)

    def score(self) -> dict[str, float]:
        """The model's scores as it is now (weights and back end), computed once: a round's
        cohort threshold, its row and the final bundle score the same model."""
        key = _model_key(self.model)
        if self.scored is None or self.scored[0] != key:
            self.scored = (key, evaluate(self.model, self.evaluation))
        return dict(self.scored[1])

    def keep_if_released(self, arrays: ArrayRecord, rows: list[dict[str, float]] | None = None) -> None:
        """Under release=best, hold this round's arrays if it is now the one to release
        (chosen by the validation signal alone)."""
        rows = rows or self.report.rows
        if self.settings.release == "best" and released_row(rows, "best") is rows[-1]:
            self.release = {"round": int(rows[-1]["round"]), "arrays": portable_arrays(arrays),
                            "backend": self.model.backend.to_dict()}

    def adapt_backend(self, arrays: ArrayRecord) -> dict[str, float]:
        """Ask every device for the back end's statistics under ``arrays`` (already loaded
        into the model) and install the back end in the model; the row's columns about it.
        Under device-level DP the noise is added here and the release accounted with the
        rounds'. A failure costs the back end, never the run."""
        s = self.settings
        if not s.backend or self.grid is None:
            return {}
        if s.secagg:
            flwr_log(WARNING, "backend: not computed under secagg (Flower's SecAgg+ workflow sums "
                     "only training updates, and the server would see each device's sum)")
            return {}
        started = time.monotonic()
        fingerprint = encoder_fingerprint(self.model)
        config = ConfigRecord({wire.SPEAKERS: list(self.data.split.speakers),
                               wire.FEDERATION_ID: self.federation_id})
        try:
            collected = combine(ask_nodes(self.grid, arrays, config, s.round_timeout), fingerprint)
        except FedSpeakerError as exc:
            flwr_log(WARNING, "backend: %s", exc)
            return {}
        if s.device_dp != "off":
            noise = device_backend_noise_multiplier(s)
            seeded = self.simulated and s.seeded_noise  # a simulation repeats bit for bit
            collected = device_level_noise(
                collected, noise, noise_generator(release_seed(s.seed, -1, fingerprint)) if seeded else None)
            device_dp = device_dp_of(self.strategy)
            if device_dp is not None:
                device_dp.account((noise, collected.devices, collected.devices, 1.0))
        sums = collected.sums
        whiten = (whitening_of_scatter(sums.scatter, sums.count, len(sums.total))
                  if sums.scatter is not None else None)
        install_backend(self.model, mean_of_sums(sums.total, sums.count), fingerprint, sums.count, whiten)
        row = {"backend_devices": float(collected.devices), "backend_refused": float(collected.refused),
               "backend_seconds": time.monotonic() - started}
        if not math.isnan(collected.epsilon_max):  # the devices' ledgers after this release
            row["epsilon_max"] = max(collected.epsilon_max, self.client_metrics.get("epsilon_max", 0.0))
            row["epsilon_mean"] = collected.epsilon_mean
        return row

    def cohort(self, arrays: ArrayRecord) -> tuple[float, torch.Tensor]:
        """What devices score against: this model's accept threshold (its operating point,
        fitted on the validation trials) and a seeded sample of ``cohort-size`` of the
        embeddings of the server's public cohort, the unseen speakers."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        threshold = self.score()["threshold"]
        feats = self.evaluation.verify_feats
        chosen = random.Random(f"{self.settings.seed}-cohort").sample(
            range(len(feats)), min(self.settings.cohort_size, len(feats)))
        return threshold, embed(self.model, [feats[i] for i in chosen])

    def observe_device_counts(self, server_round: int, totals: dict[str, int]) -> None:
        """The devices' summed counts, as rates for this round's row."""
        def rate(part: str, whole: str) -> float:
            return totals[part] / totals[whole] if totals[whole] else math.nan

        self.device_metrics = {
            "device_accuracy": rate(wire.ID_CORRECT, wire.NUM_EXAMPLES),
            "device_frr": rate(wire.FALSE_REJECTS, wire.TARGET_TRIALS),
            "device_far": rate(wire.FALSE_ACCEPTS, wire.IMPOSTOR_TRIALS),
            "device_target_trials": float(totals[wire.TARGET_TRIALS]),
            "device_impostor_trials": float(totals[wire.IMPOSTOR_TRIALS]),
            "devices_evaluated": float(totals["devices"]),
        }

    def checkpoint(self, server_round: int, arrays: ArrayRecord, rows: list[dict[str, float]],
                   seconds: float) -> None:
        """Save what a resume needs; a failure costs the checkpoint, never the run."""
        try:
            Checkpoint(round=server_round, arrays=portable_arrays(arrays),
                       strategy=strategy_state(self.strategy), rows=rows, seconds=seconds,
                       federation_id=self.federation_id, run_config=self.settings.to_run_config(),
                       random_state=random_state(), release=self.release).save(self.settings.out_dir_path)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the federation goes on
            flwr_log(WARNING, "round %d: could not write checkpoint.pt (%s: %s); the run goes on, "
                     "but cannot be resumed from this round", server_round, type(exc).__name__, exc)

    def finish(self, arrays: ArrayRecord) -> None:
        """Save the released model (release=best: the best round's; last: ``arrays``, the
        final model) and the summary; then, if no round trained anyone, fail the run (Flower
        marks a ServerApp that raises as failed; `fedspeaker simulate` exits 1 on its summary)."""
        release = getattr(self, "release", None)
        if release is not None:
            arrays = restored_arrays(release["arrays"])
        self.model.load_state_dict(arrays.to_torch_state_dict())
        if release is not None and release.get("backend"):  # the released round's own back end
            backend = release["backend"]
            install_saved_backend(self.model, backend)
        scores = self.score()
        summary = run_summary(self.settings, self.data, self.report.rows, time.monotonic() - self.started,
                              mode="federated", evaluation=self.evaluation, simulated=self.simulated,
                              device_epsilons=(list(self.reported_epsilon.values()), len(self.devices_sat_out)))
        summary["outcome"] = run_outcome(self.report.rows, self.settings.rounds, self.not_trained)
        self.report.finish(summary, model_bundle(self.settings, self.data.split.speakers, self.model,
                                                 scores, self.evaluation))
        if summary["outcome"]["status"] == "failed":
            message = failure_message(summary["outcome"])
            flwr_log(ERROR, "%s", message)
            raise RunFailed(message)


class RunFailed(FedSpeakerError):
    """No client trained in any round: the run's model is the one it started from."""


def _model_key(model: torch.nn.Module) -> bytes:
    """A digest of what the scores depend on: every weight and the back end's state."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = dict(model.state_dict())
    backend = getattr(model, "backend", None)
    if backend is not None:
        tensors |= {"backend.mean": backend.mean, "backend.whiten": backend.whiten}
        digest.update(repr((backend.active, backend.whitened)).encode())
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()
