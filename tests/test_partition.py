"""partition_indices over flwr-datasets partitioners."""

from __future__ import annotations

from collections import Counter

import pytest

from fedspeaker.data.corpus import scan_corpus, split_corpus
from fedspeaker.errors import CorpusError
from fedspeaker.data.partition import partition_indices

N_CLIENTS = 10

# flwr-datasets warns about dropped classes and Dirichlet resampling; both are expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:flwr_datasets")


def _synthetic_speakers() -> list[str]:
    # 26 training speakers x 32 utterances, interleaved (order must not matter)
    return [f"spk{i:02d}" for _ in range(32) for i in range(26)]


@pytest.fixture(scope="module")
def bundled_train_speakers() -> list[str]:
    from conftest import BUNDLED_CORPUS

    if not BUNDLED_CORPUS.is_dir():
        pytest.skip("bundled corpus not present")
    split = split_corpus(scan_corpus(BUNDLED_CORPUS)[0], seed=0)
    return [u.speaker for u in split.train]


@pytest.fixture(params=["synthetic", "bundled"])
def speakers(request) -> list[str]:
    if request.param == "synthetic":
        return _synthetic_speakers()
    return request.getfixturevalue("bundled_train_speakers")


def _check_disjoint_cover(shards: list[list[int]], n: int, cover: bool = True) -> None:
    assert len(shards) == N_CLIENTS
    assert all(len(s) > 0 for s in shards), [len(s) for s in shards]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)), "an index is in two shards"
    assert all(0 <= i < n for i in flat)
    if cover:
        assert sorted(flat) == list(range(n))
    for s in shards:
        assert s == sorted(s)


def test_speaker_sources_have_expected_size(speakers):
    assert len(speakers) == 26 * 32
    assert set(Counter(speakers).values()) == {32}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_disjoint_covering_nonempty(speakers, scheme):
    shards = partition_indices(speakers, N_CLIENTS, scheme, seed=0, alpha=0.5)
    _check_disjoint_cover(shards, len(speakers))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_same_seed_same_shards_other_seed_different(speakers, scheme):
    a = partition_indices(speakers, N_CLIENTS, scheme, seed=0, alpha=0.5)
    b = partition_indices(list(speakers), N_CLIENTS, scheme, seed=0, alpha=0.5)
    c = partition_indices(speakers, N_CLIENTS, scheme, seed=1, alpha=0.5)
    assert a == b
    assert a != c


def test_iid_shards_are_balanced_and_mixed(speakers):
    shards = partition_indices(speakers, N_CLIENTS, "iid", seed=0)
    sizes = sorted(len(s) for s in shards)
    assert sizes[0] == len(speakers) // N_CLIENTS  # 83
    assert sizes[-1] - sizes[0] <= 1
    # a shuffled IID shard of 83 utterances sees most of the 26 speakers
    for s in shards:
        assert len({speakers[i] for i in s}) >= 15


def test_dirichlet_is_more_skewed_than_iid(speakers):
    def mean_top_share(shards):
        shares = []
        for s in shards:
            counts = Counter(speakers[i] for i in s)
            shares.append(max(counts.values()) / len(s))
        return sum(shares) / len(shares)

    iid = partition_indices(speakers, N_CLIENTS, "iid", seed=0)
    dirichlet = partition_indices(speakers, N_CLIENTS, "dirichlet", seed=0, alpha=0.5)
    assert mean_top_share(dirichlet) > mean_top_share(iid) + 0.05
    # and a larger alpha is closer to iid
    flat = partition_indices(speakers, N_CLIENTS, "dirichlet", seed=0, alpha=1000.0)
    assert mean_top_share(flat) < mean_top_share(dirichlet)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_each_client_at_most_k_speakers(speakers, k):
    shards = partition_indices(speakers, N_CLIENTS, "pathological", seed=0, speakers_per_client=k)
    _check_disjoint_cover(shards, len(speakers), cover=False)  # unused speakers are dropped
    for s in shards:
        assert 1 <= len({speakers[i] for i in s}) <= k


def test_pathological_rejects_more_speakers_per_client_than_speakers():
    with pytest.raises(CorpusError, match="speakers-per-client 30"):
        partition_indices(_synthetic_speakers(), N_CLIENTS, "pathological", seed=0,
                          speakers_per_client=30)


def test_natural_gives_one_speaker_per_client(speakers):
    shards = partition_indices(speakers, 26, "natural", seed=0)
    assert len(shards) == 26
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(speakers)))
    owners = []
    for s in shards:
        who = {speakers[i] for i in s}
        assert len(who) == 1
        assert len(s) == 32
        owners.append(who.pop())
    assert sorted(owners) == sorted(set(speakers))
    # the seed may change which client gets which speaker, never the shards themselves
    other = partition_indices(speakers, 26, "natural", seed=3)
    assert sorted(map(tuple, other)) == sorted(map(tuple, shards))


@pytest.mark.parametrize("clients", [10, 25])
def test_natural_requires_one_client_per_speaker(clients):
    with pytest.raises(CorpusError) as info:
        partition_indices(_synthetic_speakers(), clients, "natural", seed=0)
    assert "--clients 26 or more" in str(info.value)
    assert f"got {clients}" in str(info.value)


def test_a_thousand_devices_with_one_owner_each():
    speakers = [f"s{i:02d}" for i in range(26) for _ in range(80)]  # the full corpus' 2,080
    shards = partition_indices(speakers, 1000, "natural", seed=0)
    assert len(shards) == 1000
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(speakers)))  # disjoint and covering
    assert all(len({speakers[i] for i in s}) == 1 for s in shards)  # one speaker each
    assert {len(s) for s in shards} <= {2, 3}  # about two recordings each
    owners = [speakers[s[0]] for s in shards]
    assert all(38 <= owners.count(f"s{i:02d}") <= 39 for i in range(26))  # spread evenly
    assert partition_indices(speakers, 1000, "natural", seed=0) == shards  # seeded
    assert partition_indices(speakers, 1000, "natural", seed=1) != shards


def test_households_put_k_speakers_on_every_device():
    speakers = [f"s{i:02d}" for i in range(26) for _ in range(80)]
    shards = partition_indices(speakers, 100, "natural", seed=0, household_size=3)
    members = [{speakers[i] for i in s} for s in shards]
    assert sorted({len(m) for m in members}) == [2, 3]  # 26 = 8 households of 3 and one of 2
    households = {frozenset(m) for m in members}
    assert len(households) == 9 and sum(map(len, households)) == 26  # each speaker in one household
    assert sorted(i for s in shards for i in s) == list(range(len(speakers)))


def test_more_devices_than_a_household_can_fill_is_refused():
    speakers = [f"s{i}" for i in range(2) for _ in range(5)]  # one household of two, 5 each
    assert len(partition_indices(speakers, 5, "natural", seed=0, household_size=2)) == 5
    with pytest.raises(CorpusError, match="5 devices at most"):
        partition_indices(speakers, 6, "natural", seed=0, household_size=2)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_more_clients_than_utterances_raises_mentioning_clients(scheme):
    speakers = [f"s{i}" for i in range(4) for _ in range(5)]  # 20 utterances
    with pytest.raises(CorpusError) as info:
        partition_indices(speakers, 21, scheme, seed=0)
    assert "--clients" in str(info.value)


def test_iid_with_exactly_one_utterance_per_client():
    speakers = [f"s{i}" for i in range(4) for _ in range(5)]
    shards = partition_indices(speakers, 20, "iid", seed=0)
    assert sorted(len(s) for s in shards) == [1] * 20
    assert sorted(i for s in shards for i in s) == list(range(20))


def test_dirichlet_that_cannot_fill_every_client_raises_mentioning_clients():
    # 4 speakers x 3 utterances over 12 clients with a small alpha: some client
    # always ends up empty, so the partitioner gives up.
    speakers = [f"s{i}" for i in range(4) for _ in range(3)]
    with pytest.raises(CorpusError) as info:
        partition_indices(speakers, 12, "dirichlet", seed=0, alpha=0.1)
    assert "--clients" in str(info.value)


def test_power_law_sizes_follow_the_exponent_and_cover_everything() -> None:
    from fedspeaker.data.partition import power_law_sizes

    sizes = power_law_sizes(1000, 10, 1.0, seed=0)
    assert sum(sizes) == 1000 and min(sizes) >= 1
    ranked = sorted(sizes, reverse=True)
    assert ranked[0] / ranked[1] == pytest.approx(2.0, rel=0.05)  # 1 / 2^-1
    assert ranked[0] / ranked[9] == pytest.approx(10.0, rel=0.15)  # 1 / 10^-1
    assert power_law_sizes(1000, 10, 1.0, seed=1) != sizes  # which client is large: by seed
    assert sorted(power_law_sizes(1000, 10, 1.0, seed=1)) == sorted(sizes)
    assert set(power_law_sizes(100, 10, 0.0, seed=0)) == {10}  # exponent 0: equal shards
    assert min(power_law_sizes(12, 10, 3.0, seed=0)) == 1  # tiny corpus: nobody left empty


def test_power_law_partition_is_disjoint_and_covering() -> None:
    speakers = [f"s{i % 7}" for i in range(300)]
    shards = partition_indices(speakers, 6, "power-law", seed=2, size_exponent=1.5)
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(300))
    sizes = sorted(len(s) for s in shards)
    assert sizes[-1] > 5 * sizes[0]


def test_a_simulated_client_loads_only_its_own_features(synthetic_corpus, cache_dir):
    from flwr.app import Context, RecordDict

    import fedspeaker.data.speakers as speakers_module
    from client.data import simulated_examples
    from client.node import Node
    from fedspeaker.config import RunSettings
    from fedspeaker.data.partition import client_shards

    settings = RunSettings(model="tdnn", data_dir=str(synthetic_corpus.root), cache_dir=str(cache_dir),
                           num_clients=3, partition="iid")
    speakers_module.load_speaker_data(settings)  # the server (or `simulate`) warms the cache
    speakers_module._load.cache_clear()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3},
                      state=RecordDict(), run_config=settings.to_run_config())
    feats, labels = simulated_examples(settings, Node.of(context))
    assert speakers_module._load.cache_info().currsize == 0  # the whole corpus was never loaded
    assert len(feats) == len(labels) == len(client_shards(settings)[1])


def test_a_byzantine_client_of_a_label_flip_run_loads_its_shard_under_wrong_names(synthetic_corpus, cache_dir):
    from flwr.app import Context, RecordDict

    from client.data import training_labels
    from client.node import Node
    from client.scenarios import client_role
    from fedspeaker.config import RunSettings
    from fedspeaker.data.speakers import load_split

    honest = RunSettings(model="tdnn", data_dir=str(synthetic_corpus.root), cache_dir=str(cache_dir),
                         num_clients=3, partition="iid")
    attacked = honest.replace(byzantine_fraction=0.34, attack="label-flip")
    n = len(load_split(honest).speakers)
    flipped = 0
    for partition in range(3):
        node = Node.of(Context(run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 3},
                               state=RecordDict(), run_config={}))
        own, seen = training_labels(honest, node, []), training_labels(attacked, node, [])
        byzantine = client_role(attacked, partition).byzantine
        assert seen == ([n - 1 - y for y in own] if byzantine else own)
        flipped += byzantine and seen != own
    assert flipped == 1


def test_device_data_links_the_simulation_shards_without_computing_features(tmp_path) -> None:
    """`fedspeaker device-data` decodes to check files but computes no features, and links
    exactly the shards a simulation with the same settings trains on."""
    from fedspeaker.config import RunSettings
    from fedspeaker.data.partition import client_shards
    from fedspeaker.data.speakers import load_split
    from simulations.loopback import device_folders

    settings = RunSettings(num_clients=3, partition="dirichlet", seed=1)
    empty_cache = tmp_path / "cache"
    folders = device_folders(settings.replace(cache_dir=str(empty_cache)), tmp_path / "devices")
    assert not empty_cache.exists() or not any(empty_cache.rglob("*.npy"))
    train = load_split(settings).train
    for folder, shard in zip(folders, client_shards(settings), strict=True):
        linked = {(p.parent.name, p.name) for p in folder.rglob("*") if p.is_symlink()}
        assert linked == {(train[i].speaker, train[i].path.name) for i in shard}
