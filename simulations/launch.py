"""Run a whole federation on this machine through Flower's Simulation Engine.

The same path as ``flwr run .``: a SuperLink in simulation mode (Ray behind it) takes
the app and its run config. Here the SuperLink is our own child, on free loopback
ports, with its own FLWR_HOME, and it is stopped (with Ray) when the run ends,
whichever way it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import tomli_w

from fedspeaker.config import RunSettings
from fedspeaker.errors import FedSpeakerError
from fedspeaker.report import progress_line, read_rounds

APP_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_federation(settings: RunSettings, on_round: Callable[[str], None] = print) -> None:
    """Run the federation; the ServerApp writes results into ``settings.out_dir``."""
    # Flower runs a copy of the app code: give it absolute paths, resolved here
    settings = settings.replace(data_dir=str(settings.corpus_dir.resolve()),
                                out_dir=str(settings.out_dir_path))
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "flower.log"
    with tempfile.TemporaryDirectory(prefix="fedspeaker-flwr-") as home, \
            open(log_path, "w") as log_file, \
            _superlink(Path(home), log_file) as (env, link):
        overrides = Path(home) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(settings.to_run_config()))
        federation = (f"num-supernodes={settings.num_clients} client-resources-num-cpus=1 "
                      f"client-resources-num-gpus=0.0 init-args-num-cpus={os.cpu_count() or 1} "
                      "init-args-num-gpus=0")
        cmd = [str(BIN / "flwr"), "run", str(APP_DIR), "fedspeaker", "--run-config", str(overrides),
               "--federation-config", federation, "--stream"]
        with _process(cmd, env, log_file) as run:
            shown = 0
            while run.poll() is None and link.poll() is None:
                time.sleep(0.5)
                shown = _show_new_rounds(out_dir / "rounds.csv", shown, on_round)
            _show_new_rounds(out_dir / "rounds.csv", shown, on_round)
    if not (out_dir / "summary.json").exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise FedSpeakerError(f"the federation did not finish; the end of {log_path}:\n{tail}")


@contextlib.contextmanager
def _superlink(home: Path, log_file) -> Iterator[tuple[dict[str, str], "Child"]]:
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray's listeners on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec et al.
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedspeaker"\n\n[superlink.fedspeaker]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
           "--database", str(home / "state.db")]
    with _process(cmd, env, log_file) as link:
        _wait_for_port(port, link)
        yield env, link


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log_file) -> Iterator["Child"]:
    """A child process, stopped on exit together with every process it started."""
    child = Child(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True))
    try:
        yield child
    finally:
        child.stop()


class Child:
    """A Popen that remembers its descendants: Flower detaches SuperExec into its own
    session and Ray starts daemons, so neither a process group nor a parent's exit
    reaches them all. Remembered PIDs are stopped with the child, by PID.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.seen: dict[int, str] = {}  # pid -> start time, to never signal a reused PID

    def poll(self) -> int | None:
        self.remember_descendants()
        return self.proc.poll()

    def remember_descendants(self) -> None:
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.proc.pid]
        while stack:
            for pid in children.get(stack.pop(), []):
                self.seen.setdefault(pid, table[pid][1])
                stack.append(pid)

    def stop(self) -> None:
        self.remember_descendants()
        targets = [self.proc.pid, *self.seen]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [pid for pid in targets if self._alive(pid)]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(self._alive(p) for p in alive):
                self.proc.poll()  # reap our direct child
                time.sleep(0.1)
        self.proc.poll()

    def _alive(self, pid: int) -> bool:
        if pid == self.proc.pid:
            return self.proc.poll() is None
        entry = _process_table().get(pid)
        return entry is not None and entry[1] == self.seen.get(pid) and not _is_zombie(pid)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, link: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.poll() is not None:
            raise FedSpeakerError(f"the Flower SuperLink exited at start (code {link.proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise FedSpeakerError(f"the Flower SuperLink did not listen on 127.0.0.1:{port} in {timeout:.0f} s")


def _show_new_rounds(rounds_csv: Path, shown: int, on_round: Callable[[str], None]) -> int:
    if not rounds_csv.exists():
        return shown
    rows = read_rounds(rounds_csv)
    for row in rows[shown:]:
        on_round(progress_line(row))
    return max(shown, len(rows))

