"""A real deployment on loopback, as `fedspeaker superlink` / `supernode` set it up: the
SuperLink on 127.0.0.1 behind nginx (the public endpoint), SuperNodes with TLS and
authentication that run only apps the operator signed."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w

from fedspeaker.config import RunSettings
from fedspeaker.deploy.appsign import build_app, fab_digest, load_public_keys, sign_fab, verify_fab
from fedspeaker.deploy.certs import make_certificates, make_node_key
from fedspeaker.deploy.flower import BIN, flower_env
from fedspeaker.deploy.processes import Child, _process_table
from fedspeaker.reporting.run_report import read_rounds
from simulations.loopback import (APP_DIR, CONNECTION, Device, LoopbackDeployment, RunNotCompleted,
                                  device_folders)
from tests.conftest import nginx_or_skip

pytestmark = [pytest.mark.e2e, pytest.mark.deploy, pytest.mark.usefixtures("nginx", "shared_feature_cache")]


@pytest.fixture
def nginx() -> None:
    nginx_or_skip()


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture
def shared_feature_cache(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One feature cache (still not ~/.cache) for this module's deployments: the bundled
    corpus's features are computed once, not once per test."""
    monkeypatch.setenv("FEDSPEAKER_CACHE", str(module_cache))


def alive(children: list[Child]) -> list[int]:
    """PIDs, of these children or anything they started, still running."""
    pids = []
    for child in children:
        child.remember_descendants()
        pids += [pid for pid in (child.proc.pid, *child.seen) if child._alive(pid)]
    return pids


def unreaped(children: list[Child], wait: float = 10.0) -> list[str]:
    """Processes started by ``children`` (or by theirs) that finished but stay <defunct>
    (State: Z), after ``wait`` seconds for their parents to reap them: "PID name" each.
    (``children`` themselves are reaped by this process's own Popen.)"""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for child in children:
            child.remember_descendants()
            for pid in child.seen:
                with contextlib.suppress(OSError):
                    fields = dict(line.split(":\t", 1) for line in
                                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
                    if fields.get("State", "").startswith("Z"):
                        found.append(f"{pid} {fields.get('Name', '?')}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_two_devices_train_over_tls_and_an_unregistered_device_is_refused(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=2, rounds=2, local_epochs=1, out_dir=str(tmp_path / "run"))
    own, other = device_folders(settings, tmp_path / "devices")
    devices = [Device("phone", own), Device("doorlock", other),
               Device("intruder", own, registered=False)]
    with LoopbackDeployment(tmp_path / "deployment", devices) as deployment:
        children = deployment.children
        ports = (deployment.port, deployment.link_port)
        superexec = deployment.server["superexec"]
        out = deployment.run(settings, on_round=lambda line: superexec.remember_descendants(), timeout=900)

        intruder = deployment.nodes["intruder"]
        assert intruder.proc.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in deployment.log_path("intruder").read_text()
        assert len(deployment.online_nodes()) == 2  # the two registered devices only
        for name in ("phone", "doorlock"):  # each checked the app before running it
            assert "is signed by the operator" in deployment.device_log(name)
        # the finished ServerApp and ClientApps were reaped, not left <defunct> until the next run
        assert unreaped(children) == []
        assert deployment.server["superexec"].seen  # the ServerApp ran under fedspeaker's SuperExec

    rows = read_rounds(out / "rounds.csv")
    assert [r["round"] for r in rows] == [0, 1, 2]  # 0: the starting model
    rows = rows[1:]
    assert all(r["clients"] == 2 for r in rows)
    # Each round runs in a fresh ClientApp process, yet the device's DP ledger goes on
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"]
    assert all(r["client_startup_seconds"] > 0 and r["client_peak_rss_mb"] > 0 for r in rows)
    assert (out / "global_model.pt").exists()
    # Each device cached features of its own recordings only
    for name, folder in (("phone", own), ("doorlock", other)):
        cached = list((tmp_path / "deployment" / "state" / name).rglob("*.npy"))
        assert len(cached) == sum(1 for _ in folder.rglob("*.flac"))
    assert alive(children) == []
    assert not any(listening(port) for port in ports)


def test_every_process_is_stopped_when_the_body_fails(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=1, out_dir=str(tmp_path / "run"))
    (folder,) = device_folders(settings, tmp_path / "devices")
    with pytest.raises(RuntimeError, match="test failure"):
        with LoopbackDeployment(tmp_path / "deployment", [Device("phone", folder)]) as deployment:
            children = deployment.children
            assert len(children) == 5  # SuperLink, its SuperExec, nginx, the device's SuperNode and SuperExec
            raise RuntimeError("test failure")
    assert alive(children) == []
    assert not listening(deployment.port) and not listening(deployment.link_port)


def outsider(home: Path, address: str, **connection: object):
    """`flwr` as someone who can reach ``address`` and holds what the connection names."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "there", "there": {"address": address, **connection}}}))

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(home), text=True,
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return flwr


def post(port: int, path: str, context: ssl.SSLContext | None) -> tuple[int, str]:
    """A bodiless protobuf POST to 127.0.0.1:port; (status, body)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def one_byte_apart(app: Path, folder: Path, marker: Path) -> tuple[Path, Path]:
    """Two copies of ``app``, one byte apart: in the second, importing its ClientApp
    would create ``marker``."""
    copies = []
    for flag in (b"0", b"1"):
        copy = shutil.copytree(app, folder / f"app-{flag.decode()}")
        client = copy / "client" / "app.py"
        client.write_bytes(client.read_bytes().replace(
            b"from __future__ import annotations\n",
            b"from __future__ import annotations\n\nif " + flag + b": open(%r, 'w')\n" % str(marker).encode(), 1))
        copies.append(copy)
    return copies[0], copies[1]


def test_only_the_operator_controls_the_server_and_devices_run_only_the_signed_app(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=1, rounds=1, local_epochs=1, dp=False, out_dir=str(tmp_path / "run"))
    (folder,) = device_folders(settings, tmp_path / "devices")
    marker = tmp_path / "TAMPERED-APP-RAN"
    rogue = make_certificates(tmp_path / "rogue", ["localhost", "127.0.0.1"])  # a CA that is not ours
    with LoopbackDeployment(tmp_path / "deployment", [Device("phone", folder)]) as deployment:
        ca = deployment.certs.ca_cert
        public = f"127.0.0.1:{deployment.port}"
        # Someone with only ca.crt (every device has it), at the public endpoint: no
        # registering, listing or launching
        stranger = outsider(tmp_path / "stranger", public, **{"root-certificates": str(ca)})
        intruder_key = make_node_key(tmp_path / "keys" / "intruder")
        for args in (["supernode", "register", str(intruder_key)], ["supernode", "ls"], ["ls"],
                     ["run", str(APP_DIR)]):
            done = stranger(*args, "there")
            assert done.returncode != 0 and "404" in done.stdout + done.stderr, (args, done.stdout)
        context = ssl.create_default_context(cafile=str(ca))
        for path in ("/v1/control/list-runs", "/v1/runtime/acquire-task", "/docs",
                     "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/runtime/acquire-task"):
            status, body = post(deployment.port, path, context)
            assert status == 404 and "nginx" in body, (path, status)  # answered by nginx itself
        assert post(deployment.port, "/v1/fleet/get-run", context)[0] == 401  # Flower: node auth
        # plain HTTP and a client that trusts another CA get nothing from Flower
        status, body = post(deployment.port, "/v1/fleet/get-run", None)
        assert status == 400 and "plain HTTP" in body
        with pytest.raises(ssl.SSLCertVerificationError):
            post(deployment.port, "/v1/fleet/get-run", ssl.create_default_context(cafile=str(rogue.ca_cert)))
        done = outsider(tmp_path / "insecure", public, insecure=True)("ls", "there")
        assert done.returncode != 0

        # The operator, on the server: all of it
        nodes = json.loads(deployment.flwr("supernode", "ls", CONNECTION, "--format", "json"))["nodes"]
        assert len(nodes) == 1  # the stranger registered nothing
        deployment.flwr("supernode", "register", str(intruder_key), CONNECTION)
        assert len(json.loads(deployment.flwr("supernode", "ls", CONNECTION, "--format", "json"))["nodes"]) == 2
        deployment.flwr("ls", CONNECTION)

        # A run of an app one byte away from the signed one: refused on the device
        signed, tampered = one_byte_apart(deployment.app_dir, tmp_path / "apps", marker)
        signature = sign_fab(build_app(signed), deployment.app_key)
        verify_fab(build_app(signed), signature, load_public_keys(deployment.app_key.with_suffix(".pub")),
                   claimed_hash=fab_digest(build_app(signed)), fab_id="fedspeaker/fedspeaker",
                   fab_version="0.1.0")  # the signature is good for the app it was made for
        # The run fails, and says so where the operator looks: Flower's run status, the
        # ServerApp's log that `flwr run --stream` prints, the summary and the round rows
        with pytest.raises(RunNotCompleted) as failed:
            deployment.run(settings, on_round=lambda line: None, timeout=300, app_dir=tampered,
                           signature=signature)
        assert failed.value.status == "finished:failed"
        assert "RUN FAILED: no client trained in any of the 1 round(s)" in failed.value.details
        assert "app-refused" in failed.value.details
        streamed = deployment.log_path("flwr-run").read_text()
        assert "RUN FAILED" in streamed and "the device refused the app" in streamed
        assert "APP REFUSED" in deployment.device_log("phone")
        outcome = json.loads((tmp_path / "run" / "summary.json").read_text())["outcome"]
        assert outcome["status"] == "failed" and outcome["rounds_trained"] == 0
        assert outcome["not_trained"] == {"app-refused": 1}
        assert "starting model" in outcome["released_model"]
        (_, trained_round) = read_rounds(tmp_path / "run" / "rounds.csv")
        assert trained_round["clients"] == 0 and trained_round["refused"] == 1
        assert deployment.stop_runs() == []  # nothing left running
        apps = deployment.device_home("phone") / "apps"
        assert not any(apps.glob(f"*.{fab_digest(build_app(tampered))[:8]}"))  # never installed
    assert not marker.exists()  # and none of its code ran


def test_a_serverapp_killed_on_the_superlink_resumes_where_it_stopped(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=2, rounds=3, local_epochs=1, strategy="fedadam",
                           out_dir=str(tmp_path / "run"))
    devices = [Device(f"device-{i}", d) for i, d in enumerate(device_folders(settings, tmp_path / "devices"))]
    rounds_csv = tmp_path / "run" / "rounds.csv"

    class ServerKilled(Exception):
        pass

    def kill_the_server_after_round_one(line: str) -> None:
        if line.startswith("round   1"):
            killed = []
            superexec = deployment.server["superexec"]  # only this deployment's ServerApp, by PID
            superexec.remember_descendants()
            for pid, started in superexec.seen.items():
                with contextlib.suppress(OSError):
                    if (_process_table().get(pid, (0, ""))[1] == started
                            and b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            assert killed, "no flwr-serverapp process"
            # the SuperLink notices a dead ServerApp only after a minute: stop waiting now
            raise ServerKilled

    with LoopbackDeployment(tmp_path / "deployment", devices) as deployment:
        with pytest.raises(ServerKilled):
            deployment.run(settings, on_round=kill_the_server_after_round_one, timeout=300)
        assert len(deployment.stop_runs()) == 1  # what an operator does, rather than wait
        done = len(read_rounds(rounds_csv)) - 1  # round 0 is the starting model
        assert 1 <= done < 3
        deployment.run(settings.replace(resume=True), on_round=lambda line: None, timeout=300)
    rows = read_rounds(rounds_csv)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    eps = [r["epsilon_max"] for r in rows[1:]]
    assert eps[0] < eps[1] < eps[2]  # the devices' ledgers went on across the two Flower runs
