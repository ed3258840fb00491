"""Shared fixtures: small synthetic corpora written with soundfile under tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent

# Every process this test session starts inherits this, so a test can tell its own
# leftovers from whatever else runs on the machine.
TEST_MARKER = f"FEDSPEAKER_TEST_SESSION={os.getpid()}"
os.environ["FEDSPEAKER_TEST_SESSION"] = str(os.getpid())
BUNDLED_CORPUS = REPO / "data" / "dspspeech20-mini"

N_SPEAKERS = 6
N_UTTERANCES = 6
# (sample rate, channels, extension) cycled over each speaker's utterances, so every
# speaker has 16 kHz, 8 kHz and 44.1 kHz files, mono and stereo, wav and flac.
FORMATS = [
    (16_000, 1, ".wav"),
    (8_000, 1, ".flac"),
    (44_100, 2, ".wav"),
    (16_000, 2, ".flac"),
    (8_000, 2, ".wav"),
    (44_100, 1, ".flac"),
]


def tone(freq: float, seconds: float, rate: int, channels: int = 1, seed: int = 0,
         noise: float = 0.01) -> np.ndarray:
    """A voiced-like waveform: fundamental + two harmonics + a little noise, (n, channels)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(4 * np.pi * freq * t) \
        + 0.05 * np.sin(6 * np.pi * freq * t)
    rng = np.random.default_rng(seed)
    cols = [x + noise * rng.standard_normal(len(t)) for _ in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path: Path, data: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".flac":
        sf.write(str(path), data, rate, subtype="PCM_16")
    else:
        sf.write(str(path), data, rate)
    return path


def write_tone(path: Path, freq: float = 200.0, seconds: float = 0.8, rate: int = 16_000,
               channels: int = 1, seed: int = 0) -> Path:
    return write_audio(path, tone(freq, seconds, rate, channels, seed), rate)


@dataclass
class SyntheticCorpus:
    root: Path
    speakers: list[str]
    files: dict[str, list[Path]]  # speaker -> its audio files, sorted

    @property
    def all_files(self) -> list[Path]:
        return sorted(p for paths in self.files.values() for p in paths)


def make_corpus(root: Path, n_speakers: int = N_SPEAKERS, n_utts: int = N_UTTERANCES,
                seconds: float = 0.6) -> SyntheticCorpus:
    files: dict[str, list[Path]] = {}
    speakers = [f"spk{i:02d}" for i in range(n_speakers)]
    for i, speaker in enumerate(speakers):
        pitch = 110.0 + 45.0 * i  # distinct per speaker
        paths = []
        for j in range(n_utts):
            rate, channels, ext = FORMATS[j % len(FORMATS)]
            # vary pitch slightly per utterance so no two files share content
            path = root / speaker / f"{speaker}-u{j:02d}{ext}"
            write_tone(path, pitch * (1 + 0.01 * j), seconds, rate, channels, seed=100 * i + j)
            paths.append(path)
        files[speaker] = sorted(paths)
    return SyntheticCorpus(root, speakers, files)


@pytest.fixture
def synthetic_corpus(tmp_path: Path) -> SyntheticCorpus:
    """6 speaker folders x 6 utterances (0.6 s each, mixed rates/channels/containers)."""
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _isolate_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let a test fall back to ~/.cache/fedspeaker."""
    monkeypatch.setenv("FEDSPEAKER_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def bundled_corpus() -> Path:
    if not BUNDLED_CORPUS.is_dir():
        pytest.skip("bundled corpus data/dspspeech20-mini is not present")
    return BUNDLED_CORPUS


@pytest.fixture
def single_thread():
    """Run torch single-threaded: these models are tiny, and on a busy 2-core machine
    intra-op threads contend badly (a DP training step gets several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def flower_task_identity():
    """Messages made outside a Flower runtime need the identity a runtime would set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# Shared by the end-to-end and deployment test modules.
BUNDLED = BUNDLED_CORPUS
FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real speakers x 12 utterances, plus an unreadable and an empty file."""
    root = tmp_path_factory.mktemp("corpus")
    for spk in sorted(p for p in BUNDLED.iterdir() if p.is_dir())[:8]:
        (root / spk.name).mkdir()
        for f in sorted(spk.glob("*.flac"))[:12]:
            shutil.copy(f, root / spk.name / f.name)
    first = sorted(p for p in root.iterdir())[0]
    (first / "corrupt.wav").write_bytes(b"this is not audio")
    (first / "empty.flac").write_bytes(b"")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedspeaker.cli", *args], capture_output=True,
                          text=True, timeout=900)


def flower_processes() -> list[str]:
    """Flower and Ray processes this test session started (they carry its marker) that are
    still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ours = TEST_MARKER.encode() in (entry / "environ").read_bytes()
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if ours and not zombie and any(name in cmd for name in FLOWER_PROCESSES):
                found.append(f"{entry.name}: {cmd[:120]}")
    return found


def nginx_or_skip() -> None:
    """Tests that need nginx skip without it, except in CI, where .ci/run installs it."""
    from fedspeaker.deploy.proxy import find_nginx
    from fedspeaker.errors import FedSpeakerError

    try:
        find_nginx()
    except FedSpeakerError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light)")


class EightNodes:
    """Just enough of a Flower Grid for configure_train to sample from."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, 9))
