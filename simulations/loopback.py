"""A real deployment on one machine: a SuperLink and SuperNodes on 127.0.0.1.

Everything a deployment across machines has, made in one folder: a development CA
and SuperLink certificate, one authentication key per device, registration of the
devices' public keys, each SuperNode on its own data folder and state folder, and
`flwr run` against the SuperLink over TLS. The processes are built by the same
functions as `fedspeaker superlink` / `supernode` and stopped by PID on exit, also
when something fails. The integration test and the client footprint benchmark use it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tomli_w

from fedspeaker.deploy.certs import make_certificates, make_node_key
from fedspeaker.config import RunSettings
from fedspeaker.deploy.flower import BIN, SuperLinkOptions, SuperNodeOptions, flower_env
from fedspeaker.errors import FedSpeakerError
from fedspeaker.deploy.processes import Child, child_process, free_port, wait_for_port
from simulations.launch import show_new_rounds

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "loopback"  # the SuperLink connection's name in this deployment's FLWR_HOME


@dataclass(frozen=True)
class Device:
    name: str
    data_dir: Path
    registered: bool = True  # False: a device whose key the server never registered


class LoopbackDeployment(contextlib.ExitStack):
    """``with LoopbackDeployment(folder, devices) as d: d.run(settings)``."""

    def __init__(self, folder: Path, devices: list[Device]) -> None:
        super().__init__()
        self.folder, self.devices = folder, devices
        self.home = folder / "flwr-home"  # FLWR_HOME of `flwr` on the "server machine"
        self.port = free_port()
        self.link: Child | None = None
        self.nodes: dict[str, Child] = {}

    def __enter__(self) -> "LoopbackDeployment":
        super().__enter__()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        certs = make_certificates(self.folder / "certs", ["localhost", "127.0.0.1"])
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": f"127.0.0.1:{self.port}", "root-certificates": str(certs.ca_cert)},
        }}))
        link = SuperLinkOptions(certs.folder, port=self.port, database=self.home / "superlink.db")
        self.link = self._start_process("superlink", link.command())
        wait_for_port(self.port, self.link)
        for device in self.devices:
            key = self.folder / "keys" / device.name
            public = make_node_key(key)
            if device.registered:
                self.flwr("supernode", "register", str(public), CONNECTION)
            node = SuperNodeOptions(f"127.0.0.1:{self.port}", device.data_dir, certs.ca_cert, key,
                                    state_dir=self.folder / "state" / device.name, port=free_port(),
                                    max_retries=None if device.registered else 0)
            self.nodes[device.name] = self._start_process(device.name, node.command())

    def _start_process(self, name: str, cmd: list[str]) -> Child:
        log = self.enter_context(open(self.log_path(name), "w"))
        return self.enter_context(child_process(cmd, flower_env(self.home), log))

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """A `flwr` CLI command against this deployment's SuperLink; its output."""
        done = subprocess.run([str(BIN / "flwr"), *args], env=flower_env(self.home), text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode:
            raise FedSpeakerError(f"flwr {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def online_nodes(self) -> list[str]:
        """Node IDs the SuperLink reports online."""
        listing = json.loads(self.flwr("supernode", "ls", CONNECTION, "--format", "json"))
        return [str(n["node-id"]) for n in listing.get("nodes", []) if n.get("status") == "online"]

    def stop_runs(self) -> list[str]:
        """Stop every run the SuperLink still counts as running (after its ServerApp died,
        the SuperLink would notice only at its next heartbeat timeout); their IDs."""
        listing = json.loads(self.flwr("ls", CONNECTION, "--format", "json"))
        running = [str(r["run-id"]) for r in listing.get("runs", [])
                   if str(r.get("status", "")).startswith("running")]
        for run_id in running:
            self.flwr("stop", run_id, CONNECTION)
        return running

    def run(self, settings: RunSettings, on_round: Callable[[str], None] = print,
            timeout: float = 600.0) -> Path:
        """`flwr run` the app on this deployment; returns the run's output folder."""
        out_dir = settings.out_dir_path
        settings = settings.replace(data_dir=str(settings.corpus_dir.resolve()), out_dir=str(out_dir))
        overrides = self.folder / "run-config.toml"
        overrides.write_text(tomli_w.dumps(settings.to_run_config()))
        cmd = [str(BIN / "flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(overrides), "--stream"]
        # `flwr run` lives as long as this call, however it ends
        with open(self.log_path("flwr-run"), "w") as log, \
                child_process(cmd, flower_env(self.home), log) as run:
            deadline, shown = time.monotonic() + timeout, 0
            while not (out_dir / "summary.json").exists():
                if time.monotonic() > deadline or run.poll() is not None or self.link.poll() is not None:
                    raise FedSpeakerError(f"the run did not finish; see the logs in {self.folder}:\n"
                                          + _tail(self.log_path("flwr-run")))
                time.sleep(0.5)
                shown = show_new_rounds(out_dir / "rounds.csv", shown, on_round)
            show_new_rounds(out_dir / "rounds.csv", shown, on_round)
        return out_dir


def device_folders(settings: RunSettings, folder: Path) -> list[Path]:
    """One folder per client, holding (as links) the utterances of its simulation shard.

    Lets a loopback deployment train on exactly the shards a simulation would use,
    while each SuperNode sees nothing but its own folder.
    """
    from fedspeaker.data.speakers import load_speaker_data
    from fedspeaker.data.partition import client_shards

    train = load_speaker_data(settings).split.train
    folders = []
    for i, shard in enumerate(client_shards(settings)):
        device = folder / f"device-{i}"
        for utt in (train[j] for j in shard):
            link = device / utt.speaker / utt.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(utt.path.resolve())
        folders.append(device)
    return folders


def _tail(path: Path, lines: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]) if path.exists() else ""
