"""A real deployment on loopback: SuperLink + SuperNodes with TLS and authentication."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest

from fedspeaker.config import RunSettings
from fedspeaker.deploy.processes import Child, _process_table
from fedspeaker.reporting.run_report import read_rounds
from simulations.loopback import Device, LoopbackDeployment, device_folders

pytestmark = pytest.mark.e2e


def alive(children: list[Child]) -> list[int]:
    """PIDs, of these children or anything they started, still running."""
    pids = []
    for child in children:
        child.remember_descendants()
        pids += [pid for pid in (child.proc.pid, *child.seen) if child._alive(pid)]
    return pids


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_two_devices_train_over_tls_and_an_unregistered_device_is_refused(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=2, rounds=2, local_epochs=1, out_dir=str(tmp_path / "run"))
    own, other = device_folders(settings, tmp_path / "devices")
    devices = [Device("phone", own), Device("doorlock", other),
               Device("intruder", own, registered=False)]
    with LoopbackDeployment(tmp_path / "deployment", devices) as deployment:
        children = [deployment.link, *deployment.nodes.values()]
        ca = str(tmp_path / "deployment" / "certs" / "ca.crt")
        # the SuperLink speaks TLS only, with a certificate our CA signed for 127.0.0.1
        with socket.create_connection(("127.0.0.1", deployment.port)) as raw, \
                ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None
        plain = http.client.HTTPConnection("127.0.0.1", deployment.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/")
            plain.getresponse()

        out = deployment.run(settings, on_round=lambda line: None, timeout=300)

        intruder = deployment.nodes["intruder"]
        assert intruder.proc.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in deployment.log_path("intruder").read_text()
        assert len(deployment.online_nodes()) == 2  # the two registered devices only

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
    assert not listening(deployment.port)


def test_every_process_is_stopped_when_the_body_fails(tmp_path: Path) -> None:
    settings = RunSettings(num_clients=1, out_dir=str(tmp_path / "run"))
    (folder,) = device_folders(settings, tmp_path / "devices")
    with pytest.raises(RuntimeError, match="test failure"):
        with LoopbackDeployment(tmp_path / "deployment", [Device("phone", folder)]) as deployment:
            children = [deployment.link, *deployment.nodes.values()]
            raise RuntimeError("test failure")
    assert alive(children) == []
    assert not listening(deployment.port)


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
            for pid in _process_table():
                with contextlib.suppress(OSError):
                    if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
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
