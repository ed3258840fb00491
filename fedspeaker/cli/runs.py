"""`fedspeaker simulate | central | compare | privacy-sweep | audit | identify`.

Every flag maps onto a run-config option (fedspeaker/config.py), so a run started
here and one started with `flwr run .` are configured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedspeaker.config import RunSettings, saved_run_config
from fedspeaker.errors import FedSpeakerError


def simulate(args: argparse.Namespace) -> int:
    from simulations.launch import run_federation

    settings = _resumed_settings(args) if args.resume else _settings(args)
    _prepare(settings)
    print(f"federation: {settings.num_clients} clients, {settings.rounds} rounds, "
          f"{settings.strategy}, {settings.local_epochs} local epoch(s), {_dp_text(settings)}",
          flush=True)
    run_federation(settings, on_round=lambda line: print(line, flush=True))
    return _finish(settings)


def central(args: argparse.Namespace) -> int:
    from simulations.central import run_central

    settings = _settings(args)
    _prepare(settings)
    print(f"central: {settings.rounds} x {settings.local_epochs} epoch(s) on the union of the "
          f"client shards, {_dp_text(settings)}", flush=True)
    run_central(settings, on_round=lambda line: print(line, flush=True))
    return _finish(settings)


def compare(args: argparse.Namespace) -> int:
    from simulations.compare import run_grid
    from simulations.grid import ComparisonGrid

    grid = ComparisonGrid.load(args.grid)
    overrides = _key_values(args.set)
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).expanduser().resolve())
    out = Path(args.out or f"runs/compare-{grid.name}").expanduser().resolve()
    cells = grid.cells()
    print(f"grid {grid.name}: {grid.description}\n{len(cells)} runs ({len(grid.strategies)} "
          f"strategies x {len(grid.partitions)} partition(s) x {len(grid.scenarios)} scenario(s) x "
          f"{len(grid.seeds)} seed(s)" + (", plus the central baseline per partition and seed"
                                          if grid.central else "") + f"); results in {out}", flush=True)
    run_grid(grid, out, overrides, show=lambda line: print(line, flush=True))
    print(f"outputs: {out} (results.csv, report.md, curves_*.png, final_accuracy.png, cells/)")
    return 0


def privacy_sweep(args: argparse.Namespace) -> int:
    from simulations.privacy_sweep import run_sweep, sweep_grid

    overrides = _key_values(args.set)
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).expanduser().resolve())
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    grid = sweep_grid(args.epsilons, args.device_noise, args.seeds)
    out = Path(args.out or "runs/privacy-sweep").expanduser().resolve()
    print(f"privacy sweep: {', '.join(grid.scenarios)}; seeds {args.seeds}; "
          f"{len(grid.cells())} runs; results in {out}", flush=True)
    run_sweep(grid, out, overrides, show=lambda line: print(line, flush=True))
    print((out / "privacy.md").read_text())
    print(f"outputs: {out} (privacy.md, privacy.csv, privacy.png, and the comparison's files)")
    return 0


def audit(args: argparse.Namespace) -> int:
    from fedspeaker.privacy.audit import audit_run

    print(f"{'model':50s} {'loss AUC':>9s} {'enrolment AUC':>14s} {'members':>8s} {'others':>7s}")
    for path in args.model:
        result = audit_run(Path(path))
        print(f"{path:50s} {result.loss_auc:9.3f} {result.enrolment_auc:14.3f} "
              f"{result.members:8d} {result.nonmembers:7d}")
    print("AUC 0.5: the attacker cannot tell training utterances from held-out ones; 1.0: always can")
    return 0


def identify(args: argparse.Namespace) -> int:
    from fedspeaker.model.bundle import SpeakerModel

    model = SpeakerModel.load(Path(args.model))
    failed = 0
    for path in args.audio:
        try:
            ranked = model.identify(Path(path), top=args.top)
        except FedSpeakerError as exc:
            print(f"fedspeaker: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(path)
        for speaker, probability in ranked:
            print(f"  {speaker:>20s}  {probability:.3f}")
    return 1 if failed else 0


def _prepare(settings: RunSettings) -> None:
    """Load features and check the partition before any process is started."""
    from fedspeaker.data.speakers import load_speaker_data
    from fedspeaker.data.partition import client_shards

    data = load_speaker_data(settings)
    split = data.split
    print(f"corpus: {settings.corpus_dir} ({data.n_speakers} training speakers, "
          f"{len(split.unseen)} unseen; {len(split.train)} train / {len(split.test)} test / "
          f"{len(split.verification)} verification utterances"
          + (f"; {len(data.skipped)} file(s) skipped" if data.skipped else "") + ")", flush=True)
    print(f"features: {data.decoded} audio file(s) decoded, the rest read from the cache in "
          f"{settings.feature_cache_dir}", flush=True)
    shards = client_shards(settings)
    sizes = sorted(len(s) for s in shards)
    print(f"partition: {settings.partition}, utterances per client min {sizes[0]} / "
          f"median {sizes[len(sizes) // 2]} / max {sizes[-1]}", flush=True)


def _finish(settings: RunSettings) -> int:
    """Say how the run ended; 1 where it trained nobody (summary.json's ``outcome``)."""
    summary = json.loads((settings.out_dir_path / "summary.json").read_text())
    print(f"done in {summary['wall_seconds']:.0f} s: {_figures(summary['final'])}"
          + (f" (round 0: {_figures(summary['start'])})" if summary.get("start", {}).get("eer") is not None
             else ""))
    if "backend" in summary:
        print(f"back end: {summary['backend']}")
    released = summary.get("released") or {}
    op = released.get("operating_point") or {}
    if op.get("threshold") is not None:
        print(f"released {released['why']}")
        print(f"  released model on unseen speakers: EER {released['eer']:.3f}; with {released['enrol_recordings']}-"
              f"recording voiceprints at {op['target']} (threshold {op['threshold']:.3f}): FAR {op['far']:.3f}, "
              f"FRR {op['frr']:.3f}, FRR at FAR 1 % {op['frr_at_far_1pct']:.3f}; Cllr {released['cllr']:.3f}, "
              f"actual DCF {released['act_dcf']:.3f}, minDCF {released['enrol_min_dcf']:.3f}")
    start = summary.get("start") or {}
    if released.get("conditions") and start.get("conditions"):
        print("degraded trials (EER, minDCF; the test side degraded): round 0 -> released")
        for name, now in released["conditions"].items():
            was = start["conditions"].get(name, {})
            print(f"  {name:<24} EER {was.get('eer', float('nan')):.3f} -> {now['eer']:.3f}   "
                  f"minDCF {was.get('min_dcf', float('nan')):.3f} -> {now['min_dcf']:.3f}")
        print(f"  {'mean':<24} EER {start['degraded_eer_mean']:.3f} -> {released['degraded_eer_mean']:.3f} "
              f"({released['degraded_eer_mean'] / start['degraded_eer_mean']:.2f} x round 0; clean "
              f"{start['eer']:.3f} -> {released['eer']:.3f})")
    print(f"privacy: {summary['privacy']}")
    if spent := summary.get("epsilon_spent"):
        print(f"epsilon spent by the {spent['devices']} devices that replied: min {spent['min']:.2f}, "
              f"median {spent['median']:.2f}, max {spent['max']:.2f}"
              + (f" (target {spent['target']:g})" if spent["target"] else "")
              + f"; {spent['sat_out_for_budget']} sat out for budget")
    if summary["data"]["skipped_files"]:
        print(f"skipped {summary['data']['skipped_files']} unusable file(s); see summary.json")
    print(f"outputs: {settings.out_dir_path} (rounds.csv, tensorboard/, summary.json, curves.png, global_model.pt)")
    outcome = summary.get("outcome", {})
    if outcome.get("status") == "failed":
        from server.outcomes import failure_message

        print(f"fedspeaker: {failure_message(outcome)}", file=sys.stderr)
        return 1
    return 0


def _figures(scores: dict) -> str:
    """What a deployment sees first (voiceprint identification, unseen-speaker EER, minDCF),
    then the training head's accuracy; those a summary lacks are left out."""
    parts = [f"{name} {scores[key]:.3f}" for key, name in (
        ("voiceprint_accuracy", "voiceprint identification"), ("eer", "unseen-speaker EER"),
        ("min_dcf", "minDCF"), ("accuracy", "training head accuracy")) if scores.get(key) is not None]
    return ", ".join(parts)


def _dp_text(settings: RunSettings) -> str:
    if not settings.dp:
        return "no DP"
    if settings.noise_multiplier:
        return f"DP-SGD noise {settings.noise_multiplier:g}"
    return f"DP-SGD to epsilon {settings.epsilon:g}, delta {settings.delta:g}"


# Flags that map one-to-one onto run-config options.
_FLAG_OPTIONS = {
    "data_dir": "data-dir",
    "clients": "num-clients",
    "rounds": "rounds",
    "partition": "partition",
    "alpha": "alpha",
    "local_epochs": "local-epochs",
    "noise_multiplier": "noise-multiplier",
    "epsilon": "epsilon",
    "epsilon_budget": "epsilon-budget",
    "delta": "delta",
    "seed": "seed",
    "strategy": "strategy",
}


def _settings(args: argparse.Namespace) -> RunSettings:
    config: dict[str, Any] = {**RunSettings().to_run_config(), **_key_values(args.set)}
    for attribute, option in _FLAG_OPTIONS.items():
        value = getattr(args, attribute)
        if value is not None:
            config[option] = value
    if args.no_dp:
        config["dp"] = False
    settings = RunSettings.from_run_config(config)
    out = settings.out_dir_path if not args.out else Path(args.out).expanduser().resolve()
    return settings.replace(out_dir=str(out), data_dir=str(settings.corpus_dir.resolve()))


def _resumed_settings(args: argparse.Namespace) -> RunSettings:
    """A stopped run's own settings, from its checkpoint: resuming needs only its folder."""
    from server.checkpoint import Checkpoint

    given = [f"--{a.replace('_', '-')}" for a in (*_FLAG_OPTIONS, "no_dp", "set") if getattr(args, a)]
    if given:
        raise FedSpeakerError(f"--resume takes the run's settings from its checkpoint; leave out "
                              f"{', '.join(given)}")
    out = RunSettings.from_run_config({"resume": True, "out-dir": args.out or ""}).out_dir_path  # resume needs out-dir
    checkpoint = Checkpoint.read(out)  # read once: it holds the settings and what is done
    settings = RunSettings.from_run_config({**saved_run_config(checkpoint.run_config), "resume": True,
                                           "out-dir": str(out)})
    done = checkpoint.check(settings).round
    print(f"resuming {out} after round {done} of {settings.rounds}", flush=True)
    return settings


def _key_values(items: list[str] | None) -> dict[str, str]:
    """--set KEY=VALUE items; values are typed and checked by RunSettings."""
    config = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedSpeakerError(f"--set takes KEY=VALUE, got {item!r}")
        config[key.strip()] = value.strip()
    return config
