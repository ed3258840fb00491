"""Secrets are never lost: certs and keys are not replaced without --force, and with it the
old ones are kept; a SuperNode that stops says the likely cause and passes its status on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedspeaker.cli.main import main as cli_main
from fedspeaker.cli.deploy import _supervise, supernode_hint
from fedspeaker.deploy.flower import SuperNodeOptions
from fedspeaker.deploy.processes import child_process
from fedspeaker.errors import FedSpeakerError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> int:
    return cli_main(list(argv))


def test_certs_twice_keeps_the_ca_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "certs"
    assert run_cli("certs", "--out", str(out), "--operator") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_cli("certs", "--out", str(out), "--operator") != 0
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_certs_force_keeps_the_old_ones_dated(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert run_cli("certs", "--out", str(out)) == 0
    old_ca = (out / "ca.crt").read_bytes()
    assert run_cli("certs", "--out", str(out), "--force") == 0
    assert (out / "ca.crt").read_bytes() != old_ca
    kept, = out.glob("replaced-*")
    assert (kept / "ca.crt").read_bytes() == old_ca
    assert (kept / "ca.key").stat().st_mode & 0o777 == 0o600 and kept.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("command", ["node-key", "app-key"])
def test_keys_are_not_replaced_without_force(tmp_path: Path, command: str) -> None:
    key = tmp_path / "keys" / "k"
    assert run_cli(command, str(key)) == 0
    private, public = key.read_bytes(), Path(f"{key}.pub").read_bytes()
    assert run_cli(command, str(key)) != 0
    assert key.read_bytes() == private
    assert run_cli(command, str(key), "--force") == 0
    kept, = key.parent.glob("replaced-*")
    assert (kept / "k").read_bytes() == private and (kept / "k.pub").read_bytes() == public
    assert key.read_bytes() != private


def test_every_secrets_folder_of_the_readme_is_ignored_by_git() -> None:
    for folder in ("certs", "keys", "opcerts", "devices"):
        probe = f"{folder}/secret.key"
        assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode == 0, folder


def node_options(key: Path | None) -> SuperNodeOptions:
    return SuperNodeOptions(superlink="127.0.0.1:9092", data_dir=Path("devices/device-0"),
                            ca_cert=Path("certs/ca.crt"), key=key, app_keys=None)


def test_a_stopped_supernode_names_the_unregistered_key() -> None:
    hint = supernode_hint(node_options(Path("keys/phone")), "127.0.0.1:9092", "supernode", 1)
    assert "not registered" in hint and "flwr supernode register phone.pub" in hint
    assert supernode_hint(node_options(Path("keys/phone")), "x:1", "supernode", 0) is None
    assert "ca.crt" in supernode_hint(node_options(None), "x:1", "supernode", 1)


@pytest.mark.parametrize("status", [0, 1, 3])
def test_supervise_passes_the_status_through(status: int, capsys: pytest.CaptureFixture) -> None:
    cmd = [sys.executable, "-c", f"import sys; sys.exit({status})"]

    def start(stack):
        return {"supernode": stack.enter_context(child_process(cmd, dict(os.environ), None))}

    code = _supervise(start, ["up"], explain=lambda name, code: f"hint for {name} {code}" if code else None)
    assert code == status
    assert ("hint for supernode" in capsys.readouterr().err) == bool(status)


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    from fedspeaker.deploy.certs import keep_old

    with pytest.raises(FedSpeakerError, match="already exists"):
        (tmp_path / "a").write_text("x")
        keep_old([tmp_path / "a", tmp_path / "b"], force=False, what="key")


def test_finished_clientapps_are_reaped(tmp_path: Path) -> None:
    """A process started with a Popen that is dropped (as Flower's SuperExec starts each
    ClientApp) does not stay <defunct> once the reaper runs."""
    import gc
    import time

    from fedspeaker.deploy.superexec import reap_finished_children

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = proc.pid
    del proc
    gc.collect()  # the Popen is gone; CPython keeps it in subprocess._active, unreaped
    reap_finished_children(interval=0.1)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the finished child is still <defunct>"
