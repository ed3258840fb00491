"""Benchmark: how much slower a DP-SGD step (Opacus) is than a plain SGD step.

    python -m simulations.dp_overhead [--steps N] [--batch-size B]

Same model (the default settings, or --set model=tdnn), same batches, one thread as in a
client; prints the median seconds per step of each and their ratio, and the cost of the
device's noise (an OS-seeded generator, each draw hardened as Opacus's secure mode does)
against Opacus's default noise (torch's global generator, one draw).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedspeaker.config import RunSettings
from fedspeaker.model import build_model
from fedspeaker.privacy.dpsgd import make_private
from fedspeaker.privacy.ledger import PrivacyLedger
from fedspeaker.privacy.noise import noise_generator


def step_seconds(dp: bool, settings: RunSettings, steps: int, batch_size: int,
                 device_noise: bool = True) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    n = steps * batch_size
    model = build_model(settings, 26)
    model.train()
    loss = model.loss
    x = torch.randn(n, model.input_channels, model.train_frames, generator=gen)
    y = torch.randint(0, 26, (n,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9)
    if dp:
        _, model, optimizer, loader = make_private(
            model=model, optimizer=optimizer, loader=loader, ledger=PrivacyLedger(),
            noise_multiplier=1.0, max_grad_norm=settings.max_grad_norm, generator=noise_generator(None))
        if not device_noise:  # Opacus's default: the global generator, one draw per tensor
            optimizer.generator, optimizer.secure_mode = None, False
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)  # same batches as plain
    times = []
    for xb, yb in loader:
        started = time.perf_counter()
        optimizer.zero_grad()
        loss(model(xb), yb).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times[2:]  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=RunSettings().batch_size)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config option, e.g. --set model=tdnn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config(dict(item.split("=", 1) for item in args.set))
    plain = statistics.median(step_seconds(False, settings, args.steps, args.batch_size))
    # the two noises in turn, three times: on a shared machine load comes and goes
    pairs = [(statistics.median(step_seconds(True, settings, args.steps, args.batch_size, device_noise=False)),
              statistics.median(step_seconds(True, settings, args.steps, args.batch_size)))
             for _ in range(3)]
    default_noise = statistics.median(p[0] for p in pairs)
    private = statistics.median(p[1] for p in pairs)
    noise_cost = statistics.median(device / default for default, device in pairs)
    print(f"model: {settings.model}, batch {args.batch_size}, 1 thread, median of {args.steps - 2} steps")
    print(f"plain SGD step: {plain * 1000:.1f} ms")
    print(f"DP-SGD step (Opacus, per-sample clipping + noise): {private * 1000:.1f} ms")
    print(f"DP step overhead: {private / plain:.2f}x")
    print(f"DP-SGD step with Opacus's default noise (global generator): {default_noise * 1000:.1f} ms")
    print(f"device noise (OS-seeded generator, hardened draws) costs: {noise_cost:.2f}x "
          "(median of three alternating pairs)")


if __name__ == "__main__":
    main()
