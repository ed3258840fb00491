"""Benchmark: what degraded trial conditions add to the server's scoring of one round.

    python -m simulations.conditions_cost [--conditions standard] [--repeats 9] [--set KEY=VALUE ...]

Scores the starting model on the run's evaluation with and without ``test-conditions``
(median of ``repeats`` scorings each, one thread as the ServerApp runs) and prints the
seconds each takes and the difference; the first call also makes and caches the
degraded audio where it is not cached yet, and says how long that took.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedspeaker.config import RunSettings
from fedspeaker.data.speakers import load_speaker_data
from fedspeaker.evaluation.scoring import EvaluationSet, evaluate
from fedspeaker.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", default="standard")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config(dict(item.split("=", 1) for item in args.set))
    data = load_speaker_data(settings)
    started = time.monotonic()
    degraded = EvaluationSet.of(data, settings.replace(test_conditions=args.conditions))
    made = time.monotonic() - started
    clean = EvaluationSet.of(data, settings.replace(test_conditions=""))
    model = build_model(settings, data.n_speakers)
    seconds = {}
    for name, evaluation in (("clean only", clean), (f"with {args.conditions}", degraded)):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            evaluate(model, evaluation)
            times.append(time.perf_counter() - t)
        seconds[name] = statistics.median(times)
        print(f"scoring a round, {name}: {seconds[name]:.3f} s (median of {args.repeats})")
    extra = seconds[f"with {args.conditions}"] - seconds["clean only"]
    print(f"added per scored round: {extra:.3f} s for {len(degraded.conditions)} condition(s) of "
          f"{len(degraded.verify_feats)} utterances, {len(degraded.trials):,} trials each")
    print(f"degraded audio for the evaluation: {made:.1f} s (made and cached on a first run; "
          "read from the cache after)")


if __name__ == "__main__":
    main()
