"""The Flower ClientApp: DP-SGD on the client's own utterances; only weights leave.

One train handler, read top to bottom: the request, this node's utterances, the
privacy ledger and budget, training, the reply. What only some runs need (SecAgg+,
client-side clipping, simulated scenarios) comes in as mods (client/mods.py).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.backend import backend_statistics
from client.data import held_out_examples, training_examples, training_labels
from client.evaluate import score_on_device
from client.footprint import footprint
from client.messages import TrainRequest
from client.replay import LastUpdate, request_key
from client.mods import device_dp_clipping, secure_aggregation, simulated_scenarios
from client.node import Node
from fedspeaker import wire
from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError
from fedspeaker.data.speakers import load_split
from fedspeaker.model import build_model
from fedspeaker.model.backend import encoder_fingerprint
from fedspeaker.privacy.noise import noise_generator, release_seed
from fedspeaker.training.local import LocalTrainer, dp_plan, round_seed, spend_cap

app = ClientApp()


@app.train(mods=[secure_aggregation, device_dp_clipping, simulated_scenarios])
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one CPU per client actor; more threads only contend
    started = time.monotonic()
    settings = RunSettings.from_run_config(context.run_config)
    request = TrainRequest.of(msg)
    node = Node.of(context)
    feats, labels = training_examples(settings, node, request.speakers, augmented=True)
    n_speakers = len(request.speakers) or len(load_split(settings).speakers)
    if settings.dp:  # Opacus is imported lazily; its ~1 s belongs to start-up, not training
        importlib.import_module("opacus")
    data_ready = time.monotonic()

    run = _run_name(request.federation_id, context)
    device_ledger = node.ledger(settings, run)
    last = None if node.simulated or request.fitins else \
        LastUpdate(device_ledger.path.parent / "last-update" / f"{run}.pt")
    key = request_key(request.server_round, msg.content[wire.ARRAYS]) if last else ""
    if last and (again := last.get(key)):  # a resumed run asks again for what was sent
        return request.reply(again["state"], again["examples"], again["metrics"])
    ledger = device_ledger.open(run, settings.accountant)
    trainer = LocalTrainer(settings, n_speakers)
    planned = (dp_plan(settings, len(feats), step_fraction=request.step_fraction, speakers=len(set(labels)))
               if settings.dp else None)
    policy = node.policy()
    refusal = policy.refusal(settings, ledger, planned) if policy else None
    if refusal and request.fitins:  # a SecAgg+ round has no way to reply without weights
        raise FedSpeakerError(f"this device's privacy policy refuses the run: {refusal}")
    if refusal:
        return request.refuse(refusal, {wire.NUM_EXAMPLES: 0, wire.TRAIN_SECONDS: time.monotonic() - started})
    if planned and spend_cap(settings) > 0:
        if ledger.epsilon_after(planned, settings.delta) > spend_cap(settings):
            return request.reply_without_weights({
                wire.NUM_EXAMPLES: 0, wire.SAT_OUT: 1, wire.EPSILON: ledger.epsilon(settings.delta),
                wire.TRAIN_SECONDS: time.monotonic() - started})
    if planned:  # reserved before training: a run beside this one sees these steps as spent
        device_ledger.record(run, replace(ledger, history=[*ledger.history, tuple(planned)]))

    trainer.model.load_state_dict(request.global_state(trainer.model))
    fit_started = time.monotonic()
    loss = trainer.train(feats, labels, ledger, seed=round_seed(settings.seed, node.partition, request.server_round),
                         seeded_noise=node.seeded_noise(settings),
                         proximal_mu=request.proximal_mu, step_fraction=request.step_fraction)
    fit_seconds = time.monotonic() - fit_started
    if settings.dp:
        device_ledger.record(run, ledger)

    metrics = {wire.NUM_EXAMPLES: len(feats), wire.UNIT_WEIGHT: 1, wire.TRAIN_LOSS: loss,
               wire.TRAIN_SECONDS: time.monotonic() - started,
               **footprint(started, data_ready, fit_seconds)}
    if settings.dp:
        metrics[wire.EPSILON] = ledger.epsilon(settings.delta)
        metrics[wire.LIFETIME_EPSILON] = ledger.lifetime_epsilon(settings.delta)
    own_classes = sorted(set(labels)) if settings.class_vectors == "own" else None
    if last and own_classes is None:
        last.put(key, trainer.model.state_dict(), len(feats), metrics)
    return request.reply(trainer.model.state_dict(), len(feats), metrics, own_classes=own_classes)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this node's held-out recordings; only counts travel."""
    settings, config, speakers, model = _global_model(msg, context)
    node = Node.of(context)
    counts = score_on_device(
        model, enrol=training_examples(settings, node, speakers),
        held_out=held_out_examples(settings, node, speakers),
        cohort=torch.from_numpy(msg.content[wire.COHORT][wire.COHORT_EMBEDDINGS].numpy().copy()),
        threshold=float(config[wire.THRESHOLD]))
    return Message(content=RecordDict({wire.METRICS: MetricRecord(counts)}), reply_to=msg)


def _run_name(federation_id: str, context: Context) -> str:
    """The run a device's ledger files this run's steps under: the federation the server
    names (the same across a resume), else Flower's run."""
    return federation_id or f"run-{context.run_id}"


def _global_model(msg: Message, context: Context) -> tuple[RunSettings, ConfigRecord, list[str], torch.nn.Module]:
    """What an evaluate or a back-end query starts from: the run's settings, the message's
    config and speakers, and the global model it carries, on one thread."""
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config(context.run_config)
    config = msg.content[wire.CONFIG]
    speakers = wire.speakers_from_config(config)
    model = build_model(settings, len(speakers))
    model.load_state_dict(msg.content[wire.ARRAYS].to_torch_state_dict())
    return settings, config, speakers, model


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """This simulated node's partition id (-1 on a device): the server draws a round's
    clients by it, since a simulation's node ids change at every launch."""
    partition_id = Node.of(context).reported_partition
    return Message(content=RecordDict({wire.NODE: ConfigRecord({wire.PARTITION_ID: partition_id})}),
                   reply_to=msg)


@app.query("backend")
def backend(msg: Message, context: Context) -> Message:
    """The scoring back end's statistics of this node's training recordings under the
    global model the message carries (client/backend.py); only a sum and a count leave."""
    settings, config, speakers, model = _global_model(msg, context)
    node = Node.of(context)
    copies = None
    if settings.backend_whiten:  # the recordings with their augmented copies, the clean ones first
        copies, labels = training_examples(settings, node, speakers, augmented=True)
        feats = [c[0] for c in copies]
    else:
        feats, labels = training_examples(settings, node, speakers)
    run = _run_name(str(config.get(wire.FEDERATION_ID, "")), context)
    device_ledger = node.ledger(settings, run)
    ledger = device_ledger.open(run, settings.accountant)
    policy = node.policy()
    sums, metrics = backend_statistics(
        settings, model, feats, labels, ledger, copies=copies,
        refusal=(lambda step: policy.backend_refusal(settings, ledger, step)) if policy else None,
        generator=noise_generator(release_seed(settings.seed, node.partition, encoder_fingerprint(model)))
        if node.seeded_noise(settings) else None)
    if wire.REFUSAL in metrics:
        return Message(content=RecordDict({wire.REFUSAL: ConfigRecord({wire.REASON: metrics[wire.REFUSAL]})}),
                       reply_to=msg)
    content = RecordDict({wire.METRICS: MetricRecord(metrics),
                          wire.CONFIG: ConfigRecord({wire.FINGERPRINT: encoder_fingerprint(model)})})
    if sums is not None:
        if settings.backend_privacy:
            device_ledger.record(run, ledger)
        arrays = {wire.BACKEND_SUM: sums.total.contiguous()}
        if sums.scatter is not None:
            arrays[wire.BACKEND_SCATTER] = sums.scatter.contiguous()
        content[wire.BACKEND] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@app.query("own_classes")
def own_classes(msg: Message, context: Context) -> Message:
    """class-vectors=own: tell the server which speakers' class vectors this node trains
    (their rows), so that it sends this node those and no others."""
    settings = RunSettings.from_run_config(context.run_config)
    speakers = wire.speakers_from_config(msg.content[wire.CONFIG])
    own = sorted(set(training_labels(settings, Node.of(context), speakers)))
    return Message(content=RecordDict({wire.FEDAWS: ConfigRecord({wire.OWN_CLASSES: own})}), reply_to=msg)

