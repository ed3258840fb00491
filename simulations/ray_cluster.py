"""A Ray cluster of several nodes on this machine, every one of them on 127.0.0.1.

For trying and testing `RAY_ADDRESS=... fedspeaker simulate` on one machine. A real
cluster is started with Ray's own `ray start` on each machine (docs/ray-cluster.md, "Beyond one
machine: a Ray cluster"). On one machine, plain `ray start` cannot stay on loopback: it
replaces 127.0.0.1 by the machine's outward address (so that other machines could
reach it), and its GCS and raylets then listen on every interface; Ray's servers listen
on loopback only when a node's address is exactly 127.0.0.1. So each node here is Ray's
own `ray start --block` code with that one replacement turned off
(`python -m simulations.ray_cluster ray start ...`), run as a child process and stopped
by PID with everything it started; every process of the cluster also carries a marker
in its environment, and any left after the stop is named and killed by PID.

    python -m simulations.ray_cluster --nodes 2 --cpus-per-node 1   # Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fedspeaker.deploy.processes import Child, child_process, free_ports
from fedspeaker.errors import FedSpeakerError

HOST = "127.0.0.1"
MARKER = "FEDSPEAKER_RAY_CLUSTER"  # in the environment of every process of the cluster
STARTED = "Ray runtime started."  # what `ray start` prints once its node has joined
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; Ray's default is 30 % of memory
RAY_START = [sys.executable, "-m", "simulations.ray_cluster", "ray", "start"]


@dataclass
class LoopbackRayCluster:
    address: str  # host:port of the head's GCS: what RAY_ADDRESS names
    marker: str
    log_dir: Path
    nodes: dict[str, Child] = field(default_factory=dict)  # name -> its `ray start --block`

    def describe(self) -> dict:
        """Ray's own view, from the GCS: the nodes, and every actor with its node."""
        result = subprocess.run([sys.executable, "-m", "simulations.ray_cluster", "describe",
                                 "--address", self.address], capture_output=True, text=True,
                                timeout=120, env=_ray_env())
        if result.returncode != 0:
            raise FedSpeakerError(f"could not read the Ray cluster at {self.address}:\n"
                                  + result.stdout + result.stderr)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def pids(self) -> set[int]:
        for child in self.nodes.values():
            child.remember_descendants()
        return {pid for child in self.nodes.values() for pid in (child.proc.pid, *child.seen)}

    def stop(self) -> list[str]:
        """Stop every node, workers first, then the head, by PID; any process still
        carrying this cluster's marker afterwards is killed by PID and returned."""
        for name in reversed(list(self.nodes)):
            self.nodes[name].stop()
        return kill_marked(self.marker)


@contextlib.contextmanager
def loopback_ray_cluster(nodes: int = 2, cpus_per_node: int = 1, log_dir: Path | None = None,
                         port: int | None = None) -> Iterator[LoopbackRayCluster]:
    """A head (its GCS on 127.0.0.1:``port``, a free one by default) and ``nodes - 1``
    worker nodes on 127.0.0.1, each with ``cpus_per_node`` CPUs for Ray to schedule on;
    everything stopped by PID on exit, also on failure."""
    if nodes < 1 or cpus_per_node < 1:
        raise FedSpeakerError("a Ray cluster needs at least one node with at least one CPU")
    # short: Ray's Unix sockets live under it, and their paths are limited to 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    log_dir = Path(log_dir) if log_dir else temp_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    env = {**_ray_env(), MARKER: marker, "RAY_TMPDIR": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)  # a node is told its cluster on the command line
    # every port of every node drawn at once, so no two components are handed the same one
    spare = iter(free_ports(2 + 4 * nodes))
    port = port or next(spare)
    cluster = LoopbackRayCluster(address=f"{HOST}:{port}", marker=marker, log_dir=log_dir)
    common = ["--block", "--node-ip-address", HOST, "--num-cpus", str(cpus_per_node),
              "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
              "--min-worker-port", "0", "--max-worker-port", "0", "--temp-dir", str(temp_dir),
              "--disable-usage-stats"]
    try:
        with contextlib.ExitStack() as stack:
            for i in range(nodes):
                name = "head" if i == 0 else f"worker-{i}"
                role = (["--head", "--port", str(port), "--include-dashboard", "false",
                         "--ray-client-server-port", str(next(spare))] if i == 0
                        else ["--address", cluster.address])
                agent_ports = ["--dashboard-agent-listen-port", str(next(spare)),
                               "--dashboard-agent-grpc-port", str(next(spare)),
                               "--runtime-env-agent-port", str(next(spare)),
                               "--metrics-export-port", str(next(spare))]
                log_path = log_dir / f"ray-{name}.log"
                log_file = stack.enter_context(open(log_path, "w"))
                child = stack.enter_context(child_process(
                    [*RAY_START, *role, *common, "--node-name", name, *agent_ports], env, log_file))
                cluster.nodes[name] = child
                _wait_for_line(log_path, STARTED, child, f"the Ray {name} node")
            try:
                yield cluster
            finally:
                cluster.stop()  # workers first; the ExitStack then finds them all stopped
    finally:
        leftovers = kill_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if leftovers:
            print("killed processes of the Ray cluster left running:\n  " + "\n  ".join(leftovers),
                  file=sys.stderr)


def kill_marked(marker: str) -> list[str]:
    """Kill, by PID, every process whose environment carries this cluster's marker."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {cmd[:160]}")
                os.kill(int(entry.name), signal.SIGKILL)
    return found


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _wait_for_line(path: Path, text: str, child: Child, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if child.poll() is not None:
            break
        time.sleep(0.5)
    tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-20:])
    state = (f"exited (code {child.proc.returncode})" if child.proc.poll() is not None
             else f"did not start in {timeout:.0f} s")
    raise FedSpeakerError(f"{what} {state}; the end of {path}:\n{tail}")


def _take_loopback_literally() -> None:
    """Ray's CLI and ray.init() replace 127.0.0.1 by the machine's outward address (on
    Linux, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which in turn refuses worker
    nodes); keep it, so the node's address is 127.0.0.1 and Ray listens there only."""
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host


def _ray_cli(argv: list[str]) -> None:
    """Ray's own command line (`ray start ...`), with 127.0.0.1 kept as given."""
    _take_loopback_literally()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv]
    ray_main()


def _describe(address: str) -> dict:
    """Nodes and actors as the GCS records them (also actors that have ended), read
    without joining the cluster as a driver."""
    _take_loopback_literally()
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(
        address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
    nodes = [{"node_id": n["NodeID"], "name": n.get("NodeName", ""), "address": n["NodeManagerAddress"],
              "alive": bool(n["Alive"]), "cpus": n.get("Resources", {}).get("CPU", 0)}
             for n in state.node_table()]
    actors = [{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "state": a["State"],
               "pid": a.get("Pid", 0)} for a in state.actor_table(None).values()]
    return {"nodes": nodes, "actors": actors}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ray"]:
        _ray_cli(argv[1:])
        return 0
    if argv[:1] == ["describe"]:
        parser = argparse.ArgumentParser(prog="python -m simulations.ray_cluster describe")
        parser.add_argument("--address", required=True)
        print(json.dumps(_describe(parser.parse_args(argv[1:]).address)))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m simulations.ray_cluster",
        description="A Ray cluster of several nodes on 127.0.0.1, for RAY_ADDRESS=... "
                    "fedspeaker simulate; Ctrl-C stops every process of it, by PID.")
    parser.add_argument("--nodes", type=int, default=2, help="the head and the worker nodes (2)")
    parser.add_argument("--cpus-per-node", type=int, default=1,
                        help="CPUs each node offers Ray: one simulated client each (1)")
    parser.add_argument("--port", type=int, default=None,
                        help="the head's GCS port, what RAY_ADDRESS names (a free one)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where each node's `ray start` writes its output (a temporary folder)")
    args = parser.parse_args(argv)
    stop = []

    def on_signal(signum, _frame):
        stop.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    started = time.monotonic()
    try:
        with loopback_ray_cluster(args.nodes, args.cpus_per_node, args.log_dir, args.port) as cluster:
            described = cluster.describe()
            alive = [n for n in described["nodes"] if n["alive"]]
            print(f"Ray cluster on {HOST}: {len(alive)} nodes, "
                  f"{sum(n['cpus'] for n in alive):g} CPUs, up in {time.monotonic() - started:.1f} s")
            for node in alive:
                print(f"  {node['name']:10s} {node['address']}  {node['cpus']:g} CPU  {node['node_id'][:12]}")
            print(f"\nRAY_ADDRESS={cluster.address}\n\nCtrl-C stops the cluster.", flush=True)
            while not stop:
                time.sleep(0.5)
                if any(child.poll() is not None for child in cluster.nodes.values()):
                    print("a node of the cluster exited; stopping the others", file=sys.stderr)
                    return 1
    except FedSpeakerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
