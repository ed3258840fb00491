"""A server killed mid-run goes on from its last finished round with `--resume`."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedspeaker.processes import _process_table
from tests.test_e2e import BUNDLED, flower_processes

pytestmark = pytest.mark.e2e

ROUNDS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for spk in sorted(p for p in BUNDLED.iterdir() if p.is_dir())[:8]:
        shutil.copytree(spk, root / spk.name, ignore=lambda d, names: sorted(names)[12:])
    return root


def simulate(corpus: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    # FedAdam keeps state (its moments) that a resumed server must not lose; DP keeps a
    # ledger on every client that must go on counting
    return [sys.executable, "-m", "fedspeaker.cli", "simulate", "--data-dir", str(corpus),
            "--clients", "3", "--rounds", str(ROUNDS), "--partition", "iid", "--local-epochs", "2",
            "--strategy", "fedadam", "--epsilon", "30", "--out", str(out),
            "--set", f"cache-dir={cache}", "--set", "channels=32", *extra]


def rows(out: Path) -> list[dict[str, str]]:
    path = out / "rounds.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def server_pid(root: int) -> int | None:
    """The process running the ServerApp: flwr-simulation here (flwr-serverapp on a SuperLink)."""
    table = _process_table()
    stack, found = [root], []
    while stack:
        parent = stack.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent:
                stack.append(pid)
                found.append(pid)
    for pid in found:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-simulation" in cmd or b"flwr-serverapp" in cmd:
            return pid
    return None


def test_a_killed_server_resumes_and_ends_as_if_never_stopped(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    whole = subprocess.run(simulate(corpus, cache, tmp_path / "whole"), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout + whole.stderr

    out = tmp_path / "killed"
    run = subprocess.Popen(simulate(corpus, cache, out), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(rows(out)) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
    pid = server_pid(run.pid)
    assert pid is not None, "no ServerApp process found"
    os.kill(pid, signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0, output
    assert "did not finish" in output
    done = len(rows(out))
    assert 2 <= done < ROUNDS
    assert flower_processes() == []
    assert torch.load(out / "checkpoint.pt", weights_only=False)["round"] == done

    resumed = subprocess.run([sys.executable, "-m", "fedspeaker.cli", "simulate", "--resume",
                              "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after round {done} of {ROUNDS}" in resumed.stdout
    got, want = rows(out), rows(tmp_path / "whole")
    assert [r["round"] for r in got] == [str(r) for r in range(1, ROUNDS + 1)]
    for key in ("accuracy", "eer", "loss", "epsilon_max", "train_loss"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    assert flower_processes() == []

    again = subprocess.run([sys.executable, "-m", "fedspeaker.cli", "simulate", "--resume",
                            "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "are done already" in again.stderr
