"""Flower's Deployment Engine commands: a SuperLink on 127.0.0.1, and a device's SuperNode.

The SuperLink listens on 127.0.0.1 only, with TLS and SuperNode authentication (devices
reach it through the public endpoint, fedspeaker/deploy/proxy.py), in Flower's
``process`` isolation mode beside fedspeaker's SuperExec, which starts ServerApps and
reaps them when they finish (Flower's own left them <defunct> until the next run). A SuperNode runs in
Flower's ``process`` isolation mode beside fedspeaker's own SuperExec
(fedspeaker/deploy/superexec.py), which starts every ClientApp through the runner that
checks the operator's signature (fedspeaker/deploy/apprunner.py); the two share a
secret, so nothing else on the device can take the SuperNode's tasks. `--insecure`
turns TLS and authentication off, for a trusted test network. `fedspeaker superlink` /
`supernode` and the loopback deployment (simulations/loopback.py) build their processes
from these classes, so what CI tests is what users run.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from fedspeaker.deploy.apprunner import write_launcher
from fedspeaker.deploy.certs import CertificatePaths, write_file
from fedspeaker.errors import FedSpeakerError

BIN = Path(sys.executable).parent
DEFAULT_PORT = 9093  # the public endpoint devices dial
LINK_PORT = 9092  # the SuperLink itself, on 127.0.0.1
NODE_PORT = 9094  # a SuperNode's loopback API for its SuperExec and ClientApps

INSECURE_WARNING = (
    "WARNING: --insecure: traffic between SuperLink and SuperNodes is NOT encrypted, "
    "SuperNodes are NOT authenticated, and anyone who can reach the SuperLink's port can "
    "register devices and launch runs, whose code then runs on the server and the devices. "
    "Use it only on a trusted network, for testing.")
UNCHECKED_APPS_WARNING = (
    "WARNING: no --app-key: this SuperNode runs any app a run sends it, unchecked.")


def flower_env(home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's processes: no update check, no telemetry, no `uv sync`
    at run time, our venv's executables first (SuperExec starts flwr-serverapp)."""
    env = {
        **os.environ,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


@dataclass(frozen=True, kw_only=True)
class SuperLinkOptions:
    certs: Path | None  # folder made by `fedspeaker certs`; None only with insecure
    port: int = LINK_PORT
    database: Path | None = None  # Flower keeps runs and registered nodes here
    insecure: bool = False
    host: str = "127.0.0.1"  # anything but loopback only with insecure
    # with it (not insecure), ServerApps are started by superexec_command(), which shares
    # this secret; without it, by the SuperExec Flower's SuperLink starts by itself
    superexec_secret: Path | None = None

    @property
    def own_superexec(self) -> bool:
        return self.superexec_secret is not None and not self.insecure

    def command(self) -> list[str]:
        isolation = (["--isolation", "process", "--superexec-auth-secret-file", str(self.superexec_secret)]
                     if self.own_superexec else ["--isolation", "subprocess"])
        cmd = [str(BIN / "flower-superlink"), *isolation, "--disable-runtime-dependency-installation",
               "--host", self.host, "--port", str(self.port)]
        if self.database:
            cmd += ["--database", str(self.database)]
        if self.insecure:
            return cmd + ["--insecure"]
        if self.certs is None:
            raise FedSpeakerError("the SuperLink needs --certs DIR (from `fedspeaker certs`), "
                                  "or --insecure for a test on a trusted network")
        if not _is_loopback(self.host):
            raise FedSpeakerError(f"the SuperLink listens on loopback only (not {self.host}): its "
                                  "Control and Runtime APIs authenticate no one; devices reach it "
                                  "through the public endpoint")
        paths = CertificatePaths(self.certs)
        paths.require_server_files()
        return cmd + ["--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.server_cert),
                      "--ssl-keyfile", str(paths.server_key), "--enable-supernode-auth"]

    def superexec_command(self, superlink_pid: int) -> list[str]:
        """fedspeaker's SuperExec beside the SuperLink: it starts ServerApps (Flower's
        flwr-serverapp, over TLS to the SuperLink's loopback port) and reaps them."""
        if not self.own_superexec or self.certs is None:
            raise FedSpeakerError("fedspeaker's SuperExec runs beside a SuperLink with TLS and a "
                                  "SuperExec secret only")
        return [sys.executable, "-P", "-m", "fedspeaker.deploy.superexec", "--serverapp",
                "--runtime-api-address", f"127.0.0.1:{self.port}",
                "--root-certificates", str(CertificatePaths(self.certs).ca_cert),
                "--superexec-auth-secret-file", str(self.superexec_secret), "--parent-pid", str(superlink_pid)]

    def prepare(self) -> None:
        """Before starting: a fresh SuperExec secret, owner-only."""
        if self.own_superexec:
            self.superexec_secret.parent.mkdir(parents=True, exist_ok=True)
            write_file(self.superexec_secret, secrets.token_bytes(32), private=True)


@dataclass(frozen=True, kw_only=True)
class SuperNodeOptions:
    superlink: str  # host:port the SuperNode dials: the server's public endpoint
    data_dir: Path  # this device's own recordings: <speaker>/<utterance>.{wav,flac}
    ca_cert: Path | None = None  # the CA that signed the public endpoint's certificate
    key: Path | None = None  # this device's private key (its .pub is registered on the server)
    app_keys: Path | None = None  # the operator's app-signing public key(s): only their apps run
    state_dir: Path | None = None  # privacy ledger and feature cache, kept across runs
    port: int = NODE_PORT  # the SuperNode's own loopback API for its SuperExec and ClientApps
    insecure: bool = False
    max_retries: int | None = None

    @property
    def state(self) -> Path:
        # one state folder per SuperNode on a machine: they cannot share a port
        return (self.state_dir or Path.home() / ".cache" / "fedspeaker" / f"supernode-{self.port}") \
            .expanduser().resolve()

    @property
    def checks_apps(self) -> bool:
        return self.app_keys is not None

    def command(self) -> list[str]:
        """flower-supernode; with an app key it runs in process isolation beside
        superexec_command(), else (insecure only) with Flower's own SuperExec."""
        if not self.data_dir.is_dir():
            raise FedSpeakerError(f"{self.data_dir}: no such folder (this device's recordings, "
                                  "one subfolder per speaker)")
        node_config = (f"data-dir={_toml_string(self.data_dir.resolve())} "
                       f"state-dir={_toml_string(self.state)}")
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.superlink,
               "--host", "127.0.0.1", "--port", str(self.port), "--node-config", node_config]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.checks_apps:
            self._require(self.app_keys, "--app-key (the operator's app-signing public key, "
                          "from `fedspeaker app-key`)", or_insecure=False)
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(self.secret_file)]
        elif not self.insecure:
            raise FedSpeakerError("the SuperNode needs --app-key (the operator's app-signing public "
                                  "key, from `fedspeaker app-key`): without it any app a run sends "
                                  "would run on this device")
        else:
            cmd += ["--isolation", "subprocess"]
        if self.insecure:
            return cmd + ["--insecure"]
        self._require(self.ca_cert, "--ca (the CA certificate, ca.crt)")
        self._require(self.key, "--key (this device's private key, from `fedspeaker node-key`)")
        return cmd + ["--root-certificates", str(self.ca_cert),
                      "--auth-supernode-private-key", str(self.key)]

    def superexec_command(self, supernode_pid: int) -> list[str]:
        """fedspeaker's SuperExec beside the SuperNode: it starts only checked ClientApps."""
        return [sys.executable, "-P", "-m", "fedspeaker.deploy.superexec",
                "--clientapp", str(self.launcher), "--runtime-api-address", f"127.0.0.1:{self.port}",
                "--insecure", "--superexec-auth-secret-file", str(self.secret_file),
                "--parent-pid", str(supernode_pid)]

    @property
    def secret_file(self) -> Path:
        return self.state / "superexec.secret"

    @property
    def launcher(self) -> Path:
        return self.state / "fedspeaker-clientapp"

    def prepare(self) -> None:
        """Before starting: a fresh SuperExec secret and the checking runner's launcher,
        both owner-only, in the state folder."""
        if not self.checks_apps:
            return
        self.state.mkdir(parents=True, exist_ok=True)
        write_file(self.secret_file, secrets.token_bytes(32), private=True)
        write_launcher(self.launcher, app_keys=self.app_keys)

    def _require(self, path: Path | None, what: str, *, or_insecure: bool = True) -> None:
        if path is None or not path.is_file():
            raise FedSpeakerError(f"the SuperNode needs {what}"
                                  + (f"; {path} not found" if path else "")
                                  + (", or --insecure for a test on a trusted network" if or_insecure else ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml_string(path: Path) -> str:
    """Flower parses --node-config values as TOML."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
