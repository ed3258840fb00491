"""load_audio (decode, resample, downmix, reject) and the corpus scan/split."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedspeaker.data.audio import MIN_SECONDS, SAMPLE_RATE, load_audio
from fedspeaker.data.corpus import Utterance, scan_corpus, split_corpus
from fedspeaker.errors import AudioError, CorpusError

from conftest import make_corpus, tone, write_audio, write_tone

pytestmark = pytest.mark.usefixtures("single_thread")



def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------- load_audio


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100])
@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_load_audio_resamples_to_16k(tmp_path, rate, ext):
    path = write_audio(tmp_path / f"a{ext}", tone(440.0, 0.5, rate, noise=0.0), rate)
    wave = load_audio(path)
    assert wave.dtype == torch.float32
    assert wave.shape == (8_000,)  # 0.5 s at 16 kHz, whatever the file's rate
    # the pitch survives resampling
    assert _peak_hz(wave, SAMPLE_RATE) == pytest.approx(440.0, abs=3.0)


def test_load_audio_honours_other_target_rate(tmp_path):
    path = write_tone(tmp_path / "a.wav", seconds=0.5, rate=44_100)
    assert load_audio(path, sample_rate=8_000).shape == (4_000,)


def test_load_audio_averages_stereo_to_mono(tmp_path):
    n = 16_000
    left = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    right = np.full(n, 0.25, dtype=np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.shape == (n,)
    torch.testing.assert_close(wave, torch.from_numpy((left + right) / 2))


def test_load_audio_averages_opposite_channels_to_silence(tmp_path):
    x = tone(300.0, 0.5, SAMPLE_RATE, noise=0.0)[:, 0]
    path = tmp_path / "cancel.wav"
    sf.write(str(path), np.stack([x, -x], axis=1), SAMPLE_RATE, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.shape == (8_000,)
    assert float(wave.abs().max()) == 0.0


def test_load_audio_mono_16k_is_unchanged(tmp_path):
    x = tone(300.0, 0.5, SAMPLE_RATE, noise=0.0)[:, 0]
    path = tmp_path / "m.wav"
    sf.write(str(path), x, SAMPLE_RATE, subtype="FLOAT")
    torch.testing.assert_close(load_audio(path), torch.from_numpy(x))


def test_text_file_renamed_wav_raises_audio_error_naming_it(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert "not readable audio" in str(info.value)


def test_zero_length_file_raises_audio_error_naming_it(tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_wav_with_no_samples_raises_empty_audio(tmp_path):
    path = tmp_path / "header-only.wav"
    sf.write(str(path), np.zeros((0, 1), dtype=np.float32), SAMPLE_RATE)
    assert path.stat().st_size > 0  # a valid header, no samples
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert "empty" in str(info.value)


@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100])
def test_too_short_file_raises_audio_error_naming_it(tmp_path, rate):
    path = write_tone(tmp_path / f"short{rate}.wav", seconds=0.1, rate=rate)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message
    assert "too short" in message and "0.10 s" in message


def test_minimum_length_is_accepted(tmp_path):
    ok = write_tone(tmp_path / "ok.wav", seconds=MIN_SECONDS, rate=8_000)
    assert load_audio(ok).numel() == int(MIN_SECONDS * SAMPLE_RATE)
    short = write_tone(tmp_path / "short.wav", seconds=MIN_SECONDS - 0.01)
    with pytest.raises(AudioError, match="too short"):
        load_audio(short)


def test_non_finite_samples_raise_audio_error(tmp_path):
    x = tone(200.0, 0.5, SAMPLE_RATE)[:, 0]
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(str(path), x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value) and "NaN" in str(info.value)


def test_missing_file_raises_audio_error(tmp_path):
    path = tmp_path / "missing.flac"
    with pytest.raises(AudioError, match="missing.flac"):
        load_audio(path)


def test_bundled_flac_decodes(bundled_corpus):
    path = sorted(next(p for p in sorted(bundled_corpus.iterdir()) if p.is_dir()).glob("*.flac"))[0]
    wave = load_audio(path)
    assert wave.ndim == 1 and wave.numel() >= MIN_SECONDS * SAMPLE_RATE
    assert torch.isfinite(wave).all()


# ---------------------------------------------------------------- scan_corpus


def test_scan_corpus_lists_every_utterance_by_speaker_folder(synthetic_corpus):
    utterances, skipped = scan_corpus(synthetic_corpus.root)
    assert skipped == []
    assert [u.path for u in utterances] == synthetic_corpus.all_files
    assert len(utterances) == 36
    for u in utterances:
        assert u.path.parent.name == u.speaker
    assert sorted({u.speaker for u in utterances}) == synthetic_corpus.speakers


def test_scan_corpus_skips_and_reports_non_audio_files(synthetic_corpus):
    root = synthetic_corpus.root
    notes = root / "spk01" / "notes.txt"
    notes.write_text("recorded on a Tuesday")
    mp3 = root / "spk02" / "clip.mp3"
    mp3.write_bytes(b"ID3")
    (root / "README.md").write_text("top-level files are not speakers")  # ignored silently
    (root / ".hidden").mkdir()
    write_tone(root / ".hidden" / "x.wav")  # hidden folders are not speakers
    upper = write_tone(root / "spk03" / "LOUD.WAV")  # suffix check is case-insensitive

    utterances, skipped = scan_corpus(root)
    paths = {u.path for u in utterances}
    assert notes not in paths and mp3 not in paths
    assert upper in paths
    assert len(utterances) == 37
    assert len(skipped) == 2
    assert any(s.startswith(str(notes)) for s in skipped)
    assert any(s.startswith(str(mp3)) for s in skipped)
    assert ".hidden" not in {u.speaker for u in utterances}


def test_scan_corpus_missing_root_raises(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        scan_corpus(tmp_path / "nowhere")


def test_scan_bundled_corpus(bundled_corpus):
    utterances, skipped = scan_corpus(bundled_corpus)
    assert len({u.speaker for u in utterances}) == 34
    assert len(utterances) == 34 * 40
    assert skipped == []


# ---------------------------------------------------------------- split_corpus


def _fake_utterances(n_speakers: int, n_utts: int) -> list[Utterance]:
    return [Utterance(Path(f"/c/s{i:02d}/u{j:02d}.wav"), f"s{i:02d}")
            for i in range(n_speakers) for j in range(n_utts)]


def test_split_is_deterministic_for_a_seed(synthetic_corpus):
    utterances, _ = scan_corpus(synthetic_corpus.root)
    assert split_corpus(utterances, seed=3) == split_corpus(list(reversed(utterances)), seed=3)


def test_split_differs_for_another_seed():
    utterances = _fake_utterances(20, 10)
    a, b = split_corpus(utterances, seed=0), split_corpus(utterances, seed=1)
    assert a != b
    assert a.unseen != b.unseen or set(a.test) != set(b.test)


def test_split_partitions_utterances(synthetic_corpus):
    utterances, _ = scan_corpus(synthetic_corpus.root)
    split = split_corpus(utterances, seed=0)
    train, test, verif = set(split.train), set(split.test), set(split.verification)
    assert not train & test and not train & verif and not test & verif
    assert train | test | verif == set(utterances)
    # 6 speakers -> default unseen = max(2, 6 // 4) = 2
    assert len(split.unseen) == 2 and len(split.speakers) == 4
    assert set(split.speakers).isdisjoint(split.unseen)
    assert {u.speaker for u in split.train} == set(split.speakers)
    assert {u.speaker for u in split.test} == set(split.speakers)
    assert {u.speaker for u in split.verification} == set(split.unseen)
    # 6 utterances, test fraction 0.2 -> ceil(1.2) = 2 test utterances per speaker
    assert len(split.test) == 4 * 2 and len(split.train) == 4 * 4
    assert len(split.verification) == 2 * 6
    assert split.labels == {s: i for i, s in enumerate(split.speakers)}


@pytest.mark.parametrize("seed", range(5))
def test_unseen_speakers_never_in_train_or_test(seed):
    utterances = _fake_utterances(34, 40)
    split = split_corpus(utterances, seed=seed)
    assert len(split.unseen) == 8  # 34 // 4
    used = {u.speaker for u in split.train + split.test}
    assert used.isdisjoint(split.unseen)
    assert used == set(split.speakers)
    assert len(split.train) == 26 * 32 and len(split.test) == 26 * 8


def test_split_bundled_corpus(bundled_corpus):
    utterances, _ = scan_corpus(bundled_corpus)
    split = split_corpus(utterances, seed=0, test_fraction=0.2)
    assert len(split.speakers) == 26 and len(split.unseen) == 8
    assert len(split.train) == 26 * 32
    assert len(split.verification) == 8 * 40
    assert {u.speaker for u in split.train}.isdisjoint(split.unseen)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_unseen_draw_follows_the_baseline_protocol(seed):
    # shared/BASELINES.md: speakers sorted, random.Random(seed).sample(speakers, k) unseen
    utterances = _fake_utterances(34, 4)
    speakers = sorted({u.speaker for u in utterances})
    expected = sorted(random.Random(seed).sample(speakers, 8))
    assert list(split_corpus(utterances, seed=seed).unseen) == expected


def test_split_explicit_unseen_count_and_test_fraction():
    split = split_corpus(_fake_utterances(10, 10), seed=0, unseen_speakers=3, test_fraction=0.5)
    assert len(split.unseen) == 3 and len(split.speakers) == 7
    assert len(split.test) == 7 * 5 and len(split.train) == 7 * 5


def test_split_keeps_one_training_utterance_per_speaker():
    split = split_corpus(_fake_utterances(6, 2), seed=0, test_fraction=0.9)
    for speaker in split.speakers:
        assert sum(u.speaker == speaker for u in split.train) == 1
        assert sum(u.speaker == speaker for u in split.test) == 1


def test_split_with_three_speakers_raises(tmp_path):
    corpus = make_corpus(tmp_path / "small", n_speakers=3, n_utts=3)
    utterances, _ = scan_corpus(corpus.root)
    with pytest.raises(CorpusError, match="3 speaker"):
        split_corpus(utterances, seed=0)


def test_split_rejects_too_many_unseen_speakers():
    with pytest.raises(CorpusError, match="unseen-speakers 3"):
        split_corpus(_fake_utterances(4, 5), seed=0, unseen_speakers=3)


def test_split_rejects_training_speaker_with_one_utterance():
    utterances = _fake_utterances(5, 3) + [Utterance(Path("/c/s99/u.wav"), "s99")]
    outcomes = []
    for seed in range(20):
        try:
            split = split_corpus(utterances, seed=seed, unseen_speakers=2)
        except CorpusError as exc:
            assert "s99" in str(exc) and "at least 2" in str(exc)
            outcomes.append("error")
        else:
            assert "s99" in split.unseen  # fine only while it is not trained on
            outcomes.append("unseen")
    assert "error" in outcomes and "unseen" in outcomes


def test_removing_a_speaker_folder_changes_the_split(synthetic_corpus):
    before = split_corpus(scan_corpus(synthetic_corpus.root)[0], seed=0)
    shutil.rmtree(synthetic_corpus.root / "spk05")
    after = split_corpus(scan_corpus(synthetic_corpus.root)[0], seed=0)
    assert "spk05" not in after.speakers + after.unseen
    assert len(after.train) + len(after.test) + len(after.verification) == 30
    assert before != after
