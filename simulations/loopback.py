"""A real deployment on one machine: the server side and SuperNodes on 127.0.0.1.

Everything a deployment across machines has, made in one folder: the certificates
(federation CA, the SuperLink's loopback certificate, the public endpoint's), the
operator's app-signing key, one authentication key per device and the registration of
its public key, the server side (the SuperLink on 127.0.0.1 and nginx, the public
endpoint that forwards only the Fleet API), and each device's SuperNode, on its own
data, state and Flower folders, with fedspeaker's SuperExec that runs only apps the
operator signed. `flwr run` goes to the SuperLink's loopback port, as the operator on
the server does, with the app's signature in its run config. The app is a snapshot of
this checkout taken at start (the files of the bundle `flwr run .` would send), so every
run of one deployment, a run and its resume included, ships the same signed bytes even
if the checkout changes meanwhile. The processes come from
the same functions as `fedspeaker superlink` / `supernode` (fedspeaker/deploy/launch.py)
and are stopped by PID on exit, also when something fails. The integration tests and
the client footprint benchmark use it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tomli_w

from fedspeaker.config import RunSettings
from fedspeaker.deploy.appsign import build_app, make_app_key, sign_fab
from fedspeaker.deploy.certs import CertificatePaths, make_certificates, make_node_key
from fedspeaker.deploy.flower import BIN, SuperNodeOptions, flower_env
from fedspeaker.deploy.launch import ServerOptions, start_server, start_supernode
from fedspeaker.deploy.processes import Child, child_process, free_port, free_ports
from fedspeaker.errors import FedSpeakerError
from simulations.launch import show_new_rounds

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "loopback"  # the SuperLink connection's name in the operator's FLWR_HOME


class RunNotCompleted(FedSpeakerError):
    """A run Flower reports as not completed (failed, stopped): its status and details."""

    def __init__(self, run_id: str, status: str, details: str) -> None:
        super().__init__(f"run {run_id} {status}: {details}")
        self.run_id, self.status, self.details = run_id, status, details


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
        self.home = folder / "flwr-home"  # FLWR_HOME of the operator's `flwr` on the server
        # the public endpoint (nginx), what devices dial; the SuperLink, what the operator dials
        self.port, self.link_port = free_ports(2)
        self.certs = CertificatePaths(folder / "certs")
        self.app_key = folder / "keys" / "app-signing"  # the operator's; its .pub is on every device
        self.app_dir = folder / "app"  # the app this deployment runs: a snapshot of APP_DIR
        self.server: dict[str, Child] = {}
        self.nodes: dict[str, Child] = {}  # each device's SuperNode
        self.superexecs: dict[str, Child] = {}  # each device's SuperExec

    def __enter__(self) -> "LoopbackDeployment":
        super().__enter__()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def link(self) -> Child | None:
        return self.server.get("superlink")

    @property
    def children(self) -> list[Child]:
        """Every process this deployment started."""
        return [*self.server.values(), *self.nodes.values(), *self.superexecs.values()]

    def _start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        snapshot_app(APP_DIR, self.app_dir)
        make_certificates(self.certs.folder, ["localhost", "127.0.0.1"])
        app_public_key = make_app_key(self.app_key)
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": f"127.0.0.1:{self.link_port}",
                         "root-certificates": str(self.certs.ca_cert)},
        }}))
        server = ServerOptions(certs=self.certs.folder, run_dir=self.folder / "nginx", port=self.port,
                               link_port=self.link_port, database=self.home / "superlink.db")
        self.server = start_server(self, server, env=flower_env(self.home), log_for=self._log)
        for device in self.devices:
            key = self.folder / "keys" / device.name
            public = make_node_key(key)
            if device.registered:
                self.flwr("supernode", "register", str(public), CONNECTION)
            node = SuperNodeOptions(superlink=f"127.0.0.1:{self.port}", data_dir=device.data_dir,
                                    ca_cert=self.certs.ca_cert, key=key, app_keys=app_public_key,
                                    state_dir=self.folder / "state" / device.name, port=free_port(),
                                    max_retries=None if device.registered else 0)
            started = start_supernode(self, node, env=flower_env(self.device_home(device.name)),
                                      log_for=lambda what, name=device.name: self._log(
                                          name if what == "supernode" else f"{name}-{what}"))
            self.nodes[device.name] = started["supernode"]
            self.superexecs[device.name] = started["superexec"]

    def _log(self, name: str):
        return self.enter_context(open(self.log_path(name), "w"))

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def device_home(self, name: str) -> Path:
        """The device's own Flower folder (where it installs the apps it runs)."""
        return self.folder / "device-homes" / name

    def device_log(self, name: str) -> str:
        """What a device's SuperNode and SuperExec (and so its ClientApps) logged."""
        return "".join(self.log_path(n).read_text(errors="replace") for n in (name, f"{name}-superexec")
                       if self.log_path(n).exists())

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """A `flwr` CLI command of the operator, on the server; its output."""
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
            try:
                self.flwr("stop", run_id, CONNECTION)
            except FedSpeakerError as exc:
                if "already finished" not in str(exc):  # it ended in the meantime
                    raise
        return running

    def sign(self, app_dir: Path | None = None) -> str:
        """The operator's signature of the app bundle `flwr run app_dir` sends."""
        return sign_fab(build_app(app_dir or self.app_dir), self.app_key)

    def submit(self, settings: RunSettings, *, app_dir: Path | None = None,
               signature: str | None = None) -> str:
        """`flwr run` without waiting; the run's ID. ``app_dir`` defaults to this
        deployment's app, ``signature`` to the operator's signature of ``app_dir``."""
        app_dir = app_dir or self.app_dir
        config = self._run_config(settings, self.sign(app_dir) if signature is None else signature)
        out = self.flwr("run", str(app_dir), CONNECTION, "--run-config", str(config), "--format", "json")
        return str(json.loads(out)["run-id"])

    def run(self, settings: RunSettings, on_round: Callable[[str], None] = print,
            timeout: float = 600.0, *, app_dir: Path | None = None, signature: str | None = None) -> Path:
        """`flwr run --stream` the signed app (or ``app_dir`` with ``signature``, as for
        submit) on this deployment, until the run has finished; the run's output folder.
        `flwr run` exits 0 whatever became of the run, so this asks the SuperLink, as an
        operator would, and raises RunNotCompleted with Flower's status and its details
        (a failed ServerApp's error: ``RUN FAILED: ...``) unless the run completed."""
        app_dir = app_dir or self.app_dir
        out_dir = settings.out_dir_path
        config = self._run_config(settings.replace(out_dir=str(out_dir)),
                                  self.sign(app_dir) if signature is None else signature)
        cmd = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(config), "--stream"]
        log_path = self.log_path("flwr-run")
        # `flwr run` lives as long as this call, however it ends
        with open(log_path, "w") as log, child_process(cmd, flower_env(self.home), log) as run:
            deadline, shown = time.monotonic() + timeout, 0
            while run.poll() is None:  # the log stream ends when the run has finished
                if time.monotonic() > deadline or self.link.poll() is not None:
                    raise FedSpeakerError(f"the run did not finish; see the logs in {self.folder}:\n"
                                          + _tail(log_path))
                time.sleep(0.5)
                shown = show_new_rounds(out_dir / "rounds.csv", shown, on_round)
            show_new_rounds(out_dir / "rounds.csv", shown, on_round)
        started = re.search(r"Successfully started run (\d+)", log_path.read_text(errors="replace"))
        if run.proc.returncode or started is None:
            raise FedSpeakerError(f"flwr run failed (status {run.proc.returncode}):\n" + _tail(log_path))
        status, details = self.run_status(started.group(1))
        if status != "finished:completed":
            raise RunNotCompleted(started.group(1), status, details)
        return out_dir

    def run_status(self, run_id: str, wait: float = 30.0) -> tuple[str, str]:
        """(status, details) of a run as the SuperLink reports it (`flwr ls --run-id`),
        once it has finished (within ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while True:
            (row,) = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"]
            status = str(row.get("status", ""))
            if status.startswith("finished") or time.monotonic() > deadline:
                return status, str(row.get("status-details", ""))
            time.sleep(0.5)

    def _run_config(self, settings: RunSettings, signature: str) -> Path:
        settings = settings.replace(data_dir=str(settings.corpus_dir.resolve()),
                                    out_dir=str(settings.out_dir_path), fab_signature=signature)
        path = self.folder / "run-config.toml"
        path.write_text(tomli_w.dumps(settings.to_run_config()))
        return path


def snapshot_app(app_dir: Path, folder: Path) -> Path:
    """The files of the bundle `flwr run app_dir` would send, written to ``folder``."""
    with zipfile.ZipFile(io.BytesIO(build_app(app_dir))) as bundle:
        for name in bundle.namelist():
            if not name.startswith(".info/") and not name.endswith("/"):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(bundle.read(name))
    return folder


def device_folders(settings: RunSettings, folder: Path) -> list[Path]:
    """One folder per client, holding (as links) the utterances of its simulation shard.

    Lets a loopback deployment train on exactly the shards a simulation would use,
    while each SuperNode sees nothing but its own folder.
    """
    from fedspeaker.data.speakers import audio_split
    from fedspeaker.data.partition import shards_of

    train = audio_split(settings).train  # links only: files are decoded to check them, no features
    folders = []
    for i, shard in enumerate(shards_of(settings, [u.speaker for u in train])):
        device = folder / f"device-{i}"
        for utt in (train[j] for j in shard):
            link = device / utt.speaker / utt.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(utt.path.resolve())
        folders.append(device)
    return folders


def _tail(path: Path, lines: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]) if path.exists() else ""
