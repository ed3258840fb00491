"""The SuperExec beside a SuperNode or the SuperLink: Flower's own `flower-superexec`,
starting one kind of task only, and reaping what it started.

`flower-supernode` / `flower-superlink --isolation process` leave starting ClientApp /
ServerApp processes to a SuperExec beside them. Flower's SuperExec starts the program
named in its ``TASK_TYPE_TO_COMMAND`` table; this one names, on a device, fedspeaker's
checking runner (a launcher written by apprunner.write_launcher) for ClientApps or, on
the server, Flower's own `flwr-serverapp` for ServerApps, and ``/bin/false`` for every
other kind of task, then runs Flower's SuperExec unchanged. (The SuperExec Flower's
SuperLink starts by itself never reaps a finished ServerApp until the next one starts.)

    python -P -m fedspeaker.deploy.superexec --clientapp LAUNCHER <flower-superexec arguments>
    python -P -m fedspeaker.deploy.superexec --serverapp <flower-superexec arguments>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--clientapp", type=Path,
                      help="the program to start for each ClientApp (the checking runner's launcher)")
    kind.add_argument("--serverapp", action="store_true",
                      help="start ServerApps only, with Flower's own flwr-serverapp")
    args, flower_args = parser.parse_known_args(argv)
    if args.clientapp is not None and not os.access(args.clientapp, os.X_OK):
        print(f"fedspeaker superexec: {args.clientapp} is not an executable file", file=sys.stderr)
        return 1
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import subprocess_executor

    if subprocess_executor.TASK_TYPE_TO_COMMAND is not TASK_TYPE_TO_COMMAND:
        print("fedspeaker superexec: this Flower version's SuperExec no longer reads the table it "
              "patches, so ClientApps would start unchecked; refusing to start", file=sys.stderr)
        return 1
    for task_type in list(TASK_TYPE_TO_COMMAND):
        TASK_TYPE_TO_COMMAND[task_type] = "/bin/false"
    if args.serverapp:
        TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP] = str(Path(sys.executable).parent / "flwr-serverapp")
    else:
        TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(args.clientapp.resolve())
    reap_finished_children()
    sys.argv = [sys.argv[0], *flower_args]
    flower_superexec()
    return 0


def reap_finished_children(interval: float = 1.0) -> threading.Thread:
    """Flower's SuperExec starts each ClientApp or ServerApp with a Popen it drops at once;
    CPython reaps such a process only when the next Popen is made, so a finished app
    stayed <defunct> until the next round or run. This thread lets CPython's own clean-up run every
    ``interval`` seconds (it polls only those dropped Popens, so no other status is taken)."""
    def reap() -> None:
        while True:
            subprocess._cleanup()  # noqa: SLF001 - CPython's own reaper of dropped Popens
            time.sleep(interval)

    thread = threading.Thread(target=reap, name="fedspeaker-reaper", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    sys.exit(main())
