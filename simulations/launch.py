"""Run a whole federation on this machine through Flower's Simulation Engine.

The same path as ``flwr run .``: a SuperLink in simulation mode (Ray behind it) takes
the app and its run config. Here the SuperLink is our own child, on free loopback
ports, with its own FLWR_HOME, and it is stopped (with Ray) when the run ends,
whichever way it ends.

With Ray's own ``RAY_ADDRESS`` set (``host:port`` of a cluster's head, started with
``ray start --head``), the Simulation Engine joins that cluster instead and its clients
run on every node of it; the cluster is left running. Without it, the engine always
starts a Ray of its own, even where ``ray start`` has left a cluster on this machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
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
    ``while_running`` every half second). Everything started is stopped on the way out;
    a Ray cluster named by RAY_ADDRESS is joined, and left running."""
    cluster = ray_cluster_address()
    with tempfile.TemporaryDirectory(prefix="fedspeaker-flwr-") as home, \
            open(log_path, "w") as log_file, \
            _superlink(Path(home), log_file, cluster) as (env, link):
        overrides = Path(home) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        cmd = [str(BIN / "flwr"), "run", str(app_dir), "fedspeaker", "--run-config", str(overrides),
               "--federation-config", federation_config(num_supernodes, cluster), "--stream"]
        with child_process(cmd, env, log_file) as run:
            while run.poll() is None and link.poll() is None:
                time.sleep(0.5)
                while_running()


def federation_config(num_supernodes: int, cluster: str | None = None) -> str:
    """Flower's simulation settings: one CPU per client actor, as many actors as CPUs.
    On a cluster, no init-args CPUs or GPUs: ray.init() refuses them when it joins one,
    whose nodes say what they offer."""
    config = f"num-supernodes={num_supernodes} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    if cluster is None:  # a Ray of our own, sized to this machine
        config += f" init-args-num-cpus={os.cpu_count() or 1} init-args-num-gpus=0"
    return config


def ray_cluster_address() -> str | None:
    """The Ray cluster to run the clients on: Ray's own ``RAY_ADDRESS`` (``host:port`` of
    the head's GCS, or ``auto``); None (unset, empty or ``local``) for a Ray of our own."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "local"):
        return None
    if "://" in address:
        raise FedSpeakerError(
            f"RAY_ADDRESS={address}: Ray Client (ray://) is not supported; run fedspeaker on a "
            "node of the cluster (usually the head) with RAY_ADDRESS=<head address>:<port>")
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise FedSpeakerError(f"RAY_ADDRESS={address}: expected <head address>:<port>, "
                                  "as `ray start --head` prints it")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as exc:
            raise FedSpeakerError(
                f"RAY_ADDRESS={address}: no Ray cluster answers there ({exc}); start its head "
                "with `ray start --head`, or unset RAY_ADDRESS to run on this machine alone") from None
    return address


@contextlib.contextmanager
def _superlink(home: Path, log_file, cluster: str | None = None) -> Iterator[tuple[dict[str, str], "Child"]]:
    port = free_port()
    env = {
        **flower_env(home),
        # Ray's own switch: without it Ray replaces 127.0.0.1 by this machine's outward
        # address, for the listeners of a Ray of our own and for a loopback RAY_ADDRESS alike
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # read by the Simulation Engine's ray.init(): join that cluster, or ("local") start a
        # Ray of its own rather than join one that `ray start` left on this machine
        "RAY_ADDRESS": cluster or "local",
    }
    if cluster:
        log_file.write(f"fedspeaker: the clients run on the Ray cluster at RAY_ADDRESS={cluster}\n")
        log_file.flush()
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

