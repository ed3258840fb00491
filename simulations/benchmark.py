"""Benchmark: federated vs central, DP vs non-DP, and federation overhead, in one run.

    python -m simulations.benchmark [--rounds R] [--clients N] [--data-dir D] [--out DIR]

Runs the default federation with and without DP through Flower's Simulation Engine,
and the central baseline, on the same corpus, split and seed, then prints the ratios
the README quotes. Nothing is timed in the tests; the figures come from here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from simulations.central import run_central
from simulations.launch import run_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=f"runs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    base = RunSettings()
    changes = {k: v for k, v in {"rounds": args.rounds, "num_clients": args.clients}.items() if v}
    if args.data_dir:
        changes["data_dir"] = str(Path(args.data_dir).resolve())
    base = base.replace(**changes)
    load_speaker_data(base)  # features cached before any timing starts

    results = {}
    for name, settings, run in (
        ("federated_dp", base.replace(out_dir=str(out / "federated_dp")), run_federation),
        ("federated", base.replace(dp=False, out_dir=str(out / "federated")), run_federation),
        ("central", base.replace(dp=False, out_dir=str(out / "central")), run_central),
        ("central_dp", base.replace(out_dir=str(out / "central_dp")), run_central),
    ):
        print(f"== {name}", flush=True)
        run(settings, on_round=lambda line: print("  " + line, flush=True))
        results[name] = json.loads((Path(settings.out_dir) / "summary.json").read_text())

    fed, fed_dp, cen = results["federated"], results["federated_dp"], results["central"]
    figures = {
        "federated/central accuracy (no DP)": fed["final"]["accuracy"] / cen["final"]["accuracy"],
        "federated/central EER (no DP)": fed["final"]["eer"] / cen["final"]["eer"],
        "DP/non-DP federated accuracy": fed_dp["final"]["accuracy"] / fed["final"]["accuracy"],
        "federation wall / summed client training time (DP run)":
            fed_dp["wall_seconds"] / fed_dp["client_train_seconds"],
    }
    print(f"\nsettings: {base.num_clients} clients, {base.rounds} rounds, {base.partition} "
          f"alpha {base.alpha}, {base.local_epochs} local epochs, DP epsilon {base.epsilon} "
          f"delta {base.delta}")
    print(f"{'run':14s} {'accuracy':>9s} {'EER':>7s} {'epsilon':>8s} {'wall s':>8s}")
    for name, summary in results.items():
        eps = summary["final"].get("epsilon_max")
        print(f"{name:14s} {summary['final']['accuracy']:9.3f} {summary['final']['eer']:7.3f} "
              f"{eps if eps is not None else float('nan'):8.2f} {summary['wall_seconds']:8.1f}")
    for label, value in figures.items():
        print(f"{label}: {value:.3f}")
    (out / "benchmark.json").write_text(json.dumps({"figures": figures, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
