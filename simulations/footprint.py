"""Client footprint on a real (loopback) deployment: what one round costs a device.

A SuperNode starts a fresh ClientApp process for every round, so each round pays the
process's start-up (Python, Flower, torch, Opacus, reading the device's features)
before it trains. This runs the secure loopback deployment (simulations/loopback.py:
the SuperLink behind nginx, SuperNodes with TLS and authentication whose ClientApps
start through the runner that checks the operator's signature) and reads what each
client reported: start-up and training seconds,
peak memory, bytes uploaded. As a baseline it times, in the same run, the floor a
ClientApp process cannot go below (a bare `import torch, flwr`) and the imports a
ClientApp process needs.

    python -m simulations.footprint [--devices 1] [--rounds 4] [--no-dp]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedspeaker.config import RunSettings
from fedspeaker.reporting.run_report import read_rounds
from simulations.loopback import APP_DIR, Device, LoopbackDeployment, device_folders

CLIENT_IMPORTS = "import flwr.supernode.cli.flwr_clientapp, client.app"


def import_seconds(statement: str, repeats: int = 3) -> float:
    """Median seconds from a fresh interpreter's start to the end of ``statement``,
    clocked as the client clocks its own start-up (from the process's start time)."""
    since_start = ("; import os, time, pathlib; ticks = int(pathlib.Path('/proc/self/stat')"
                   ".read_text().rsplit(')', 1)[1].split()[19]); "
                   "print(time.monotonic() - ticks / os.sysconf('SC_CLK_TCK'))")
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", statement + since_start], check=True, cwd=APP_DIR,
                             capture_output=True, text=True).stdout)
        for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="SuperNodes (default 1: one "
                        "device's process alone on this machine, as on a real device)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-dp", action="store_true")
    args = parser.parse_args()

    floor = import_seconds("import torch, flwr")
    client_imports = CLIENT_IMPORTS + ("" if args.no_dp else ", opacus")
    client_import = import_seconds(client_imports)
    with tempfile.TemporaryDirectory(prefix="fedspeaker-footprint-") as tmp:
        folder = Path(tmp)
        settings = RunSettings(num_clients=args.devices, rounds=args.rounds, dp=not args.no_dp,
                               out_dir=str(folder / "run"))
        devices = [Device(f"device-{i}", d)
                   for i, d in enumerate(device_folders(settings, folder / "devices"))]
        with LoopbackDeployment(folder / "deployment", devices) as deployment:
            rows = [r for r in read_rounds(deployment.run(settings) / "rounds.csv") if r["round"] > 0]

    later = rows[1:] or rows  # round 1 also computes the device's features (cache miss)
    startup = statistics.median(r["client_startup_seconds"] for r in later)
    fit = statistics.median(r["client_fit_seconds"] for r in later)
    print(f"\nclient footprint: {args.devices} SuperNode(s), {args.rounds} rounds, "
          f"{'no DP' if args.no_dp else 'DP-SGD (Opacus)'}, loopback TLS + authentication + app check")
    print(f"{'round':>5} {'start-up s':>10} {'training s':>10} {'peak RSS MB':>11} "
          f"{'upload MB/client':>16} {'round s':>8}")
    for r in rows:
        print(f"{int(r['round']):5d} {r['client_startup_seconds']:10.2f} {r['client_fit_seconds']:10.2f} "
              f"{r['client_peak_rss_mb']:11.0f} {r['upload_bytes'] / r['clients'] / 1e6:16.3f} "
              f"{r['round_seconds']:8.1f}")
    print(f"\nstart-up per round (median, rounds 2+): {startup:.2f} s (aim < 3 s: "
          f"{'met' if startup < 3 else 'not met'}); training {fit:.2f} s")
    print(f"baselines, same run: bare `import torch, flwr` {floor:.2f} s; a ClientApp process's "
          f"imports ({client_imports}) {client_import:.2f} s")
    print(f"start-up / the import floor: {startup / floor:.2f}x (aim <= 1.5x: "
          f"{'met' if startup <= 1.5 * floor else 'not met'}); the imports alone: {client_import / floor:.2f}x")
    print(f"peak RSS of a client process: {max(r['client_peak_rss_mb'] for r in rows):.0f} MB; "
          f"upload per client per round: {rows[-1]['upload_bytes'] / rows[-1]['clients'] / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
