"""Child processes that are stopped, with everything they started, by PID.

Flower detaches SuperExec into its own session and Ray starts daemons, so neither a
process group nor a parent's exit reaches them all: the simulation launcher, the
loopback deployment and the tests all stop their processes through `Child`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Iterator

from fedspeaker.errors import FedSpeakerError


@contextlib.contextmanager
def child_process(cmd: list[str], env: dict[str, str], log_file: IO | int | None) -> Iterator["Child"]:
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


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1.

    All sockets stay bound until every port is chosen: asking one at a time can hand out
    the same port twice, and Ray refuses a node whose components share a port.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for_port(port: int, child: Child, name: str = "the Flower SuperLink",
                  timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    """Until ``child`` listens on host:port (a wildcard host is reached on 127.0.0.1)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise FedSpeakerError(f"{name} exited at start (code {child.proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.2)
    raise FedSpeakerError(f"{name} did not listen on {host}:{port} in {timeout:.0f} s")


def wait_for_any(children: dict[str, Child], poll: float = 0.5) -> str:
    """Block until one of ``children`` exits; its name. A supervisor stops the rest."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                return name
        time.sleep(poll)
