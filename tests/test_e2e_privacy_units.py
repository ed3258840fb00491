"""One federation through Flower's Simulation Engine with both new privacy units: clients
holding several speakers train with speaker-level DP-SGD, and the server samples devices
by Poisson sampling under device-level DP. What only a real run shows: the real Grid
is sampled and messaged, each round's device epsilon (rounds.csv) is Opacus's value for
rate q over the rounds run, the checkpoint (pickled) holds the releases, the clients'
ledgers count speakers, and the summary names both units."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_speaker_level_dp_sgd_under_poisson_sampled_device_dp(tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--clients", "4", "--rounds", "3",
                     "--partition", "pathological", "--epsilon", "30", "--out", str(out),
                     "--set", f"cache-dir={cache}", "--set", "speakers-per-client=3",
                     "--set", "dp-unit=speaker", "--set", "device-dp=server-fixed",
                     "--set", "client-sampling=poisson", "--set", "fraction-train=0.5",
                     "--set", "device-noise-multiplier=0.8", "--set", "batch-size=2",
                     "--set", "backend=false")  # the training's units alone (the back end: test_backend.py)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [r for r in csv.DictReader(open(out / "rounds.csv")) if float(r["round"]) > 0]
    for r, row in enumerate(rows, 1):  # every round counts, however many devices it drew
        expected = RDPAccountant()
        expected.history = [(0.8, 0.5, r)]
        assert float(row["device_epsilon"]) == pytest.approx(expected.get_epsilon(1e-5), rel=1e-6)
    releases = torch.load(out / "checkpoint.pt", weights_only=False)["strategy"][0]["device_releases"]
    assert [(noise, population, rate) for noise, _, population, rate in releases] == [(0.8, 4, 0.5)] * 3
    assert [int(float(r["clients"])) for r in rows] == [sampled for _, sampled, _, _ in releases]
    ledgers = [run for p in (cache / "client-state").glob("*/partition-*/privacy-ledger.json")
               for run in json.loads(p.read_text())["runs"].values()]  # one simulated device per run
    assert ledgers and all(ledger["unit"] == "speaker" for ledger in ledgers)
    # 3 speakers a client in batches of up to 2: 2 batches an epoch, sample rate 1/2 of speakers
    assert all(rate == 0.5 for ledger in ledgers for rate in ledger["rate"])
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert "speaker-level (epsilon=" in privacy and "the unit is one speaker" in privacy
    assert f"device-level (epsilon={float(rows[-1]['device_epsilon']):.2f}" in privacy
    assert "Poisson" in privacy and not math.isnan(float(rows[-1]["epsilon_max"]))
