"""Benchmark: what a round costs as the device population grows, against Flower's floor.

    python -m simulations.scale --data-dir ../shared/data/dspspeech20/audio \\
        [--devices 100,300,1000] [--fraction 0.05] [--rounds 3] [--set KEY=VALUE ...]

For each population: a fedspeaker federation of one-owner devices (``--partition
natural``) with the run's defaults (the pretrained encoder, sample-level DP), sampling
``--fraction`` of the devices per round; and, through the same Simulation Engine, Flower's
floor: a no-op ClientApp (simulations/floor_app) answering with as many bytes. Prints per
population the median round time of rounds 2 onwards (round 1 also starts the engine's
actors), the training inside it, the floor, their ratio, the peak memory of the server
process and of the client processes, and apart the seconds the last round spent gathering
the scoring back end's statistics from every device (not counted in its round).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.errors import FedSpeakerError
from fedspeaker.reporting.run_report import read_rounds
from simulations.launch import run_app, run_federation

FLOOR_APP = Path(__file__).resolve().parent / "floor_app"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="corpus root (1,000 devices need the full corpus)")
    parser.add_argument("--devices", default="100,300,1000")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=f"runs/scale-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config = dict(item.split("=", 1) for item in args.set)
    if args.data_dir:
        config["data-dir"] = str(Path(args.data_dir).resolve())
    base = RunSettings.from_run_config(config).replace(partition="natural", rounds=args.rounds,
                                                       fraction_train=args.fraction)
    load_speaker_data(base)  # features cached before any timing starts
    actors = os.cpu_count() or 1
    print(f"{'devices':>7s} {'per round':>9s} {'round s':>8s} {'training s':>10s} {'floor s':>8s} "
          f"{'ratio':>6s} {'server MB':>9s} {'client MB':>9s} {'back end s':>10s}", flush=True)
    for devices in (int(d) for d in args.devices.split(",")):
        settings = base.replace(num_clients=devices, out_dir=str(out / f"fedspeaker-{devices}"))
        run_federation(settings, on_round=lambda line: None)
        rows = [r for r in read_rounds(Path(settings.out_dir) / "rounds.csv") if r["round"] > 1]
        for r in rows:  # the last round also gathers the back end from every device: not a round's cost
            r["round_seconds"] -= _seconds(r.get("backend_seconds"))
        floor_csv = out / f"floor-{devices}.csv"
        run_app(FLOOR_APP, {"rounds": args.rounds, "fraction-train": args.fraction,
                            "num-clients": devices, "out-file": str(floor_csv)},
                num_supernodes=devices, log_path=out / f"floor-{devices}.log")
        if not floor_csv.exists():
            raise FedSpeakerError(f"Flower's floor run did not finish; see {out / f'floor-{devices}.log'}")
        floor = [float(r["round_seconds"]) for r in csv.DictReader(open(floor_csv))][1:]
        # the training inside a round: its clients' fit seconds, spread over the actors
        training = statistics.median(r["client_fit_seconds"] * r["clients"] / actors for r in rows)
        round_s, floor_s = statistics.median(r["round_seconds"] for r in rows), statistics.median(floor)
        print(f"{devices:7d} {settings.clients_per_round:9d} {round_s:8.2f} {training:10.2f} "
              f"{floor_s:8.2f} {round_s / (floor_s + training):6.2f} "
              f"{max(r['server_peak_rss_mb'] for r in rows):9.0f} "
              f"{max(r['client_peak_rss_mb'] for r in rows):9.0f} "
              f"{max(_seconds(r.get('backend_seconds')) for r in rows):10.1f}", flush=True)
    print(f"ratio: round time / (Flower's floor + the training itself); aim <= 1.3 (issue 21). "
          f"{actors} CPU(s), rounds 2-{args.rounds}; outputs in {out}")


def _seconds(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and value == value else 0.0


if __name__ == "__main__":
    main()
