"""The Flower Deployment Engine commands for a SuperLink and for a device's SuperNode.

`fedspeaker superlink` and `fedspeaker supernode` print and then exec Flower's own
`flower-superlink` / `flower-supernode`, with TLS and SuperNode authentication on
unless `--insecure` is asked for. The loopback deployment (simulations/loopback.py)
builds its processes from the same functions, so what CI tests is what users run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fedspeaker.deploy.certs import CertificatePaths
from fedspeaker.errors import FedSpeakerError

BIN = Path(sys.executable).parent
DEFAULT_PORT = 9093

INSECURE_WARNING = (
    "WARNING: --insecure: traffic between SuperLink and SuperNodes is NOT encrypted and "
    "SuperNodes are NOT authenticated, so anyone who can reach the port can join the "
    "federation and read the model. Use it only on a trusted network, for testing.")


def flower_env(home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's processes: no update check, no `uv sync` at run time,
    our venv's executables first (SuperExec starts flwr-serverapp / flwr-clientapp)."""
    env = {
        **os.environ,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


@dataclass(frozen=True)
class SuperLinkOptions:
    certs: Path | None  # folder made by `fedspeaker certs`; None only with insecure
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database: Path | None = None  # Flower keeps runs and registered nodes here
    insecure: bool = False

    def command(self) -> list[str]:
        cmd = [str(BIN / "flower-superlink"), "--isolation", "subprocess",
               "--disable-runtime-dependency-installation",
               "--host", self.host, "--port", str(self.port)]
        if self.database:
            cmd += ["--database", str(self.database)]
        if self.insecure:
            return cmd + ["--insecure"]
        if self.certs is None:
            raise FedSpeakerError("the SuperLink needs --certs DIR (from `fedspeaker certs`), "
                                  "or --insecure for a test on a trusted network")
        paths = CertificatePaths(self.certs)
        paths.require_server_files()
        return cmd + ["--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.server_cert),
                      "--ssl-keyfile", str(paths.server_key), "--enable-supernode-auth"]


@dataclass(frozen=True)
class SuperNodeOptions:
    superlink: str  # host:port the SuperNode dials
    data_dir: Path  # this device's own recordings: <speaker>/<utterance>.{wav,flac}
    ca_cert: Path | None = None  # the CA that signed the SuperLink's certificate
    key: Path | None = None  # this device's private key (its .pub is registered on the server)
    state_dir: Path | None = None  # privacy ledger and feature cache, kept across runs
    port: int = 9094  # the SuperNode's own loopback API for its ClientApp processes
    insecure: bool = False
    max_retries: int | None = None

    def command(self) -> list[str]:
        if not self.data_dir.is_dir():
            raise FedSpeakerError(f"{self.data_dir}: no such folder (this device's recordings, "
                                  "one subfolder per speaker)")
        # one state folder per SuperNode on a machine: they cannot share a port
        state_dir = self.state_dir or Path.home() / ".cache" / "fedspeaker" / f"supernode-{self.port}"
        node_config = (f"data-dir={_toml_string(self.data_dir.resolve())} "
                       f"state-dir={_toml_string(state_dir.expanduser().resolve())}")
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.superlink,
               "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
               "--node-config", node_config]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.insecure:
            return cmd + ["--insecure"]
        for path, what in ((self.ca_cert, "--ca (the CA certificate, ca.crt)"),
                           (self.key, "--key (this device's private key, from `fedspeaker node-key`)")):
            if path is None or not path.is_file():
                raise FedSpeakerError(f"the SuperNode needs {what}"
                                      + (f"; {path} not found" if path else "")
                                      + ", or --insecure for a test on a trusted network")
        return cmd + ["--root-certificates", str(self.ca_cert),
                      "--auth-supernode-private-key", str(self.key)]


def _toml_string(path: Path) -> str:
    """Flower parses --node-config values as TOML."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
