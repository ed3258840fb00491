"""Start the whole server side, or a device's side, as children stopped by PID.

The server side is three processes: the SuperLink on 127.0.0.1, fedspeaker's SuperExec
beside it (it starts the ServerApps), and nginx, the public endpoint in front of it. A device's side is the SuperNode and fedspeaker's SuperExec
beside it. `fedspeaker superlink` / `supernode` and the loopback deployment both start
them here, into an ExitStack that stops every one of them, by PID, however it closes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from fedspeaker.deploy.certs import CertificatePaths
from fedspeaker.deploy.flower import DEFAULT_PORT, LINK_PORT, SuperLinkOptions, SuperNodeOptions
from fedspeaker.deploy.processes import Child, child_process, wait_for_port
from fedspeaker.deploy.proxy import PublicEndpoint

LogFor = Callable[[str], "IO | int | None"]  # a process's name -> where its output goes


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    certs: Path  # folder from `fedspeaker certs`
    run_dir: Path  # nginx's configuration, pid file and logs
    host: str = "127.0.0.1"  # the public endpoint's address (0.0.0.0: all of this machine's)
    port: int = DEFAULT_PORT  # the public endpoint: devices dial host:port
    link_port: int = LINK_PORT  # the SuperLink, on 127.0.0.1 only: the operator's `flwr` dials it
    operator_port: int | None = None  # optional mutual-TLS endpoint for a remote operator
    database: Path | None = None

    def superlink(self) -> SuperLinkOptions:
        return SuperLinkOptions(certs=self.certs, port=self.link_port, database=self.database,
                                superexec_secret=self.run_dir / "superexec.secret")

    def endpoint(self) -> PublicEndpoint:
        return PublicEndpoint(certs=CertificatePaths(self.certs), run_dir=self.run_dir, host=self.host,
                              port=self.port, link_port=self.link_port, operator_port=self.operator_port)


def start_server(stack: contextlib.ExitStack, options: ServerOptions, *, env: dict[str, str],
                 log_for: LogFor) -> dict[str, Child]:
    """The SuperLink and its SuperExec, then nginx; the SuperLink and nginx listening when
    this returns."""
    superlink = options.superlink()
    superlink_cmd = superlink.command()
    endpoint = options.endpoint()
    endpoint.write()  # checked by `nginx -t` before anything starts
    superlink.prepare()
    link = stack.enter_context(child_process(superlink_cmd, env, log_for("superlink")))
    wait_for_port(options.link_port, link, "the SuperLink")
    superexec = stack.enter_context(
        child_process(superlink.superexec_command(link.proc.pid), env, log_for("superexec")))
    nginx = stack.enter_context(child_process(endpoint.command(), env, log_for("nginx")))
    for port in (options.port, options.operator_port):
        if port is not None:
            wait_for_port(port, nginx, "nginx (the public endpoint)", host=options.host)
    return {"superlink": link, "superexec": superexec, "nginx": nginx}


def start_supernode(stack: contextlib.ExitStack, options: SuperNodeOptions, *, env: dict[str, str],
                    log_for: LogFor) -> dict[str, Child]:
    """The SuperNode and, when it checks apps, fedspeaker's SuperExec beside it (which
    exits by itself when the SuperNode does)."""
    cmd = options.command()
    options.prepare()
    node = stack.enter_context(child_process(cmd, env, log_for("supernode")))
    children = {"supernode": node}
    if options.checks_apps:
        children["superexec"] = stack.enter_context(
            child_process(options.superexec_command(node.proc.pid), env, log_for("superexec")))
    return children
