"""The Flower ClientApp: DP-SGD on the client's own utterances, only weights leave."""

from __future__ import annotations

import importlib
import os
import resource
import time
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedspeaker.config import RunSettings
from fedspeaker.data import SPEAKERS_KEY, load_device_examples, load_speaker_data
from fedspeaker.errors import CorpusError
from fedspeaker.features import FeatureSpec
from fedspeaker.local import LocalTrainer
from fedspeaker.privacy import FEDERATION_ID, SAT_OUT, UNIT_WEIGHT, PrivacyLedger, sat_out
from simulations.scenarios import (
    SimulatedDropout,
    client_role,
    drops_out,
    flip_labels,
    poison_update,
)

app = ClientApp()


def user_dp_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, when the run asks for client-side user-level DP.

    A client sitting out for its budget sends no weights, so it bypasses the mod.
    """
    mod = {"client-fixed": fixedclipping_mod,
           "client-adaptive": adaptiveclipping_mod}.get(str(context.run_config.get("user-dp", "off")))
    if mod is None:
        return call_next(msg, context)
    resting: list[Message] = []

    def train_unless_sat_out(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_content() and sat_out(reply.content):
            resting.append(reply)
            return Message(Error(0, "sat out for budget"), reply_to=m)  # the mod passes errors on
        return reply

    out = mod(msg, context, train_unless_sat_out)
    return resting[0] if resting else out


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod, for the messages of a run with secure aggregation."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


LEGACY_PARAMETERS = "fitins.parameters"  # SecAgg+ runs speak Flower's legacy Fit messages


@app.train(mods=[secure_aggregation, user_dp_clipping])
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one CPU per client actor; more threads only contend
    started = time.monotonic()
    settings = RunSettings.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    fitins = (compat.recorddict_to_fitins(msg.content, keep_input=True)
              if LEGACY_PARAMETERS in msg.content.array_records else None)
    config = fitins.config if fitins else msg.content["config"]
    server_round = int(config["server-round"])
    if drops_out(settings, partition_id, server_round):
        if settings.dropout_mode == "silent":  # answer only after the server stopped waiting
            time.sleep(settings.round_timeout + 1.0)
        raise SimulatedDropout(f"client {partition_id} dropped out of round {server_round} "
                               f"(scenario: dropout={settings.dropout}, {settings.dropout_mode})")
    role = client_role(settings, partition_id)
    speakers = config.get(SPEAKERS_KEY, [])
    speakers = speakers.split("\n") if isinstance(speakers, str) else list(speakers)  # legacy: a string
    feats, labels = client_examples(settings, context, speakers)
    n_speakers = len(speakers) or load_speaker_data(settings).n_speakers
    if settings.dp:  # Opacus is imported lazily; its ~1 s belongs to start-up, not training
        importlib.import_module("opacus")
    data_ready = time.monotonic()
    if role.byzantine and settings.attack == "label-flip":
        labels = flip_labels(labels, n_speakers)
    ledger_file = ledger_path(settings, context, config)
    ledger = PrivacyLedger.load(ledger_file, settings.accountant)

    trainer = LocalTrainer(settings, n_speakers)
    step_fraction = settings.straggler_steps if role.straggler else 1.0
    if settings.dp and settings.epsilon_budget > 0:
        planned = trainer.dp_plan(len(feats), step_fraction=step_fraction)
        if ledger.epsilon_after(planned, settings.delta) > settings.epsilon_budget:
            return _sat_out(msg, ledger.epsilon(settings.delta), started)
    if fitins:
        global_state = OrderedDict((k, torch.from_numpy(a.copy())) for k, a in
                                   zip(trainer.model.state_dict(), parameters_to_ndarrays(fitins.parameters)))
    else:
        global_state = msg.content["arrays"].to_torch_state_dict()
    trainer.model.load_state_dict(global_state)
    seed = settings.seed * 1_000_003 + partition_id * 1_009 + server_round
    mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx
    fit_started = time.monotonic()
    loss = trainer.train(feats, labels, ledger, seed, proximal_mu=mu, step_fraction=step_fraction)
    fit_seconds = time.monotonic() - fit_started
    if settings.dp:
        ledger.save(ledger_file)
    update = trainer.model.state_dict()
    if role.byzantine and settings.attack != "label-flip":
        update = poison_update(global_state, update, settings.attack, settings.attack_scale, seed)

    metrics = {"num-examples": len(feats), UNIT_WEIGHT: 1, "train-loss": loss,
               "train-seconds": time.monotonic() - started, **footprint(started, data_ready, fit_seconds)}
    if settings.dp:
        metrics["epsilon"] = ledger.epsilon(settings.delta)
    if fitins:
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([t.numpy() for t in update.values()]),
                        len(feats), metrics)
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(update),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def footprint(started: float, data_ready: float, fit_seconds: float) -> dict[str, float]:
    """What a round costs the device: start-up (process start, imports, loading its
    features) apart from training, and this process's peak memory.

    A SuperNode starts a fresh ClientApp process per round, so start-up counts from the
    process's own start; a long-lived simulation actor counts only its first round's.
    """
    global _first_message
    startup = data_ready - (_PROCESS_STARTED if _first_message else started)
    _first_message = False
    return {"startup-seconds": startup, "fit-seconds": fit_seconds,
            "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _process_start_monotonic() -> float:
    """When this process started, on the time.monotonic() clock (Linux /proc)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")  # seconds since boot, as CLOCK_MONOTONIC counts
    except (OSError, ValueError, IndexError):
        return time.monotonic()


_PROCESS_STARTED = _process_start_monotonic()
_first_message = True


def _sat_out(msg: Message, epsilon: float, started: float) -> Message:
    """The reply of a client whose next round would exceed its epsilon budget: no
    weights, just what it has spent, so the server can count it and leave it out."""
    metrics = {"num-examples": 0, SAT_OUT: 1, "epsilon": epsilon,
               "train-seconds": time.monotonic() - started}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def client_examples(settings: RunSettings, context: Context,
                    speakers: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """This node's training utterances: a device's own folder (node-config `data-dir`),
    or in simulation its shard of the corpus (by partition-id)."""
    if "data-dir" in context.node_config:
        if not speakers:
            raise CorpusError("the server sent no speaker list; is it an older fedspeaker?")
        state_dir = context.node_config.get("state-dir")
        return load_device_examples(Path(str(context.node_config["data-dir"])).expanduser(),
                                    Path(str(state_dir)) if state_dir else settings.feature_cache_dir,
                                    FeatureSpec(settings.features, settings.n_mels), speakers)
    from simulations.partition import client_shards  # flwr-datasets: simulation only

    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    if num_partitions != settings.num_clients:
        raise CorpusError(f"the federation has {num_partitions} nodes but num-clients is "
                          f"{settings.num_clients}; make them equal")
    return load_speaker_data(settings).train_examples(client_shards(settings)[partition_id])


def ledger_path(settings: RunSettings, context: Context, config) -> Path:
    """Where this client keeps its privacy ledger, one file per federation: in the
    device's state-dir, or in simulation a folder per partition in the cache. On disk
    rather than in Flower's context, so a restarted SuperNode or a resumed run goes on
    counting what was spent."""
    federation = str(config.get(FEDERATION_ID, "")) or f"run-{context.run_id}"
    state_dir = context.node_config.get("state-dir")
    root = (Path(str(state_dir)) if state_dir else settings.feature_cache_dir / "client-state"
            / f"partition-{int(context.node_config.get('partition-id', 0))}")
    return root / "ledgers" / f"{federation}.json"
