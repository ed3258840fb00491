"""Whole runs through Flower's Simulation Engine, kept few and small for CI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from fedspeaker.model.bundle import SpeakerModel
from tests.conftest import BUNDLED, flower_processes, run_cli  # noqa: F401  (tiny_corpus: a conftest fixture)

pytestmark = pytest.mark.e2e

# "Not worse than it started" on the tiny corpus: its unseen-speaker EER moves in steps of one
# trial (about 0.007), and the DP noise and floating-point sums differ between machines, so a
# flip of up to three trials is within the noise; a broken fine-tuning moves it far more.
NOT_WORSE = 0.022


def not_worse(rows: list[dict[str, str]]) -> bool:
    return float(rows[-1]["eer"]) <= float(rows[0]["eer"]) + NOT_WORSE


@pytest.fixture(scope="module")
def federation(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--clients", "3", "--rounds", "3",
                     "--partition", "iid", "--local-epochs", "3", "--epsilon", "30", "--out", str(out),
                     "--set", f"cache-dir={cache}", "--set", "optimizer=adam", "--set", "lr=0.01",
                     "--set", "batch-size=16")
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_federation_writes_every_output_and_beats_chance(federation) -> None:
    out, result = federation
    for name in ("rounds.csv", "summary.json", "curves.png", "global_model.pt"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    assert [int(float(r["round"])) for r in rows] == [0, 1, 2, 3]  # 0: the pretrained encoder
    summary = json.loads((out / "summary.json").read_text())
    chance = 1 / summary["data"]["training_speakers"]
    assert summary["final"]["accuracy"] > 1.5 * chance, summary["final"]
    assert 0.0 <= summary["final"]["eer"] <= 0.6
    assert summary["start"]["eer"] == pytest.approx(float(rows[0]["eer"]), abs=1e-5)
    assert result.stdout.count("round ") >= 4  # one progress line per round, round 0 included
    # the ServerApp wrote the rounds for TensorBoard too (tests/test_report.py checks every figure)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [(e.step, round(e.value, 4)) for e in board.Scalars("verification/eer")] == \
        [(int(float(r["round"])), round(float(r["eer"]), 4)) for r in rows]


def test_fine_tuning_the_pretrained_encoder_does_not_end_worse_than_it_started(federation) -> None:
    out, _ = federation
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    assert not_worse(rows), [r["eer"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["released"]["eer"] <= summary["start"]["eer"] + NOT_WORSE, summary["released"]
    assert float(rows[0]["voiceprint_accuracy"]) > 0.5  # pretrained: far above chance at round 0


def test_the_released_model_is_the_best_round_by_validation_with_its_operating_point(federation) -> None:
    out, result = federation
    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(out / "rounds.csv"))]
    summary = json.loads((out / "summary.json").read_text())
    with_backend = [r for r in rows if not math.isnan(r["backend_devices"])]  # rounds 0 and 3
    best = min(with_backend, key=lambda r: r["val_frr"])  # the first of ties, round 0 competing
    released = summary["released"]
    assert released["round"] == best["round"] and "validation" in released["why"]
    assert released["eer"] == pytest.approx(best["eer"], abs=1e-5)  # the reported figures are its
    for name, row in (("start", rows[0]), ("released", best)):
        point = summary[name]["operating_point"]
        assert point["target"] == "far:0.01"
        for key in ("threshold", "far", "frr", "frr_at_far_1pct"):
            assert point[key] == pytest.approx(row[key], abs=1e-5), (name, key)
        assert 0 < summary[name]["cllr"]
    bundle = torch.load(out / "global_model.pt", weights_only=True)
    assert bundle["verification"]["threshold"] == pytest.approx(best["threshold"], abs=1e-5)
    assert f"released round {int(best['round'])}" in result.stdout


def test_round_zero_and_the_last_round_score_with_the_devices_back_end(federation) -> None:
    """The devices' statistics are asked for at round 0 and after the last round (all 3
    devices count), the released model holds its round's back end, and the privacy sentence says
    how epsilon was split between it and DP-SGD."""
    out, _ = federation
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    assert [r["backend_devices"] for r in rows] == ["3", "nan", "nan", "3"]
    backend = SpeakerModel.load(out / "global_model.pt").model.backend
    assert backend.active and 0 < float(backend.mean.norm()) < 3
    assert "is split" in json.loads((out / "summary.json").read_text())["privacy"]


def test_client_epsilon_accumulates_across_rounds(federation) -> None:
    out, _ = federation
    eps = [float(r["epsilon_max"]) for r in csv.DictReader(open(out / "rounds.csv")) if r["round"] != "0"]
    assert eps[0] > 0 and eps[0] < eps[1] < eps[2], eps  # not restarted each round
    assert eps[2] <= 30.0 + 1e-6  # within the target over the whole run


def test_unusable_files_are_named_skipped_and_counted(federation) -> None:
    out, result = federation
    assert "corrupt.wav" in result.stderr and "empty.flac" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["skipped_files"] == 2


def test_nothing_is_left_running(federation) -> None:
    assert flower_processes() == []


def test_identify_names_training_speakers(federation, tiny_corpus: Path) -> None:
    out, _ = federation
    bundle_speakers = json.loads((out / "summary.json").read_text())["data"]["training_speakers"]
    audio = sorted(next(p for p in sorted(tiny_corpus.iterdir())).glob("*.flac"))[0]
    result = run_cli("identify", "--model", str(out / "global_model.pt"), "--top", "2", str(audio))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(audio) and len(lines) == 3
    assert bundle_speakers >= 2


def test_central_baseline_writes_the_same_outputs(tiny_corpus: Path, tmp_path: Path) -> None:
    result = run_cli("central", "--data-dir", str(tiny_corpus), "--clients", "3", "--rounds", "2",
                     "--local-epochs", "2", "--no-dp", "--out", str(tmp_path / "central"),
                     "--set", f"cache-dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "central" / "summary.json").read_text())
    assert summary["mode"] == "central" and summary["final"]["round"] == 2
    assert (tmp_path / "central" / "global_model.pt").exists()


def test_a_strategy_chosen_by_name_runs_a_federation(tiny_corpus: Path, tmp_path: Path) -> None:
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--clients", "2", "--rounds", "1",
                     "--strategy", "fedprox", "--no-dp", "--out", str(tmp_path / "prox"),
                     "--set", f"cache-dir={tmp_path / 'cache'}", "--set", "proximal-mu=0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "prox" / "summary.json").read_text())
    assert summary["settings"]["strategy"] == "fedprox" and summary["final"]["round"] == 1
    assert "FedProx" in (tmp_path / "prox" / "flower.log").read_text()


def test_dropouts_leave_fewer_replies_and_the_run_finishes(tiny_corpus: Path, tmp_path: Path) -> None:
    from fedspeaker.config import RunSettings
    from client.scenarios import drops_out

    out = tmp_path / "drop"
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--clients", "3", "--rounds", "3",
                     "--no-dp", "--out", str(out), "--set", f"cache-dir={tmp_path / 'cache'}",
                     "--set", "dropout=0.3", "--set", "local-epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    settings = RunSettings(dropout=0.3, num_clients=3)
    expected = [sum(not drops_out(settings, c, r) for c in range(3)) for r in (1, 2, 3)]
    assert 0 < min(expected) < 3  # this seed drops some, not all: the check below means something
    rows = [r for r in csv.DictReader(open(out / "rounds.csv")) if r["round"] != "0"]
    got = [int(float(r["clients"])) if r["clients"] != "nan" else 0 for r in rows]
    assert got == expected
    # the dropped clients' error replies are counted as such, round by round
    assert [int(float(r["asked"])) for r in rows] == [3, 3, 3]
    assert [int(float(r["no_reply"])) for r in rows] == [3 - n for n in expected]
    outcome = json.loads((out / "summary.json").read_text())["outcome"]
    assert outcome["status"] == "trained" and outcome["not_trained"] == {"no-reply/error": 9 - sum(expected)}


def test_compare_runs_a_grid_resumes_and_repeats_a_cell_exactly(tiny_corpus: Path, tmp_path: Path) -> None:
    from fedspeaker.config import RunSettings
    from client.scenarios import drops_out

    grid = tmp_path / "tiny.toml"
    grid.write_text(f"""
description = "end-to-end check"
strategies = ["fedavg"]
seeds = [0]
[options]
dp = false
num-clients = 3
rounds = 2
local-epochs = 1
cache-dir = "{tmp_path / 'cache'}"
[partitions]
iid = {{ partition = "iid" }}
[scenarios]
clean = {{}}
silent = {{ dropout = 0.6, dropout-mode = "silent", round-timeout = 40.0 }}
""")
    out = tmp_path / "cmp"
    args = ("compare", str(grid), "--out", str(out), "--data-dir", str(tiny_corpus))
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["strategy"], r["scenario"]) for r in rows] == [("central", ""), ("fedavg", "clean"),
                                                              ("fedavg", "silent")]
    assert all(float(r["wall_seconds"]) > 0 for r in rows)
    assert float(rows[1]["upload_bytes"]) > 0
    assert (out / "report.md").read_text().count("| fedavg |") == 2
    assert (out / "final_accuracy.png").exists() and (out / "curves_iid_silent.png").exists()

    # silent dropouts: the server waited out the round and aggregated the others
    settings = RunSettings(dropout=0.6, num_clients=3, seed=0)
    expected = [sum(not drops_out(settings, c, r) for c in range(3)) for r in (1, 2)]
    assert expected == [2, 2]  # one client never answers in each round
    silent = [r for r in csv.DictReader(open(out / "cells" / "iid__silent__fedavg__seed0" / "rounds.csv"))
              if r["round"] != "0"]
    assert [int(float(r["clients"])) for r in silent] == expected

    # an interrupted cell: only it runs again, and to the same numbers
    cell = out / "cells" / "iid__clean__fedavg__seed0"
    before = [(r["accuracy"], r["eer"], r["loss"]) for r in csv.DictReader(open(cell / "rounds.csv"))]
    (cell / "summary.json").unlink()
    again = run_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done earlier, kept") == 2 and again.stdout.count(": running") == 1
    after = [(r["accuracy"], r["eer"], r["loss"]) for r in csv.DictReader(open(cell / "rounds.csv"))]
    assert after == before
    assert flower_processes() == []


def test_sample_and_device_level_dp_combine_with_flowers_client_side_clipping(tiny_corpus: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "both"
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--clients", "2", "--rounds", "2",
                     "--epsilon", "30", "--out", str(out), "--set", f"cache-dir={tmp_path / 'cache'}",
                     "--set", "device-dp=client-fixed", "--set", "device-noise-multiplier=0.5",
                     "--set", "local-epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [r for r in csv.DictReader(open(out / "rounds.csv")) if r["round"] != "0"]
    device_eps = [float(r["device_epsilon"]) for r in rows]
    assert 0 < device_eps[0] < device_eps[1], device_eps  # Flower's accountant, round by round
    assert all(float(r["epsilon_max"]) > 0 for r in rows)  # Opacus, in each client
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert "sample-level" in privacy and "device-level" in privacy
    assert "fixedclipping_mod: parameters are clipped" in (out / "flower.log").read_text()


def test_privacy_sweep_runs_audits_and_reports(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run_cli("privacy-sweep", "--epsilons", "30", "--device-noise", "", "--rounds", "2",
                     "--out", str(out), "--data-dir", str(tiny_corpus),
                     "--set", "num-clients=2", "--set", "local-epochs=1",
                     "--set", f"cache-dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(open(out / "privacy.csv")))
    assert [r["scenario"] for r in rows] == ["no-dp", "epsilon-30"]
    assert rows[0]["sample_epsilon"] == "nan" and 0 < float(rows[1]["sample_epsilon"]) <= 30
    for r in rows:
        assert 0.0 <= float(r["loss_attack_auc"]) <= 1.0 and int(r["members"]) > 0
    assert "| epsilon-30 |" in (out / "privacy.md").read_text() and (out / "privacy.png").exists()

    model = out / "cells" / "default__no-dp__fedavg__seed0" / "global_model.pt"
    audited = run_cli("audit", str(model))
    assert audited.returncode == 0, audited.stderr
    assert f"{float(rows[0]['loss_attack_auc']):.3f}" in audited.stdout  # the same attack, the same AUC


def test_secagg_aggregate_equals_fedavg_and_survives_a_dropout_mid_protocol(tiny_corpus: Path,
                                                                            tmp_path: Path) -> None:
    """A client that took part in key sharing then fails to send its masked update (the
    dropout scenario raises when training starts): SecAgg+ rebuilds its mask from the
    others' shares, and the sum equals plain FedAvg of the survivors up to quantisation."""
    import torch

    from fedspeaker.config import RunSettings
    from fedspeaker.data.partition import client_shards
    from client.scenarios import drops_out

    common = ["--data-dir", str(tiny_corpus), "--clients", "3", "--rounds", "1", "--no-dp",
              "--set", f"cache-dir={tmp_path / 'cache'}",
              "--set", "local-epochs=1", "--set", "dropout=0.5",
              "--set", "release=last"]  # the trained round's models are compared, not the best round's
    secure = run_cli("simulate", *common, "--out", str(tmp_path / "secure"), "--set", "secagg=true")
    assert secure.returncode == 0, secure.stdout + secure.stderr
    plain = run_cli("simulate", *common, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stdout + plain.stderr

    settings = RunSettings(data_dir=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), num_clients=3,
                           dropout=0.5, local_epochs=1, dp=False)
    survivors = [c for c in range(3) if not drops_out(settings, c, 1)]
    assert len(survivors) == 2  # one drops mid-protocol, within the threshold (2 of 3 shares)
    # Flower logs SecAgg+'s stages at DEBUG only; its error log shows where the dropout hit:
    # inside secaggplus_mod's call to train, i.e. after the key-sharing stages
    (dropped,) = set(range(3)) - set(survivors)
    log = (tmp_path / "secure" / "flower.log").read_text()
    assert f"client {dropped} dropped out of round 1" in log and "in secaggplus_mod" in log
    rows = list(csv.DictReader(open(tmp_path / "secure" / "rounds.csv")))
    assert [r["round"] for r in rows] == ["0", "1"] and int(float(rows[1]["clients"])) == 2

    a = torch.load(tmp_path / "secure" / "global_model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "plain" / "global_model.pt", weights_only=True)["state_dict"]
    # each client's weights, times n/1000 (Flower's max_weight), are stochastically rounded
    # to steps of 16 / 2^22; the sum is divided by the summed n/1000
    examples = sum(len(client_shards(settings)[c]) for c in survivors)
    bound = len(survivors) * (16 / 2**22) / (examples / 1000)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < worst <= bound, (worst, bound)


def _one_owner_devices(tiny_corpus: Path, tmp_path: Path, option: str) -> list[dict[str, str]]:
    """rounds.csv of 12 one-owner devices, 4 rounds without DP, half of them also scoring
    each round's model, with one more run-config ``option``."""
    out = tmp_path / "population"
    result = run_cli("simulate", "--data-dir", str(tiny_corpus), "--partition", "natural", "--clients", "12",
                     "--rounds", "4", "--no-dp", "--out", str(out), "--set", f"cache-dir={tmp_path / 'cache'}",
                     "--set", "fraction-evaluate=0.5", "--set", option)
    assert result.returncode == 0, result.stdout + result.stderr
    return list(csv.DictReader(open(out / "rounds.csv")))


def test_a_population_of_one_owner_devices_does_not_end_worse_than_it_started(tiny_corpus: Path,
                                                                              tmp_path: Path) -> None:
    """12 devices, one speaker each (two devices per training speaker), a third sampled each
    round, the devices also scoring the model on their own held-out recordings."""
    rows = _one_owner_devices(tiny_corpus, tmp_path, "fraction-train=0.34")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    assert not_worse(rows), [r["eer"] for r in rows]
    assert all(int(float(r["clients"])) == 4 for r in rows[1:])  # Flower samples 12 x 0.34 = 4
    assert all(int(float(r["devices_evaluated"])) == 6 for r in rows[1:])
    assert all(0.0 <= float(r["device_frr"]) <= 1.0 and float(r["device_target_trials"]) > 0 for r in rows[1:])


def test_fedaws_devices_that_know_only_their_own_speaker_do_not_end_worse_than_they_started(
        tiny_corpus: Path, tmp_path: Path) -> None:
    """class-vectors=own: 12 one-owner devices, each sent only its own class vector (asked
    for with a query message), the server spreading the vectors apart."""
    rows = _one_owner_devices(tiny_corpus, tmp_path, "class-vectors=own")
    assert not_worse(rows), [r["eer"] for r in rows]
    assert float(rows[-1]["accuracy"]) > 2 * float(rows[0]["accuracy"]), [r["accuracy"] for r in rows]
    assert all(int(float(r["clients"])) == 12 for r in rows[1:])
