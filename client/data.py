"""A client's training utterances: a device's own folder, or a simulated client's shard."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context

from fedspeaker.config import RunSettings
from fedspeaker.data.corpus import Utterance
from fedspeaker.data.speakers import device_utterances, load_device_examples, load_examples, load_split
from fedspeaker.errors import CorpusError


def is_simulated(context: Context) -> bool:
    """A node of Flower's Simulation Engine (it has a partition id and no folder of its own)."""
    return "data-dir" not in context.node_config


def training_examples(settings: RunSettings, context: Context, speakers: list[str], *,
                      augmented: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    """This node's training utterances and labels: a device's own folder (node-config
    ``data-dir``), or in simulation its shard of the corpus (by partition-id).
    ``augmented`` (what training reads, under ``augment``): each recording with its
    augmented copies, (1 + augment-copies, channels, frames)."""
    if augmented and settings.augment:
        return _augmented(settings, context, speakers)
    if not is_simulated(context):
        part = "train" if settings.fraction_evaluate else "all"  # held-out ones score models
        return _device(settings, context, speakers, part)
    return simulated_examples(settings, context)


def held_out_examples(settings: RunSettings, context: Context,
                      speakers: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """This node's recordings kept out of training, to score models with: on a device one
    in five of its own (by content); in simulation its share of its speakers' test
    utterances."""
    if not is_simulated(context):
        return _device(settings, context, speakers, "held-out")
    from fedspeaker.data.partition import client_test_shards

    split = load_split(settings)
    mine = [split.test[i] for i in client_test_shards(settings)[int(context.node_config["partition-id"])]]
    return load_examples(settings, mine), [split.labels[u.speaker] for u in mine]


def _device(settings: RunSettings, context: Context, speakers: list[str],
            part: str) -> tuple[list[torch.Tensor], list[int]]:
    if not speakers:
        raise CorpusError("the server sent no speaker list; is it an older fedspeaker?")
    state_dir = context.node_config.get("state-dir")
    return load_device_examples(Path(str(context.node_config["data-dir"])).expanduser(),
                                Path(str(state_dir)) if state_dir else settings.feature_cache_dir,
                                settings.feature_spec, speakers, part=part)


def _augmented(settings: RunSettings, context: Context,
               speakers: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """This node's training recordings with their augmented copies (data/augment.py),
    babble made of its own other speakers' recordings."""
    from fedspeaker.data.augment import augmented_examples

    if is_simulated(context):
        utterances, labels = _simulated_shard(settings, context)
        cache_dir = settings.feature_cache_dir
    else:
        if not speakers:
            raise CorpusError("the server sent no speaker list; is it an older fedspeaker?")
        part = "train" if settings.fraction_evaluate else "all"
        utterances = device_utterances(Path(str(context.node_config["data-dir"])).expanduser(), speakers,
                                       part=part)
        labels = [speakers.index(u.speaker) for u in utterances]
        state_dir = context.node_config.get("state-dir")
        cache_dir = Path(str(state_dir)) if state_dir else settings.feature_cache_dir
    feats, labels = augmented_examples(settings.augment, settings.augment_copies, settings.seed,
                                       settings.feature_spec, cache_dir, utterances, labels)
    if not feats:
        raise CorpusError("no usable recordings of the federation's speakers on this device")
    return feats, labels


def training_labels(settings: RunSettings, context: Context, speakers: list[str]) -> list[int]:
    """The labels of this node's training utterances, without their features where that
    is possible (in simulation): which speakers it holds."""
    if not is_simulated(context):
        return training_examples(settings, context, speakers)[1]
    return _simulated_shard(settings, context)[1]


def simulated_examples(settings: RunSettings, context: Context) -> tuple[list[torch.Tensor], list[int]]:
    """A simulated client's shard (only its features are loaded), with wrong labels if the
    scenario makes it a label flipper."""
    mine, labels = _simulated_shard(settings, context)
    return load_examples(settings, mine), labels


def _simulated_shard(settings: RunSettings, context: Context) -> tuple[list[Utterance], list[int]]:
    from fedspeaker.data.partition import client_shards  # flwr-datasets: simulation only

    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    if num_partitions != settings.num_clients:
        raise CorpusError(f"the federation has {num_partitions} nodes but num-clients is "
                          f"{settings.num_clients}; make them equal")
    split = load_split(settings)
    mine = [split.train[i] for i in client_shards(settings)[partition_id]]
    labels = [split.labels[u.speaker] for u in mine]
    if settings.byzantine_fraction and settings.attack == "label-flip":
        from client.scenarios import client_role, flip_labels

        if client_role(settings, partition_id).byzantine:
            labels = flip_labels(labels, len(split.speakers))
    return mine, labels
