"""Run a whole federation on this machine through Flower's Simulation Engine.

The same path as ``flwr run .``: a SuperLink in simulation mode (Ray behind it) takes
the app and its run config. Here the SuperLink is our own child, on free loopback
ports, with its own FLWR_HOME, and it is stopped (with Ray) when the run ends,
whichever way it ends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import tomli_w

from fedspeaker.config import RunSettings
from fedspeaker.deploy.flower import BIN, flower_env
from fedspeaker.errors import FedSpeakerError
from fedspeaker.deploy.processes import Child, child_process, free_port, wait_for_port
from fedspeaker.reporting.run_report import progress_line, read_rounds

APP_DIR = Path(__file__).resolve().parent.parent


def run_federation(settings: RunSettings, on_round: Callable[[str], None] = print) -> None:
    """Run the federation; the ServerApp writes results into ``settings.out_dir``."""
    # Flower runs a copy of the app code: give it absolute paths, resolved here
    settings = settings.replace(data_dir=str(settings.corpus_dir.resolve()),
                                out_dir=str(settings.out_dir_path))
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "flower.log"
    shown = 0

    def show() -> None:
        nonlocal shown
        shown = show_new_rounds(out_dir / "rounds.csv", shown, on_round)

    run_app(APP_DIR, settings.to_run_config(), num_supernodes=settings.num_clients, log_path=log_path,
            while_running=show)
    show()
    if not (out_dir / "summary.json").exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        hint = (f"\nits finished rounds are kept: go on with `fedspeaker simulate --resume --out {out_dir}`"
                if (out_dir / "checkpoint.pt").exists() else "")
        raise FedSpeakerError(f"the federation did not finish; the end of {log_path}:\n{tail}{hint}")


def run_app(app_dir: Path, run_config: dict[str, Any], *, num_supernodes: int, log_path: Path,
            while_running: Callable[[], None] = lambda: None) -> None:
    """Run a Flower app in the Simulation Engine on ``num_supernodes`` virtual nodes, behind
    a SuperLink of our own on free loopback ports, and wait until it ends (calling
    ``while_running`` every half second). Everything started is stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="fedspeaker-flwr-") as home, \
            open(log_path, "w") as log_file, \
            _superlink(Path(home), log_file) as (env, link):
        overrides = Path(home) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        cmd = [str(BIN / "flwr"), "run", str(app_dir), "fedspeaker", "--run-config", str(overrides),
               "--federation-config", federation_config(num_supernodes), "--stream"]
        with child_process(cmd, env, log_file) as run:
            while run.poll() is None and link.poll() is None:
                time.sleep(0.5)
                while_running()


def federation_config(num_supernodes: int) -> str:
    """Flower's simulation settings: one CPU per client actor, as many actors as CPUs."""
    return (f"num-supernodes={num_supernodes} client-resources-num-cpus=1 "
            f"client-resources-num-gpus=0.0 init-args-num-cpus={os.cpu_count() or 1} "
            "init-args-num-gpus=0")


@contextlib.contextmanager
def _superlink(home: Path, log_file) -> Iterator[tuple[dict[str, str], "Child"]]:
    port = free_port()
    env = {
        **flower_env(home),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray's listeners on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedspeaker"\n\n[superlink.fedspeaker]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
           "--database", str(home / "state.db")]
    with child_process(cmd, env, log_file) as link:
        wait_for_port(port, link)
        yield env, link


def show_new_rounds(rounds_csv: Path, shown: int, on_round: Callable[[str], None]) -> int:
    if not rounds_csv.exists():
        return shown
    rows = read_rounds(rounds_csv)
    for row in rows[shown:]:
        on_round(progress_line(row))
    return max(shown, len(rows))

