"""`fedspeaker`: federated speaker recognition, simulated or deployed, and used on devices.

The command line is the one place that composes every layer: runs and comparisons
(cli/runs.py) drive simulations/, deployment commands (cli/deploy.py) start Flower's
SuperLink and SuperNodes, device commands (cli/device.py) export, enrol and verify.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from typing import Any, Callable, Sequence

from fedspeaker.cli.deploy import add_commands as add_deployment_commands
from fedspeaker.cli.device import add_commands as add_device_commands
from fedspeaker.cli.runs import audit, central, compare, identify, privacy_sweep, simulate
from fedspeaker.config import PARTITIONS, STRATEGIES, RunSettings
from fedspeaker.errors import FedSpeakerError
from simulations.grid import shipped_grids

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedspeaker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    d = RunSettings()  # defaults shown in --help come from the one typed config

    def run_command(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=func)
        p.add_argument("--data-dir", help="corpus root: <root>/<speaker>/<utterance>.{wav,flac} "
                       "(default: the bundled DSPSpeech-20 mini)")
        p.add_argument("--clients", type=int, help=f"number of clients (default {d.num_clients})")
        p.add_argument("--rounds", type=int, help=f"federated rounds (default {d.rounds}; 0: the "
                       "starting model and its back end only)")
        p.add_argument("--partition", help="how utterances are split across clients: "
                       f"{', '.join(PARTITIONS)} (default {d.partition})")
        p.add_argument("--alpha", type=float, help="Dirichlet concentration over "
                       f"speakers; smaller is more skewed (default {d.alpha})")
        p.add_argument("--local-epochs", type=int, help=f"epochs per round (default {d.local_epochs})")
        p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
        p.add_argument("--noise-multiplier", type=float,
                       help="DP-SGD noise multiplier (instead of a target --epsilon; 0: calibrated to it)")
        p.add_argument("--epsilon", type=float,
                       help=f"target epsilon per client over the whole run (default {d.epsilon:g})")
        p.add_argument("--epsilon-budget", type=float, help="a client stops training "
                       "(and says so) once its next round would take it past this epsilon (0: none)")
        p.add_argument("--delta", type=float, help=f"DP delta (default {d.delta:g})")
        p.add_argument("--strategy", help=f"Flower aggregation strategy: {', '.join(STRATEGIES)} "
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
                   f"({', '.join(shipped_grids())}; each runs the default model, the pretrained "
                   "encoder with its back end, unless its name says tdnn) or a TOML file (default: default)")
    p.add_argument("--out", help="output folder (default runs/compare-<grid>); re-running with the "
                   "same folder runs only the cells that are missing")
    p.add_argument("--data-dir", help="corpus root (default: the bundled corpus)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a run-config option for every cell, e.g. --set rounds=5")

    p = sub.add_parser("privacy-sweep", help="accuracy, EER and membership-inference AUC against "
                       "epsilon: no DP, sample-level and device-level DP on the same shards")
    p.set_defaults(command=privacy_sweep)
    p.add_argument("--epsilons", type=_number_list(float), default=[1.0, 2.0, 4.0, 8.0],
                   help="sample-level target epsilons (default 1,2,4,8)")
    p.add_argument("--device-noise", type=_number_list(float), default=[1.0, 4.0],
                   help="device-level noise multipliers, Flower's server-side fixed clipping "
                   "(default 1,4; empty to skip)")
    p.add_argument("--user-noise", dest="device_noise", type=_number_list(float), default=argparse.SUPPRESS,
                   action=_RenamedFlag, new="--device-noise", help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=_number_list(int), default=[0], help="seeds (default 0)")
    p.add_argument("--rounds", type=int, help=f"rounds per run (default {d.rounds})")
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
    p.add_argument("--top", type=_positive, default=3, help="speakers to list (default 3)")
    p.add_argument("audio", nargs="+", help="audio files (.wav or .flac)")
    add_device_commands(sub)  # export, enroll, verify
    return parser


class _RenamedFlag(argparse.Action):
    """A flag's old name, hidden from --help: it still sets what the new one sets, and says so."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated: use {self.new} (the same flag, renamed)",
                      FutureWarning)
        setattr(namespace, self.dest, values)


def _number_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """Comma-separated numbers; their bounds are the run settings' (RunSettings checks each cell)."""
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def _positive(text: str) -> int:
    """identify's --top: an integer > 0 (not a run setting, so argparse checks it)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
