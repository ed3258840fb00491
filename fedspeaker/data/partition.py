"""Split training utterances across simulated clients with flwr-datasets partitioners.

``natural`` is a device population: every device holds the recordings of one owner (or
of a household of ``household-size`` speakers), and there may be many more devices than
speakers: a speaker's utterances are then spread over several devices, a few each, as
a voice-unlock enrolment would be.
"""

from __future__ import annotations

import random
from functools import lru_cache

from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    Partitioner,
    SizePartitioner,
)

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_split
from fedspeaker.errors import CorpusError

disable_progress_bar()  # flwr-datasets' partitioners would draw one per partitioning


@lru_cache(maxsize=4)
def client_shards(settings: RunSettings) -> list[list[int]]:
    """Each simulated client's indices into the run's training utterances.

    Cached: a Ray actor serving many clients and rounds partitions once.
    """
    return shards_of(settings, [u.speaker for u in load_split(settings).train])


def shards_of(settings: RunSettings, speakers: list[str]) -> list[list[int]]:
    """The run's partition of training utterances whose speakers are ``speakers``."""
    return partition_indices(speakers, settings.num_clients, settings.partition, seed=settings.seed,
                             alpha=settings.alpha, speakers_per_client=settings.speakers_per_client,
                             size_exponent=settings.size_exponent,
                             household_size=settings.household_size)


@lru_cache(maxsize=4)
def client_test_shards(settings: RunSettings) -> list[list[int]]:
    """Each simulated client's held-out utterances (indices into the split's test set), to
    score models on the devices: a speaker's test utterances dealt out, in seeded order,
    over the clients that hold that speaker's training utterances."""
    split = load_split(settings)
    holders: dict[str, list[int]] = {}
    for client, shard in enumerate(client_shards(settings)):
        for speaker in sorted({split.train[i].speaker for i in shard}):
            holders.setdefault(speaker, []).append(client)
    shards: list[list[int]] = [[] for _ in range(settings.num_clients)]
    dealt: dict[str, int] = {}
    order = list(range(len(split.test)))
    random.Random(f"{settings.seed}-test-deal").shuffle(order)
    for i in order:
        speaker = split.test[i].speaker
        if speaker in holders:
            k = dealt.get(speaker, 0)
            shards[holders[speaker][k % len(holders[speaker])]].append(i)
            dealt[speaker] = k + 1
    return [sorted(shard) for shard in shards]


def partition_indices(speakers: list[str], num_clients: int, scheme: str, *, seed: int,
                      alpha: float = 0.5, speakers_per_client: int = 2,
                      size_exponent: float = 1.0, household_size: int = 1) -> list[list[int]]:
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
        household_size: speakers per device (``natural``): 1, one owner each.
    """
    if num_clients > len(speakers):
        raise CorpusError(f"{num_clients} clients but only {len(speakers)} training utterances: "
                          "some clients would have no data; use fewer --clients")
    order = list(range(len(speakers)))
    random.Random(seed).shuffle(order)  # IidPartitioner shards in row order
    table = Dataset.from_dict({"index": order, "speaker": [speakers[i] for i in order]})
    if scheme == "natural":
        devices = device_ids(speakers, num_clients, household_size, seed)
        table = table.add_column("device", [devices[i] for i in order])
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
    return NaturalIdPartitioner("device")  # natural (RunSettings checks the scheme's name)


def device_ids(speakers: list[str], num_devices: int, household_size: int, seed: int) -> list[str]:
    """The device each training utterance lives on, in a population of ``num_devices``.

    Speakers are grouped into households of ``household_size`` (drawn by seed); each
    household gets devices in proportion to its utterances (at least one, and no more
    than its smallest member has utterances), and each member's utterances, shuffled by
    seed, are dealt out over the household's devices, so every device holds a few
    recordings of every member and no recording is on two devices.
    """
    by_speaker: dict[str, list[int]] = {}
    for i, speaker in enumerate(speakers):
        by_speaker.setdefault(speaker, []).append(i)
    names = sorted(by_speaker)
    rng = random.Random(f"{seed}-households")
    rng.shuffle(names)
    households = [names[i:i + household_size] for i in range(0, len(names), household_size)]
    if num_devices < len(households):
        raise CorpusError(f"--partition natural needs at least one client per "
                          f"{'speaker' if household_size == 1 else 'household'}: use --clients "
                          f"{len(households)} or more (got {num_devices})")
    sizes = [sum(len(by_speaker[m]) for m in h) for h in households]
    caps = [min(len(by_speaker[m]) for m in h) for h in households]
    counts = _apportion(num_devices, sizes, caps)
    device = [""] * len(speakers)
    for h, (members, count) in enumerate(zip(households, counts)):
        for member in members:
            utterances = list(by_speaker[member])
            random.Random(f"{seed}-deal-{member}").shuffle(utterances)
            for k, i in enumerate(utterances):
                device[i] = f"h{h:05d}-d{k % count:05d}"
    return device


def _apportion(total: int, sizes: list[int], caps: list[int]) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainder), each share in
    [1, cap]; a CorpusError if the caps cannot hold it."""
    if total > sum(caps):
        raise CorpusError(f"--partition natural: {total} clients need more utterances than the "
                          f"corpus has ({sum(caps)} devices at most, one utterance of every member "
                          "each); use fewer --clients")
    counts = [1] * len(sizes)
    while sum(counts) < total:
        # the share furthest below its due, among those with room
        due = [total * size / sum(sizes) - count if count < cap else float("-inf")
               for size, count, cap in zip(sizes, counts, caps)]
        counts[due.index(max(due))] += 1
    return counts
