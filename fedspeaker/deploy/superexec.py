"""A device's SuperExec: Flower's own `flower-superexec`, starting only checked ClientApps.

`flower-supernode --isolation process` leaves starting ClientApp processes to a
SuperExec beside it. Flower's SuperExec starts the program named in its
``TASK_TYPE_TO_COMMAND`` table; this one names fedspeaker's checking runner (a
launcher written by apprunner.write_launcher) for ClientApps and ``/bin/false`` for
every other kind of task, then runs Flower's SuperExec unchanged.

    python -P -m fedspeaker.deploy.superexec --clientapp LAUNCHER <flower-superexec arguments>
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
    parser.add_argument("--clientapp", required=True, type=Path,
                        help="the program to start for each ClientApp (the checking runner's launcher)")
    args, flower_args = parser.parse_known_args(argv)
    if not os.access(args.clientapp, os.X_OK):
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
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(args.clientapp.resolve())
    reap_finished_children()
    sys.argv = [sys.argv[0], *flower_args]
    flower_superexec()
    return 0


def reap_finished_children(interval: float = 1.0) -> threading.Thread:
    """Flower's SuperExec starts each ClientApp with a Popen it drops at once; CPython reaps
    such a process only when the next Popen is made, so a finished ClientApp stayed
    <defunct> until the next round. This thread lets CPython's own clean-up run every
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
