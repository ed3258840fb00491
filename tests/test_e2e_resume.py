"""A server killed mid-run goes on from its last finished round with `--resume`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedspeaker.deploy.processes import _process_table
from tests.conftest import BUNDLED, flower_processes

pytestmark = pytest.mark.e2e

ROUNDS = 8  # rounds take well under a second here: room to kill the server mid-run


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
            "--set", f"cache-dir={cache}", *extra]


def rows(out: Path) -> list[dict[str, str]]:
    """The trained rounds' rows (round 0, the starting model, is the first row of any run)."""
    path = out / "rounds.csv"
    return [r for r in csv.DictReader(open(path)) if r["round"] != "0"] if path.exists() else []


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


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
    assert flower_processes() == []
    # the server checkpoints before it writes a round's row, so the checkpoint holds
    # every round rounds.csv shows (and one more if the kill fell in between)
    done = checkpoint(out)["round"]
    assert 2 <= len(rows(out)) <= done < ROUNDS

    resumed = subprocess.run([sys.executable, "-m", "fedspeaker.cli", "simulate", "--resume",
                              "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after round {done} of {ROUNDS}" in resumed.stdout
    assert [r["round"] for r in rows(out)] == [str(r) for r in range(1, ROUNDS + 1)]
    # bit for bit: the rows at full precision (the final checkpoint's) and the final model
    got, want = checkpoint(out)["rows"], checkpoint(tmp_path / "whole")["rows"]
    assert got[0]["round"] == want[0]["round"] == 0  # the starting model, scored once
    got, want = got[1:], want[1:]
    for key in ("accuracy", "eer", "loss", "train_loss", "clients"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    # the clients' privacy ledgers went on counting: the finished rounds' epsilon exactly;
    # the round under way when the server died may count twice (a client that trained it
    # before it was stopped sent that update and spent its epsilon), never less
    for key in ("epsilon_max", "epsilon_mean"):
        assert [r[key] for r in got[:done]] == [r[key] for r in want[:done]], key
        assert all(g[key] >= w[key] for g, w in zip(got[done:], want[done:])), key
    got, want = (torch.load(d / "global_model.pt", weights_only=False)["state_dict"]
                 for d in (out, tmp_path / "whole"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the released model (release=best) survived the resume: the same round, the same figures
    got, want = (json.loads((d / "summary.json").read_text())["released"] for d in (out, tmp_path / "whole"))
    assert got == want
    assert flower_processes() == []

    again = subprocess.run([sys.executable, "-m", "fedspeaker.cli", "simulate", "--resume",
                            "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "are done already" in again.stderr
