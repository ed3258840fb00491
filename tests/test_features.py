"""FeatureCache (content-hash keyed, failures cached) and load_speaker_data."""

from __future__ import annotations

import shutil

import pytest
import torch

import fedspeaker.data.audio
import fedspeaker.data.speakers
from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import AudioError
from fedspeaker.data.features import FeatureCache, FeatureSpec, compute_features

from conftest import write_tone

pytestmark = pytest.mark.usefixtures("single_thread")


# 0.6 s at 16 kHz = 9600 samples; Kaldi frames of 400 samples every 160: 1 + 9200 // 160
FRAMES = 58


@pytest.fixture(autouse=True)
def _clear_data_cache():
    fedspeaker.data.speakers._load.cache_clear()
    yield
    fedspeaker.data.speakers._load.cache_clear()


def _no_decoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("audio was decoded although it should come from the cache")

    monkeypatch.setattr(fedspeaker.data.audio, "load_audio", boom)


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("definitely not RIFF data\n" * 50)
    return path


def test_first_extraction_decodes_every_file(synthetic_corpus, cache_dir):
    cache = FeatureCache(cache_dir, FeatureSpec())
    feats = [cache.get(p) for p in synthetic_corpus.all_files]
    assert cache.decoded == 36
    for f in feats:
        assert f.shape == (40, FRAMES)
        assert f.dtype == torch.float32
        assert torch.isfinite(f).all()
        # mean-normalised per mel bin over frames
        assert f.mean(dim=1).abs().max() < 1e-3
    assert len(list(cache.dir.glob("*.npy"))) == 36
    assert not list(cache.dir.glob("*.tmp"))


def test_second_extraction_with_fresh_cache_decodes_nothing(synthetic_corpus, cache_dir, monkeypatch):
    files = synthetic_corpus.all_files
    first = FeatureCache(cache_dir, FeatureSpec())
    expected = [first.get(p) for p in files]
    assert first.decoded == len(files)

    _no_decoding(monkeypatch)
    second = FeatureCache(cache_dir, FeatureSpec())
    again = [second.get(p) for p in files]
    assert second.decoded == 0
    for a, b in zip(expected, again):
        assert torch.equal(a, b)


def test_cached_features_equal_direct_computation(synthetic_corpus, cache_dir):
    path = synthetic_corpus.all_files[0]
    spec = FeatureSpec()
    FeatureCache(cache_dir, spec).get(path)
    cached = FeatureCache(cache_dir, spec).get(path)
    direct = compute_features(fedspeaker.data.audio.load_audio(path), spec)
    torch.testing.assert_close(cached, direct)


def test_same_instance_hits_its_own_cache(synthetic_corpus, cache_dir):
    cache = FeatureCache(cache_dir, FeatureSpec())
    path = synthetic_corpus.all_files[3]
    a = cache.get(path)
    b = cache.get(path)
    assert cache.decoded == 1
    assert torch.equal(a, b)


def test_changing_n_mels_misses_the_cache(synthetic_corpus, cache_dir):
    files = synthetic_corpus.all_files[:6]
    c40 = FeatureCache(cache_dir, FeatureSpec(n_mels=40))
    for p in files:
        c40.get(p)
    c24 = FeatureCache(cache_dir, FeatureSpec(n_mels=24))
    feats = [c24.get(p) for p in files]
    assert c24.decoded == 6
    assert all(f.shape == (24, FRAMES) for f in feats)
    assert c24.dir != c40.dir
    # and the 40-mel entries are still there
    again = FeatureCache(cache_dir, FeatureSpec(n_mels=40))
    assert again.get(files[0]).shape == (40, FRAMES)
    assert again.decoded == 0


def test_changing_feature_kind_misses_the_cache(synthetic_corpus, cache_dir):
    path = synthetic_corpus.all_files[0]
    fbank = FeatureCache(cache_dir, FeatureSpec("fbank", 40)).get(path)
    mfcc_cache = FeatureCache(cache_dir, FeatureSpec("mfcc", 40))
    mfcc = mfcc_cache.get(path)
    assert mfcc_cache.decoded == 1
    assert mfcc.shape == fbank.shape
    assert not torch.allclose(mfcc, fbank)


def test_renamed_file_hits_and_changed_file_misses(synthetic_corpus, cache_dir, tmp_path):
    original = synthetic_corpus.all_files[0]
    feats = FeatureCache(cache_dir, FeatureSpec()).get(original)

    copy = tmp_path / "elsewhere" / "renamed.wav"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    cache = FeatureCache(cache_dir, FeatureSpec())
    assert torch.equal(cache.get(copy), feats)
    assert cache.decoded == 0

    write_tone(original, freq=999.0, seconds=0.6)  # same name, new content
    changed = cache.get(original)
    assert cache.decoded == 1
    assert not torch.equal(changed, feats)


def test_corrupt_file_fails_both_times_but_is_decoded_once(tmp_path, cache_dir, monkeypatch):
    bad = _corrupt(tmp_path / "bad.wav")
    first = FeatureCache(cache_dir, FeatureSpec())
    with pytest.raises(AudioError) as info1:
        first.get(bad)
    assert first.decoded == 1
    assert str(bad) in str(info1.value)
    assert len(list(first.dir.glob("*.err"))) == 1

    with pytest.raises(AudioError) as info2:  # same instance
        first.get(bad)
    assert first.decoded == 1

    _no_decoding(monkeypatch)
    second = FeatureCache(cache_dir, FeatureSpec())
    with pytest.raises(AudioError) as info3:  # fresh instance, same cache dir
        second.get(bad)
    assert second.decoded == 0
    assert str(info1.value) == str(info2.value) == str(info3.value)


def test_cached_error_names_the_file_asked_for(tmp_path, cache_dir):
    a = write_tone(tmp_path / "a.wav", seconds=0.1)  # too short
    b = tmp_path / "sub" / "b.wav"
    b.parent.mkdir()
    shutil.copy(a, b)  # same bytes, other name
    cache = FeatureCache(cache_dir, FeatureSpec())
    with pytest.raises(AudioError, match="too short"):
        cache.get(a)
    with pytest.raises(AudioError) as info:
        cache.get(b)
    assert cache.decoded == 1
    message = str(info.value)
    assert message.startswith(f"{b}: ")
    assert str(a) not in message
    assert "too short" in message


def test_missing_file_raises_audio_error(tmp_path, cache_dir):
    cache = FeatureCache(cache_dir, FeatureSpec())
    with pytest.raises(AudioError, match="cannot read"):
        cache.get(tmp_path / "gone.wav")
    assert cache.decoded == 0
    assert not cache.dir.exists() or not any(cache.dir.iterdir())


# ------------------------------------------------------------ load_speaker_data


def _settings(corpus_root, cache_dir, **kw) -> RunSettings:
    return RunSettings(model="tdnn", head_lr=0.0, data_dir=str(corpus_root), cache_dir=str(cache_dir), **kw)


def test_load_speaker_data_skips_corrupt_file_and_loads_the_rest(synthetic_corpus, cache_dir):
    root = synthetic_corpus.root
    bad = _corrupt(root / "spk02" / "spk02-broken.wav")
    short = write_tone(root / "spk04" / "spk04-short.flac", seconds=0.1)
    notes = root / "spk01" / "notes.txt"
    notes.write_text("not audio")

    data = load_speaker_data(_settings(root, cache_dir))
    assert len(data.skipped) == 3
    assert sum(s.startswith(str(bad.resolve())) for s in data.skipped) == 1
    assert sum(s.startswith(str(short.resolve())) and "too short" in s for s in data.skipped) == 1
    assert sum(s.startswith(str(notes.resolve())) for s in data.skipped) == 1
    assert data.decoded == 38  # 36 good files + 2 unusable audio files
    good = {p.resolve() for p in synthetic_corpus.all_files}
    assert set(data.features) == good
    split = data.split
    used = {u.path for u in split.train + split.test + split.verification}
    assert used == good
    assert data.n_speakers == 4 and len(split.unseen) == 2

    feats, labels = data.train_examples()
    assert len(feats) == len(split.train) == 16
    assert sorted(set(labels)) == [0, 1, 2, 3]
    assert all(f.shape == (40, FRAMES) for f in feats)
    sub_feats, sub_labels = data.train_examples([0, 2])
    assert torch.equal(sub_feats[1], feats[2]) and sub_labels == [labels[0], labels[2]]
    test_feats, test_labels = data.test_examples()
    assert len(test_feats) == len(test_labels) == 8
    v_feats, v_speakers = data.verification_examples()
    assert len(v_feats) == 12 and set(v_speakers) == set(split.unseen)


def test_load_speaker_data_second_run_uses_cache(synthetic_corpus, cache_dir, monkeypatch):
    root = synthetic_corpus.root
    bad = _corrupt(root / "spk00" / "spk00-broken.wav")
    settings = _settings(root, cache_dir)
    first = load_speaker_data(settings)
    assert first.decoded == 37
    assert load_speaker_data(settings) is first  # memoised in the process

    fedspeaker.data.speakers._load.cache_clear()
    _no_decoding(monkeypatch)
    second = load_speaker_data(settings)
    assert second is not first
    assert second.decoded == 0
    assert second.skipped == first.skipped
    assert any(s.startswith(str(bad.resolve())) for s in second.skipped)
    assert second.split == first.split
    for path, f in first.features.items():
        assert torch.equal(second.features[path], f)


def test_load_speaker_data_split_follows_seed(synthetic_corpus, cache_dir):
    root = synthetic_corpus.root
    a = load_speaker_data(_settings(root, cache_dir, seed=0))
    b = load_speaker_data(_settings(root, cache_dir, seed=0))
    assert a is b
    c = load_speaker_data(_settings(root, cache_dir, seed=5))
    assert c.decoded == 0  # features are shared through the disk cache
    assert c.split != a.split
