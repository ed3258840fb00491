"""Split training utterances across simulated clients with flwr-datasets partitioners."""

from __future__ import annotations

import random
from functools import lru_cache

from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    Partitioner,
    SizePartitioner,
)

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import CorpusError


@lru_cache(maxsize=4)
def client_shards(settings: RunSettings) -> list[list[int]]:
    """Each simulated client's indices into the run's training utterances.

    Cached: a Ray actor serving many clients and rounds partitions once.
    """
    speakers = [u.speaker for u in load_speaker_data(settings).split.train]
    return partition_indices(speakers, settings.num_clients, settings.partition, seed=settings.seed,
                             alpha=settings.alpha, speakers_per_client=settings.speakers_per_client,
                             size_exponent=settings.size_exponent)


def partition_indices(speakers: list[str], num_clients: int, scheme: str, *, seed: int,
                      alpha: float = 0.5, speakers_per_client: int = 2,
                      size_exponent: float = 1.0) -> list[list[int]]:
    """Indices into ``speakers`` (one entry per training utterance) for each client.

    Disjoint, covering (except where a scheme drops speakers by design), and the same
    for the same seed on every machine, so each client can compute its own shard.

    Args:
        speakers: the speaker of each training utterance, in the run's order.
        num_clients: how many shards.
        scheme: ``iid``, ``dirichlet``, ``pathological``, ``natural`` or ``power-law``.
        seed: the same seed gives the same shards everywhere.
        alpha: Dirichlet concentration over speakers (``dirichlet``; smaller is more skewed).
        speakers_per_client: speakers each client draws (``pathological``).
        size_exponent: shard sizes ~ rank^-exponent (``power-law``).
    """
    if num_clients > len(speakers):
        raise CorpusError(f"{num_clients} clients but only {len(speakers)} training utterances: "
                          "some clients would have no data; use fewer --clients")
    order = list(range(len(speakers)))
    random.Random(seed).shuffle(order)  # IidPartitioner shards in row order
    table = Dataset.from_dict({"index": order, "speaker": [speakers[i] for i in order]})
    if scheme == "power-law":
        partitioner: Partitioner = SizePartitioner(power_law_sizes(len(speakers), num_clients,
                                                                   size_exponent, seed))
    else:
        partitioner = _partitioner(scheme, num_clients, len(set(speakers)), seed, alpha,
                                   speakers_per_client)
    partitioner.dataset = table
    try:
        shards = [sorted(partitioner.load_partition(i)["index"]) for i in range(num_clients)]
    except (ValueError, IndexError) as exc:
        raise CorpusError(
            f"--partition {scheme} cannot split {len(speakers)} utterances of "
            f"{len(set(speakers))} speakers across {num_clients} clients ({exc}); use fewer "
            "--clients or a larger --alpha"
        ) from None
    empty = [i for i, shard in enumerate(shards) if not shard]
    if empty:
        raise CorpusError(
            f"--partition {scheme} leaves client(s) {empty} with no data out of {num_clients}; "
            "use fewer --clients, a larger --alpha, or another --partition"
        )
    return shards


def power_law_sizes(total: int, num_clients: int, exponent: float, seed: int) -> list[int]:
    """Quantity skew: the client of size rank k (1 = largest) holds a share ~ k^-exponent.

    Every client gets at least one utterance; which client is large is drawn by seed.
    Exponent 0 gives equal sizes.
    """
    weights = [(rank + 1) ** -exponent for rank in range(num_clients)]
    spare = total - num_clients
    sizes = [1 + int(spare * w / sum(weights)) for w in weights]
    sizes[0] += total - sum(sizes)  # rounding leftovers go to the largest client
    ranks = list(range(num_clients))
    random.Random(f"{seed}-sizes").shuffle(ranks)
    return [sizes[r] for r in ranks]


def _partitioner(scheme: str, num_clients: int, num_speakers: int, seed: int, alpha: float,
                 speakers_per_client: int) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(num_clients, "speaker", alpha, min_partition_size=1,
                                    self_balancing=False, seed=seed)
    if scheme == "pathological":
        if speakers_per_client > num_speakers:
            raise CorpusError(f"--speakers-per-client {speakers_per_client} is more than the "
                              f"{num_speakers} training speakers")
        return PathologicalPartitioner(num_clients, "speaker", speakers_per_client,
                                       class_assignment_mode="random", seed=seed)
    if scheme == "natural":
        if num_clients != num_speakers:
            raise CorpusError(f"--partition natural gives one client per training speaker: "
                              f"use --clients {num_speakers} (got {num_clients})")
        return NaturalIdPartitioner("speaker")
    raise CorpusError(f"unknown partition {scheme!r}")
