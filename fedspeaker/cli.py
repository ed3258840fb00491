"""`fedspeaker`: federated speaker recognition, simulated or deployed, and used on devices.

Simulate a federation, train the central baseline, compare strategies, sweep and audit
privacy, identify speakers (here); deploy on real devices (cli_deploy.py); export,
enrol and verify (cli_device.py).

Every flag maps onto a run-config option (fedspeaker/config.py), so a run started
here and one started with `flwr run .` are configured the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fedspeaker.cli_deploy import add_commands as add_deployment_commands
from fedspeaker.cli_device import add_commands as add_device_commands
from fedspeaker.config import PARTITIONS, STRATEGIES, RunSettings
from fedspeaker.errors import FedSpeakerError

log = logging.getLogger("fedspeaker")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so `kill` also stops the processes we started
    logging.basicConfig(level=logging.INFO, format="fedspeaker: %(levelname)s: %(message)s")
    for noisy in ("matplotlib", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.command(args)
    except FedSpeakerError as exc:
        print(f"fedspeaker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedspeaker: interrupted; every process this run started has been stopped",
              file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    from simulations.grid import Grid

    grid = Grid.load(args.grid)
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
    if args.rounds:
        overrides["rounds"] = args.rounds
    grid = sweep_grid(args.epsilons, args.user_noise, args.seeds)
    out = Path(args.out or "runs/privacy-sweep").expanduser().resolve()
    print(f"privacy sweep: {', '.join(grid.scenarios)}; seeds {args.seeds}; "
          f"{len(grid.cells())} runs; results in {out}", flush=True)
    run_sweep(grid, out, overrides, show=lambda line: print(line, flush=True))
    print((out / "privacy.md").read_text())
    print(f"outputs: {out} (privacy.md, privacy.csv, privacy.png, and the comparison's files)")
    return 0


def audit(args: argparse.Namespace) -> int:
    from simulations.audit import audit_run

    print(f"{'model':50s} {'loss AUC':>9s} {'enrolment AUC':>14s} {'members':>8s} {'others':>7s}")
    for path in args.model:
        result = audit_run(Path(path))
        print(f"{path:50s} {result.loss_auc:9.3f} {result.enrolment_auc:14.3f} "
              f"{result.members:8d} {result.nonmembers:7d}")
    print("AUC 0.5: the attacker cannot tell training utterances from held-out ones; 1.0: always can")
    return 0


def identify(args: argparse.Namespace) -> int:
    from fedspeaker.inference import SpeakerModel

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
    from fedspeaker.data import load_speaker_data
    from simulations.partition import client_shards

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
    summary = json.loads((settings.out_dir_path / "summary.json").read_text())
    final = summary["final"]
    print(f"done in {summary['wall_seconds']:.0f} s: accuracy {final['accuracy']:.3f}, "
          f"EER {final['eer']:.3f} (best accuracy {summary['best_accuracy']:.3f} at round "
          f"{summary['best_round']:.0f})")
    print(f"privacy: {summary['privacy']}")
    if summary["data"]["skipped_files"]:
        print(f"skipped {summary['data']['skipped_files']} unusable file(s); see summary.json")
    print(f"outputs: {settings.out_dir_path} (rounds.csv, summary.json, curves.png, global_model.pt)")
    return 0


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
    if args.noise_multiplier is not None and args.epsilon is not None:
        raise FedSpeakerError("give either --noise-multiplier or --epsilon, not both")
    settings = RunSettings.from_run_config(config)
    out = settings.out_dir_path if not args.out else Path(args.out).expanduser().resolve()
    return settings.replace(out_dir=str(out), data_dir=str(settings.corpus_dir.resolve()))


def _resumed_settings(args: argparse.Namespace) -> RunSettings:
    """A stopped run's own settings, from its checkpoint: resuming needs only its folder."""
    from server.checkpoint import Checkpoint

    if not args.out:
        raise FedSpeakerError("--resume needs --out: the folder of the run to go on with")
    given = [f"--{a.replace('_', '-')}" for a in (*_FLAG_OPTIONS, "no_dp", "set") if getattr(args, a)]
    if given:
        raise FedSpeakerError(f"--resume takes the run's settings from its checkpoint; leave out "
                              f"{', '.join(given)}")
    out = Path(args.out).expanduser().resolve()
    checkpoint = Checkpoint.read(out)  # read once: it holds the settings and what is done
    settings = RunSettings.from_run_config({**checkpoint.run_config, "resume": True, "out-dir": str(out)})
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedspeaker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    d = RunSettings()  # defaults shown in --help come from the one typed config

    def run_command(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=func)
        p.add_argument("--data-dir", help="corpus root: <root>/<speaker>/<utterance>.{wav,flac} "
                       "(default: the bundled DSPSpeech-20 mini)")
        p.add_argument("--clients", type=_positive(int), help=f"number of clients (default {d.num_clients})")
        p.add_argument("--rounds", type=_positive(int), help=f"federated rounds (default {d.rounds})")
        p.add_argument("--partition", choices=PARTITIONS, help="how utterances are split "
                       f"across clients (default {d.partition})")
        p.add_argument("--alpha", type=_positive(float), help="Dirichlet concentration over "
                       f"speakers; smaller is more skewed (default {d.alpha})")
        p.add_argument("--local-epochs", type=_positive(int), help=f"epochs per round (default {d.local_epochs})")
        p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
        p.add_argument("--noise-multiplier", type=_positive(float),
                       help="DP-SGD noise multiplier (instead of a target --epsilon)")
        p.add_argument("--epsilon", type=_positive(float),
                       help=f"target epsilon per client over the whole run (default {d.epsilon:g})")
        p.add_argument("--epsilon-budget", type=_positive(float), help="a client stops training "
                       "(and says so) once its next round would take it past this epsilon")
        p.add_argument("--delta", type=_positive(float), help=f"DP delta (default {d.delta:g})")
        p.add_argument("--strategy", choices=STRATEGIES, help="Flower aggregation strategy "
                       f"(default {d.strategy}); its hyperparameters via --set, e.g. proximal-mu")
        p.add_argument("--seed", type=int, help=f"seed for splits, partitions, model (default {d.seed})")
        p.add_argument("--out", help="output folder (default runs/<date-time>)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any other run-config option from pyproject.toml, e.g. --set lr=0.001")
        return p

    p = run_command("simulate", simulate, "run a simulated federation (Flower Simulation Engine)")
    p.add_argument("--resume", action="store_true", help="go on with the run in --out after its "
                   "last finished round (its settings come from its checkpoint)")
    run_command("central", central, "train the same model centrally: the upper bound")
    add_deployment_commands(sub)  # certs, node-key, superlink, supernode

    p = sub.add_parser("compare", help="compare strategies over a grid of partitions, scenarios "
                       "and seeds (resumable)")
    p.set_defaults(command=compare)
    p.add_argument("grid", nargs="?", default="default", help="a grid in simulations/grids/ "
                   "(default, robust, strategies, realistic, smoke) or a TOML file (default: default)")
    p.add_argument("--out", help="output folder (default runs/compare-<grid>); re-running with the "
                   "same folder runs only the cells that are missing")
    p.add_argument("--data-dir", help="corpus root (default: the bundled corpus)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a run-config option for every cell, e.g. --set rounds=5")

    p = sub.add_parser("privacy-sweep", help="accuracy, EER and membership-inference AUC against "
                       "epsilon: no DP, sample-level and user-level DP on the same shards")
    p.set_defaults(command=privacy_sweep)
    p.add_argument("--epsilons", type=_number_list(float), default=[1.0, 2.0, 4.0, 8.0],
                   help="sample-level target epsilons (default 1,2,4,8)")
    p.add_argument("--user-noise", type=_number_list(float), default=[1.0, 4.0],
                   help="user-level noise multipliers, Flower's server-side fixed clipping "
                   "(default 1,4; empty to skip)")
    p.add_argument("--seeds", type=_number_list(int), default=[0], help="seeds (default 0)")
    p.add_argument("--rounds", type=_positive(int), help=f"rounds per run (default {d.rounds})")
    p.add_argument("--out", help="output folder (default runs/privacy-sweep; resumable)")
    p.add_argument("--data-dir", help="corpus root (default: the bundled corpus)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a run-config option for every run, e.g. --set local-epochs=1")

    p = sub.add_parser("audit", help="membership-inference attacks on trained models (AUC)")
    p.set_defaults(command=audit)
    p.add_argument("model", nargs="+", help="global_model.pt files written by simulate, central "
                   "or compare (audited on the corpus they were trained on)")

    p = sub.add_parser("identify", help="name the most likely speakers of audio files")
    p.set_defaults(command=identify)
    p.add_argument("--model", required=True, help="global_model.pt written by simulate or central")
    p.add_argument("--top", type=_positive(int), default=3, help="speakers to list (default 3)")
    p.add_argument("audio", nargs="+", help="audio files (.wav or .flac)")
    add_device_commands(sub)  # export, enroll, verify
    return parser


def _number_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if any(isinstance(v, float) and not (v > 0 and math.isfinite(v)) for v in values):
            raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
        return values

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    noun = {"int": "an integer", "float": "a number"}[kind.__name__]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} > 0, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected {noun} > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


if __name__ == "__main__":
    sys.exit(main())
