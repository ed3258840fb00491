"""A client's training utterances: a device's own folder, or a simulated client's shard."""

from __future__ import annotations

import torch

from client.node import Node
from fedspeaker.config import RunSettings
from fedspeaker.data.corpus import Utterance
from fedspeaker.data.features import FeatureSpec
from fedspeaker.data.speakers import device_utterances, load_device_examples, load_examples, load_split
from fedspeaker.errors import CorpusError


def training_examples(settings: RunSettings, node: Node, speakers: list[str], *,
                      augmented: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    """This node's training utterances and labels: a device's own folder (node-config
    ``data-dir``), or in simulation its shard of the corpus (by partition-id).
    ``augmented`` (what training reads, under ``augment``): each recording with its
    augmented copies, (1 + augment-copies, channels, frames)."""
    if augmented and settings.augment:
        return _augmented(settings, node, speakers)
    if node.simulated:
        return simulated_examples(settings, node)
    return _device(settings, node, speakers, _training_part(settings))


def held_out_examples(settings: RunSettings, node: Node,
                      speakers: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """This node's recordings kept out of training, to score models with: on a device one
    in five of its own (by content); in simulation its share of its speakers' test
    utterances."""
    if not node.simulated:
        return _device(settings, node, speakers, "held-out")
    from fedspeaker.data.partition import client_test_shards

    split = load_split(settings)
    mine = [split.test[i] for i in client_test_shards(settings)[node.partition]]
    return load_examples(settings, mine), [split.labels[u.speaker] for u in mine]


def _training_part(settings: RunSettings) -> str:
    """A device trains on all its recordings, or, where the federation scores models on
    the devices, on those it does not hold out for that."""
    return "train" if settings.fraction_evaluate else "all"


def _device(settings: RunSettings, node: Node, speakers: list[str],
            part: str) -> tuple[list[torch.Tensor], list[int]]:
    if not speakers:
        raise CorpusError("the server sent no speaker list; is it an older fedspeaker?")
    return load_device_examples(node.data_dir, node.cache_dir(settings),
                                FeatureSpec.of(settings), speakers, part=part)


def _augmented(settings: RunSettings, node: Node,
               speakers: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """This node's training recordings with their augmented copies (data/augment.py),
    babble made of its own other speakers' recordings."""
    from fedspeaker.data.augment import augmented_examples

    if node.simulated:
        utterances, labels = _simulated_shard(settings, node)
    else:
        if not speakers:
            raise CorpusError("the server sent no speaker list; is it an older fedspeaker?")
        utterances = device_utterances(node.data_dir, speakers, part=_training_part(settings))
        labels = [speakers.index(u.speaker) for u in utterances]
    feats, labels = augmented_examples(settings.augment, settings.augment_copies, settings.seed,
                                       FeatureSpec.of(settings), node.cache_dir(settings), utterances, labels)
    if not feats:
        raise CorpusError("no usable recordings of the federation's speakers on this device")
    return feats, labels


def training_labels(settings: RunSettings, node: Node, speakers: list[str]) -> list[int]:
    """The labels of this node's training utterances, without their features where that
    is possible (in simulation): which speakers it holds."""
    if not node.simulated:
        return training_examples(settings, node, speakers)[1]
    return _simulated_shard(settings, node)[1]


def simulated_examples(settings: RunSettings, node: Node) -> tuple[list[torch.Tensor], list[int]]:
    """A simulated client's shard (only its features are loaded), with wrong labels if the
    scenario makes it a label flipper."""
    mine, labels = _simulated_shard(settings, node)
    return load_examples(settings, mine), labels


def _simulated_shard(settings: RunSettings, node: Node) -> tuple[list[Utterance], list[int]]:
    from fedspeaker.data.partition import client_shards  # flwr-datasets: simulation only

    if node.num_partitions != settings.num_clients:
        raise CorpusError(f"the federation has {node.num_partitions} nodes but num-clients is "
                          f"{settings.num_clients}; make them equal")
    split = load_split(settings)
    mine = [split.train[i] for i in client_shards(settings)[node.partition]]
    labels = [split.labels[u.speaker] for u in mine]
    if settings.byzantine_fraction:  # a scenario: only its runs import client/scenarios.py
        from client.scenarios import flip_labels

        labels = flip_labels(settings, node.partition, labels, len(split.speakers))
    return mine, labels
