"""Benchmark: what federating adds to the pretrained encoder, privately, in one run.

    python -m simulations.benchmark [--rounds R] [--clients N] [--data-dir D] [--out DIR]
                                    [--set KEY=VALUE ...]

Runs, on the same corpus, split and seed: the zero-shot encoder (no back end, no
training), the back end alone (`--rounds 0`: the devices' DP mean, no training), the
default federation (sample-level DP, target epsilon 8, back end at round 0 and after the
last round), the same federation without DP and at epsilon 1, and the central fine-tune
without and with DP (the upper bounds).
Federations go through Flower's Simulation Engine. Prints each run's figures and the
ratios docs/benchmarks.md quotes, each against its aim. Nothing is timed in the tests; the
figures come from here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.model import build_model
from fedspeaker.reporting.run_report import read_rounds
from simulations.central import run_central
from simulations.launch import run_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=f"runs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config option for every run, e.g. --set model=tdnn")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    config: dict[str, Any] = dict(item.split("=", 1) for item in args.set)
    config |= {k: v for k, v in {"rounds": args.rounds, "num-clients": args.clients}.items() if v}
    if args.data_dir:
        config["data-dir"] = str(Path(args.data_dir).resolve())
    base = RunSettings.from_run_config(config)
    data = load_speaker_data(base)  # features cached before any timing starts

    results = {}
    for name, settings, run in (
        ("zero_shot", base.replace(rounds=0, backend=False, dp=False, out_dir=str(out / "zero_shot")),
         run_central),
        ("backend_alone", base.replace(rounds=0, out_dir=str(out / "backend_alone")), run_federation),
        ("federated_dp", base.replace(out_dir=str(out / "federated_dp")), run_federation),
        ("federated", base.replace(dp=False, out_dir=str(out / "federated")), run_federation),
        ("federated_dp_eps1", base.replace(epsilon=1.0, out_dir=str(out / "federated_dp_eps1")),
         run_federation),
        ("central", base.replace(dp=False, out_dir=str(out / "central")), run_central),
        ("central_dp", base.replace(out_dir=str(out / "central_dp")), run_central),
    ):
        print(f"== {name}", flush=True)
        run(settings, on_round=lambda line: print("  " + line, flush=True))
        results[name] = json.loads((Path(settings.out_dir) / "summary.json").read_text())

    start = results["zero_shot"]["final"]
    rows = [r for r in read_rounds(out / "federated_dp" / "rounds.csv") if r["round"] > 0]
    print(f"\nsettings: model {base.model}, {base.num_clients} clients, {base.rounds} rounds, "
          f"{base.partition} alpha {base.alpha}, {base.local_epochs} local epoch(s), lr {base.lr}"
          f"{f', head lr {base.head_lr}' if base.head_lr else ''}, DP epsilon {base.epsilon} "
          f"delta {base.delta}; {results['federated_dp']['verification']['chosen']}")
    print(f"{'run':18s} {'voiceprint':>10s} {'EER':>7s} {'minDCF':>7s} {'head':>6s} "
          f"{'epsilon':>8s} {'wall s':>7s}")
    for name, summary in results.items():
        final = summary["final"]
        eps = final.get("epsilon_max")
        print(f"{name:18s} {final['voiceprint_accuracy']:10.3f} {final['eer']:7.3f} {final['min_dcf']:7.3f} "
              f"{final['accuracy']:6.3f} {eps if eps is not None else math.nan:8.2f} "
              f"{summary['wall_seconds']:7.1f}")

    dp, plain, eps1 = (results[k]["final"] for k in ("federated_dp", "federated", "federated_dp_eps1"))
    central = results["central"]["final"]
    aims = [
        ("DP federated accuracy (head)", dp["accuracy"], ">=", 0.95),
        ("DP federated accuracy (voiceprint)", dp["voiceprint_accuracy"], ">=", 0.95),
        ("DP / no-DP federated accuracy (head)", dp["accuracy"] / plain["accuracy"], ">=", 0.95),
        ("DP / no-DP federated accuracy (voiceprint)",
         dp["voiceprint_accuracy"] / plain["voiceprint_accuracy"], ">=", 0.95),
        ("DP federated EER / zero-shot EER", dp["eer"] / start["eer"], "<=", 0.85),
        ("federated / central accuracy (head, no DP)", plain["accuracy"] / central["accuracy"], ">=", 0.97),
        ("federated / central EER (no DP)", plain["eer"] / central["eer"], "<=", 1.05),
        ("epsilon 1: accuracy (head)", eps1["accuracy"], ">=", 0.8),
        ("epsilon 1: accuracy (voiceprint)", eps1["voiceprint_accuracy"], ">=", 0.8),
        ("epsilon 1: EER / zero-shot EER", eps1["eer"] / start["eer"], "<=", 1.0),
        ("default federation wall seconds", results["federated_dp"]["wall_seconds"], "<=", 300),
    ]
    print()
    for label, value, relation, aim in aims:
        met = value >= aim if relation == ">=" else value <= aim
        print(f"{label}: {value:.3f} (aim {relation} {aim:g}: {'met' if met else 'not met'})")

    model = build_model(base, data.n_speakers)
    sent = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    whole = sent
    if base.model == "ge2e":
        from fedspeaker.data.ge2e import frozen_encoder

        whole += sum(p.numel() * p.element_size() for p in frozen_encoder().lstm.parameters())
    upload = statistics.median([r["upload_bytes"] / r["clients"] for r in rows if r["clients"]])
    print(f"bytes a client uploads per round: {upload / 1e6:.3f} MB measured; the whole model would be "
          f"{whole / 1e6:.3f} MB ({sent / whole:.1%} travels)")
    print(f"client peak RSS {max(r['client_peak_rss_mb'] for r in rows):.0f} MB; client start-up in "
          f"round 1 (a simulation actor's imports and features; later rounds reuse them) "
          f"{rows[0]['client_startup_seconds']:.2f} s")
    (out / "benchmark.json").write_text(json.dumps(
        {"aims": [{"figure": a, "value": v, "aim": f"{r} {t}"} for a, v, r, t in aims],
         "runs": results}, indent=2))


if __name__ == "__main__":
    main()
