"""A device's ClientApp runner that runs an app only if the operator signed it.

It is Flower's own `flwr-clientapp` (the same command line, the same
``run_clientapp``) with one step added: after the runner has pulled the task (message,
context, run, app bundle) from the SuperNode and before it installs the bundle, the
bundle must carry the operator's signature (fedspeaker/deploy/appsign.py) in its run
config. Nothing of the app is written to disk or imported before that. A refused app
ends the task through Flower's own error path: a clear log line here, an error reply
to the server for this device.

The device's SuperExec (fedspeaker/deploy/superexec.py) starts this for every ClientApp
through a launcher that names the operator's public key(s), so a SuperNode started by
`fedspeaker supernode` cannot leave the check out.

    python -P -m fedspeaker.deploy.apprunner --app-keys operator.pub <flwr-clientapp arguments>
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shlex
import sys
import zipfile
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, Callable

from fedspeaker.deploy.appsign import SIGNATURE_KEY, AppVerificationError, load_public_keys, verify_fab
from fedspeaker.deploy.certs import write_file
from fedspeaker.errors import FedSpeakerError

# the functions of Flower's runner this wraps; if it stops calling them, nothing runs
WRAPPED = ("pull_task_input", "install_from_fab")


def write_launcher(path: Path, *, app_keys: Path) -> Path:
    """The executable SuperExec starts for each ClientApp (it takes one program path):
    this runner, with this interpreter and the operator's key(s) fixed."""
    command = [sys.executable, "-P", "-m", __name__, "--app-keys", str(app_keys.resolve())]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, ("#!/bin/sh\n# written by `fedspeaker supernode`: every ClientApp on this "
                      "device runs only if the operator signed its app\n"
                      f'exec {shlex.join(command)} "$@"\n').encode(), private=True)
    path.chmod(0o700)
    return path


class AppCheck:
    """Wraps Flower's pull_task_input (to see the task's run and context) and
    install_from_fab (to check the bundle before it is installed)."""

    def __init__(self, keys: list, pull: Callable, install: Callable) -> None:
        self.keys, self._pull, self._install = keys, pull, install
        self.task: dict[str, Any] = {}

    def pull_task_input(self, *args: Any, **kwargs: Any) -> tuple:
        message, context, run, fab = self._pull(*args, **kwargs)
        self.task = {"context": context, "run": run, "fab": fab}
        return message, context, run, fab

    def install_from_fab(self, fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        run, fab, context = self.task.get("run"), self.task.get("fab"), self.task.get("context")
        try:
            if run is None or fab is None or fab.content is not fab_content:
                raise AppVerificationError("the bundle to install is not the task's bundle")
            digest = verify_fab(fab_content, str(context.run_config.get(SIGNATURE_KEY, "")), self.keys,
                                claimed_hash=fab.hash_str, fab_id=run.fab_id, fab_version=run.fab_version)
            if run.fab_hash and run.fab_hash != digest:
                raise AppVerificationError(f"the run names app bundle {run.fab_hash[:12]}, "
                                           f"the task carries {digest[:12]}")
            _check_installed_copy(fab_content, run.fab_id, run.fab_version, digest)
        except AppVerificationError as exc:
            _log(ERROR, "APP REFUSED: app %s %s of run %s is not one the operator signed; "
                 "none of its code runs here: %s", getattr(run, "fab_id", "?"),
                 getattr(run, "fab_version", "?"), getattr(run, "run_id", "?"), exc)
            raise
        _log(INFO, "App verified: %s %s (bundle sha256 %s) is signed by the operator",
             run.fab_id, run.fab_version, digest)
        result = self._install(fab_content, *args, **kwargs)
        _forget_own_modules()
        return result


def _check_installed_copy(fab: bytes, fab_id: str, fab_version: str, digest: str) -> None:
    """Flower reuses an installed app folder, named by the first 8 hex digits of the
    hash, without looking inside; if one is there, it must hold the signed files."""
    from flwr.common.config import get_project_dir

    folder = Path(get_project_dir(fab_id, fab_version, digest))
    if not folder.exists():
        return
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        expected = {name: hashlib.sha256(bundle.read(name)).hexdigest() for name in bundle.namelist()
                    if not name.endswith("/") and not name.startswith(".info/")}  # Flower drops .info
    found = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    if found != expected:
        raise AppVerificationError(f"the installed copy in {folder} differs from the signed bundle")


def _forget_own_modules() -> None:
    """Let the app import its own copy of the `fedspeaker` package from its bundle (as
    Flower's plain runner would), not the one this runner was imported from."""
    for name in [m for m in sys.modules if m == "fedspeaker" or m.startswith("fedspeaker.")]:
        del sys.modules[name]


def _log(level: int, msg: str, *args: Any) -> None:
    from flwr.supercore import log

    log(level, msg, *args)


def install(keys: list) -> None:
    """Put the check into Flower's runner; refuse if the runner no longer calls what it wraps."""
    from flwr.supernode.runtime import run_clientapp as runner

    called = set(runner.run_clientapp.__code__.co_names)
    if not set(WRAPPED) <= called or not all(hasattr(runner, name) for name in WRAPPED):
        raise FedSpeakerError("this Flower version's ClientApp runner no longer calls "
                              f"{' and '.join(WRAPPED)}, so the app check cannot run; refusing "
                              "every app (update fedspeaker/deploy/apprunner.py)")
    check = AppCheck(keys, runner.pull_task_input, runner.install_from_fab)
    runner.pull_task_input = check.pull_task_input
    runner.install_from_fab = check.install_from_fab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flower's flwr-clientapp, running only apps "
                                     "the operator signed", add_help=False)
    parser.add_argument("--app-keys", required=True, type=Path,
                        help="the operator's ed25519 public key(s), one per line")
    args, flower_args = parser.parse_known_args(argv)
    try:
        install(load_public_keys(args.app_keys))
    except FedSpeakerError as exc:
        _log(ERROR, "APP REFUSED: %s", exc)
        return 1
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = [sys.argv[0], *flower_args]
    flwr_clientapp()
    return 0


if __name__ == "__main__":
    sys.exit(main())
