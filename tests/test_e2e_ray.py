"""The Simulation Engine on an existing Ray cluster, joined through Ray's own RAY_ADDRESS:
a two-node cluster on 127.0.0.1 (simulations/ray_cluster.py), a small federation on it,
and nothing left running afterwards."""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedspeaker.deploy.processes import Child, _is_zombie, _process_table
from fedspeaker.errors import FedSpeakerError
from simulations.launch import federation_config, ray_cluster_address
from simulations.ray_cluster import MARKER, kill_marked, loopback_ray_cluster

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "dspspeech20-mini"


def test_on_a_cluster_the_engine_gets_no_init_args_cpus_or_gpus() -> None:
    assert "init-args-num-cpus" in federation_config(3)
    on_cluster = federation_config(3, "127.0.0.1:6379")
    assert "init-args" not in on_cluster  # ray.init() refuses num_cpus/num_gpus when joining
    assert "num-supernodes=3" in on_cluster and "client-resources-num-cpus=1" in on_cluster


def test_ray_address_is_read_from_the_environment_and_checked(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    with pytest.raises(FedSpeakerError, match="Ray Client"):
        ray_cluster_address()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert ray_cluster_address() == address
    monkeypatch.setenv("RAY_ADDRESS", address)  # nothing listens there any more
    with pytest.raises(FedSpeakerError, match="no Ray cluster answers"):
        ray_cluster_address()


@pytest.fixture()
def tiny_corpus(tmp_path: Path) -> Path:
    """8 real speakers x 8 utterances: 6 training speakers, 2 unseen."""
    root = tmp_path / "corpus"
    for spk in sorted(p for p in BUNDLED.iterdir() if p.is_dir())[:8]:
        (root / spk.name).mkdir(parents=True)
        for f in sorted(spk.glob("*.flac"))[:8]:
            shutil.copy(f, root / spk.name / f.name)
    return root


@pytest.mark.e2e
@pytest.mark.ray
def test_a_federation_on_a_two_node_ray_cluster_completes_on_both_nodes_and_leaves_nothing_running(
        tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    started: dict[int, str] = {}  # every process seen: pid -> its start time
    wrong_listeners: set[str] = set()
    with loopback_ray_cluster(nodes=2, cpus_per_node=1, log_dir=tmp_path / "ray") as cluster:
        marker = cluster.marker
        gcs_port = int(cluster.address.rpartition(":")[2])
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        env.pop(MARKER, None)
        cmd = [sys.executable, "-m", "fedspeaker.cli", "simulate", "--data-dir", str(tiny_corpus),
               "--clients", "2", "--rounds", "1", "--partition", "iid", "--no-dp", "--out", str(out),
               "--set", f"cache-dir={tmp_path / 'cache'}"]
        began = time.monotonic()
        with open(tmp_path / "simulate.log", "w") as log:
            run = Child(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True))
            try:
                while run.poll() is None and time.monotonic() - began < 600:
                    pids = cluster.pids() | {run.proc.pid, *run.seen}
                    wrong_listeners |= _non_loopback_listeners(pids)
                    started.update(_start_times(pids))
                    time.sleep(1.0)
            finally:
                run.stop()
        started.update(_start_times(cluster.pids()))
        run_processes = {pid: _command(pid) for pid in run.seen}
        described = cluster.describe()
        leftovers = cluster.stop()

    output = (tmp_path / "simulate.log").read_text(errors="replace")
    assert run.proc.returncode == 0, output[-4000:] + _tail(out / "flower.log")
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    assert [int(float(r["round"])) for r in rows] == [0, 1]
    assert int(float(rows[1]["clients"])) == 2
    assert json.loads((out / "summary.json").read_text())["final"]["accuracy"] >= 0
    assert "clients run on the Ray cluster at RAY_ADDRESS=" in (out / "flower.log").read_text()

    # the run joined the cluster rather than starting a Ray of its own
    assert not [c for c in run_processes.values() if "gcs_server" in c or "raylet" in c], run_processes
    # Ray's view: two live nodes on 127.0.0.1, and the clients' actors placed on both
    nodes = [n for n in described["nodes"] if n["alive"]]
    assert len(nodes) == 2 and {n["address"] for n in nodes} == {"127.0.0.1"}, described["nodes"]
    client_nodes = {a["node_id"] for a in described["actors"] if a["class"] == "ClientAppActor"}
    assert client_nodes == {n["node_id"] for n in nodes}, described["actors"]

    assert not wrong_listeners, f"listening beyond 127.0.0.0/8: {sorted(wrong_listeners)}"
    # and nothing is left: no process of the cluster or of the run, none with the marker
    assert not leftovers, leftovers
    assert not kill_marked(marker)
    table = _process_table()
    alive = [f"{pid} (parent {table[pid][0]}): {_command(pid)}" for pid, start in started.items()
             if pid in table and table[pid][1] == start and not _is_zombie(pid)]
    assert not alive, alive
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gcs_port), 1).close()


def _start_times(pids: set[int]) -> dict[int, str]:
    table = _process_table()
    return {pid: table[pid][1] for pid in pids if pid in table}


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _non_loopback_listeners(pids: set[int]) -> set[str]:
    """TCP sockets these processes listen on outside 127.0.0.0/8 (and ::1)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    wrong = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
                ip = ipaddress.ip_address(raw)
                mapped = getattr(ip, "ipv4_mapped", None)
                if not (mapped or ip).is_loopback:
                    wrong.add(f"{mapped or ip}:{int(hex_port, 16)} ({_command(inodes[fields[9]])})")
    return wrong


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n" + "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
