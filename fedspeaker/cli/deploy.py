"""`fedspeaker certs | node-key | app-key | sign-app | device-data | superlink | supernode |
operator-proxy`: a real federation across machines.

`superlink`, `supernode` and `operator-proxy` start their processes as children
(fedspeaker/deploy/launch.py), print where everything listens, and stop all of them, by
PID, on Ctrl-C, `kill`, or when one of them exits. These functions only turn flags into
options and say what they do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from fedspeaker.config import PARTITIONS
from fedspeaker.deploy.flower import (DEFAULT_PORT, INSECURE_WARNING, LINK_PORT, NODE_PORT,
                                      UNCHECKED_APPS_WARNING, SuperLinkOptions, SuperNodeOptions,
                                      flower_env)
from fedspeaker.deploy.processes import Child, wait_for_any
from fedspeaker.errors import FedSpeakerError


def certs(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.certs import LOOPBACK_HOSTS, make_certificates

    hosts = list(dict.fromkeys([*args.host, *LOOPBACK_HOSTS]))
    paths = make_certificates(Path(args.out).expanduser(), hosts, days=args.days, operator=args.operator,
                              force=args.force)
    print(f"certificates in {paths.folder} (valid {args.days} days; private keys are owner-only):\n"
          f"  {paths.ca_cert.name}  the federation CA: copy to every device\n"
          f"  {paths.public_cert.name}, {paths.public_key.name}  the public endpoint (nginx), "
          f"for {', '.join(hosts)}: stay on the server\n"
          f"  {paths.server_cert.name}, {paths.server_key.name}  the SuperLink on 127.0.0.1: stay on the server\n"
          f"  {paths.ca_key.name}  signs certificates: keep it off the server (or delete it once done)")
    if args.operator:
        print(f"  {paths.operator_ca_cert.name}  the operator CA: stays on the server (nginx trusts it)\n"
              f"  {paths.operator_cert.name}, {paths.operator_key.name} (+ {paths.ca_cert.name})  the operator's "
              "client certificate: to the operator's machine only\n"
              f"  {paths.operator_ca_key.name}  signs operator certificates: keep it off the server")
    return 0


def node_key(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.certs import make_node_key

    private = Path(args.key).expanduser()
    public = make_node_key(private, force=args.force)
    print(f"SuperNode key pair: {private} (stays on this device) and {public}.\n"
          f"On the server machine register the public key, then start this device's SuperNode:\n"
          f"  flwr supernode register {public.name} <superlink connection>")
    return 0


def app_key(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.appsign import make_app_key

    private = Path(args.key).expanduser()
    public = make_app_key(private, force=args.force)
    print(f"app-signing key pair: {private} signs the apps you release (keep it with you, off the "
          f"server) and {public} goes to every device (`fedspeaker supernode --app-key {public.name}`)")
    return 0


def sign_app(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.appsign import SIGNATURE_KEY, app_identity, build_app, fab_digest, sign_fab

    app = Path(args.app).expanduser()
    fab = build_app(app)
    signature = sign_fab(fab, Path(args.key).expanduser())
    app_id, version = app_identity(fab)
    print(signature)
    print(f"signed app bundle {app_id} {version}, sha256 {fab_digest(fab)}, as `flwr run {app}` "
          f"builds it now (any change to {app} before the run makes the devices refuse it); launch:\n"
          f"  flwr run {app} {args.connection} --run-config \"{SIGNATURE_KEY}='{signature}' ...\"",
          file=sys.stderr)
    return 0


def superlink(args: argparse.Namespace) -> int:
    database = Path(args.database).expanduser() if args.database else None
    if args.insecure:
        options = SuperLinkOptions(certs=None, host=args.host, port=args.port, database=database,
                                   insecure=True)
        return _exec(options.command(), warnings=[INSECURE_WARNING])
    from fedspeaker.deploy.launch import ServerOptions, start_server

    if not args.certs:
        raise FedSpeakerError("the server needs --certs DIR (from `fedspeaker certs`), "
                              "or --insecure for a test on a trusted network")
    options = ServerOptions(
        certs=Path(args.certs).expanduser(), host=args.host, port=args.port, link_port=args.link_port,
        operator_port=args.operator_port, database=database,
        run_dir=Path(args.run_dir or f"~/.cache/fedspeaker/superlink-{args.port}").expanduser())
    certs_dir = options.certs.resolve()
    where = "this machine's name" if args.host in ("0.0.0.0", "::") else args.host
    lines = [f"server side up: SuperLink on 127.0.0.1:{options.link_port} and the SuperExec that starts "
             f"its ServerApps, nginx ({options.run_dir})",
             f"  devices connect to {where}:{args.port} (Fleet API only; trust {certs_dir}/ca.crt)",
             f"  the operator's flwr, on this machine: address = \"127.0.0.1:{options.link_port}\", "
             f"root-certificates = \"{certs_dir}/ca.crt\""]
    if options.operator_port is not None:
        lines.append(f"  remote operator: {args.host}:{options.operator_port} with the operator's client "
                     "certificate (`fedspeaker operator-proxy` on the operator's machine)")
    lines.append("  Ctrl-C stops all of it")
    return _supervise(lambda stack: start_server(stack, options, env=flower_env(), log_for=lambda _: None),
                      lines)


def supernode(args: argparse.Namespace) -> int:
    options = SuperNodeOptions(
        superlink=args.superlink, data_dir=Path(args.data_dir).expanduser(),
        ca_cert=Path(args.ca).expanduser() if args.ca else None,
        key=Path(args.key).expanduser() if args.key else None,
        app_keys=Path(args.app_key).expanduser() if args.app_key else None,
        state_dir=Path(args.state_dir).expanduser() if args.state_dir else None,
        port=args.port, insecure=args.insecure)
    warnings = [INSECURE_WARNING] if args.insecure else []
    if not options.checks_apps:
        return _exec(options.command(), warnings=[*warnings, UNCHECKED_APPS_WARNING])
    from fedspeaker.deploy.launch import start_supernode

    for warning in warnings:
        print(warning, file=sys.stderr)
    lines = [f"SuperNode up, dialling {args.superlink}; it runs only apps signed with a key in "
             f"{options.app_keys} (state in {options.state}); Ctrl-C stops it"]
    return _supervise(lambda stack: start_supernode(stack, options, env=flower_env(), log_for=lambda _: None),
                      lines, explain=lambda name, code: supernode_hint(options, args.superlink, name, code))


def supernode_hint(options: SuperNodeOptions, superlink: str, name: str, code: int) -> str | None:
    """Why a SuperNode most likely stopped: Flower says only that it could not connect."""
    if name != "supernode" or code == 0:
        return None
    if options.key is None:
        return (f"the SuperNode stopped (status {code}): check that a SuperLink answers at {superlink} "
                "and that --ca names the federation's ca.crt")
    public = f"{options.key}.pub"
    return (f"the SuperNode stopped (status {code}). The likely cause: its key is not registered with the "
            f"SuperLink (the SuperLink refuses unknown keys and Flower reports only a failed connection). "
            f"On the server machine register {public} (copy it there): `flwr supernode register "
            f"{Path(public).name} <superlink connection>`, check with `flwr supernode list <superlink "
            f"connection>`, then start this SuperNode again. Otherwise: no SuperLink answers at {superlink}, "
            "or --ca is not the federation's ca.crt")


def operator_proxy(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.certs import CertificatePaths
    from fedspeaker.deploy.processes import child_process, wait_for_port
    from fedspeaker.deploy.proxy import OperatorProxy

    proxy = OperatorProxy(certs=CertificatePaths(Path(args.certs).expanduser()), server=args.server,
                          port=args.port,
                          run_dir=Path(args.run_dir or f"~/.cache/fedspeaker/operator-proxy-{args.port}").expanduser())

    def start(stack: contextlib.ExitStack) -> dict[str, Child]:
        proxy.write()
        nginx = stack.enter_context(child_process(proxy.command(), flower_env(), None))
        wait_for_port(args.port, nginx, "nginx (the operator proxy)")
        return {"nginx": nginx}

    return _supervise(start, [
        f"operator proxy up: 127.0.0.1:{args.port} -> {args.server} with {proxy.certs.operator_cert}",
        f"  flwr connection: address = \"127.0.0.1:{args.port}\", insecure = true (loopback only)",
        "  Ctrl-C stops it"])


def device_data(args: argparse.Namespace) -> int:
    from fedspeaker.config import RunSettings
    from simulations.loopback import device_folders

    settings = RunSettings.from_run_config({"num-clients": args.clients, "partition": args.partition,
                                            "seed": args.seed, "data-dir": args.data_dir or ""})
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FedSpeakerError(f"{out}: not empty; give a new folder")
    for folder in device_folders(settings, out):
        files = sum(1 for _ in folder.rglob("*") if _.is_file())
        speakers = sum(1 for _ in folder.iterdir())
        print(f"{folder}: {files} recordings of {speakers} speakers (links into {settings.corpus_dir})")
    return 0


def _force_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace existing {what}; the old ones are "
                   "moved to replaced-<date-time>/ beside them, never deleted")


def _supervise(start: Callable[[contextlib.ExitStack], dict[str, Child]], banner: list[str], *,
               explain: Callable[[str, int], str | None] = lambda name, code: None) -> int:
    """Start children, say so, and wait; when one exits, stop the rest (by PID), say why it
    most likely did (``explain``) and return its status as it is (a signal N: 128 + N).
    Ctrl-C, `kill` or a closed terminal stop them all the same way."""
    signal.signal(signal.SIGHUP, _hang_up)  # the children run in sessions of their own
    with contextlib.ExitStack() as stack:
        children = start(stack)
        print("\n".join(f"fedspeaker: {line}" if i == 0 else line for i, line in enumerate(banner)), flush=True)
        name = wait_for_any(children)
        code = children[name].proc.returncode
        print(f"fedspeaker: {name} exited (status {code}); stopping the rest", file=sys.stderr, flush=True)
    hint = explain(name, code)
    if hint:
        print(f"fedspeaker: {hint}", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code


def _hang_up(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _exec(cmd: list[str], *, warnings: list[str]) -> int:
    """Replace this process with Flower's, so signals and exit codes are Flower's own."""
    for warning in warnings:
        print(warning, file=sys.stderr)
    print("running: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, flower_env())
    return 0  # not reached


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make the deployment's TLS certificates: a federation CA, the "
                       "public endpoint's and the SuperLink's; optionally the operator's")
    p.set_defaults(command=certs)
    p.add_argument("--out", default="certs", help="folder for ca.crt, public.crt, superlink.crt and "
                   "their keys (default certs)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or IP address devices use to reach the server (repeatable; "
                   "localhost and 127.0.0.1 are always included)")
    p.add_argument("--operator", action="store_true", help="also an operator CA and the operator's "
                   "client certificate, for `superlink --operator-port` (a remote operator)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    _force_flag(p, "certificates")

    p = sub.add_parser("node-key", help="make this device's SuperNode authentication key pair")
    p.set_defaults(command=node_key)
    p.add_argument("key", help="private key file to write (its public key goes to KEY.pub)")
    _force_flag(p, "key pair")

    p = sub.add_parser("app-key", help="make the operator's app-signing key pair (ed25519): devices "
                       "run only apps it signed")
    p.set_defaults(command=app_key)
    p.add_argument("key", help="private key file to write (its public key goes to KEY.pub)")
    _force_flag(p, "key pair")

    p = sub.add_parser("sign-app", help="sign the app bundle `flwr run APP` will send; prints the "
                       "signature for --run-config \"fab-signature='...'\"")
    p.set_defaults(command=sign_app)
    p.add_argument("app", nargs="?", default=".", help="the Flower app's folder (default .)")
    p.add_argument("--key", required=True, help="the app-signing private key (from `fedspeaker app-key`)")
    p.add_argument("--connection", default="fedspeaker", help="SuperLink connection name shown in the "
                   "printed `flwr run` command (default fedspeaker)")

    p = sub.add_parser("device-data", help="split a corpus's training utterances into one folder "
                       "per device, as a simulation would, to try a deployment on one machine")
    p.set_defaults(command=device_data)
    p.add_argument("--clients", type=int, default=2, help="devices (default 2)")
    p.add_argument("--out", default="devices", help="folder for device-0, device-1, ... (default devices)")
    p.add_argument("--data-dir", help="corpus root (default: the bundled corpus)")
    p.add_argument("--partition", default="dirichlet", help="as for simulate: "
                   f"{', '.join(PARTITIONS)} (default dirichlet)")
    p.add_argument("--seed", type=int, default=0, help="as for simulate (default 0)")

    p = sub.add_parser("superlink", help="start the server side: the SuperLink on 127.0.0.1 and nginx, "
                       "the devices' public endpoint (Fleet API only); Ctrl-C stops both")
    p.set_defaults(command=superlink)
    p.add_argument("--certs", help="folder from `fedspeaker certs`")
    p.add_argument("--host", default="127.0.0.1", help="the public endpoint's address (default "
                   "127.0.0.1; 0.0.0.0 for devices on the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"the public endpoint's port, which devices dial (default {DEFAULT_PORT})")
    p.add_argument("--link-port", type=int, default=LINK_PORT, help="the SuperLink's port on 127.0.0.1, "
                   f"which the operator's `flwr` dials on this machine (default {LINK_PORT})")
    p.add_argument("--operator-port", type=int, help="also open the Control API on HOST:PORT to a "
                   "client certificate from the operator CA (`fedspeaker certs --operator`)")
    p.add_argument("--database", help="file Flower keeps runs and registered SuperNodes in "
                   "(default: in memory, forgotten on restart)")
    p.add_argument("--run-dir", help="folder for nginx's configuration and logs "
                   "(default ~/.cache/fedspeaker/superlink-PORT)")
    p.add_argument("--insecure", action="store_true", help="Flower's SuperLink alone on HOST:PORT: no "
                   "TLS, no authentication, Control API open to all (warns)")

    p = sub.add_parser("supernode", help="start a device's SuperNode on its own recordings; it runs "
                       "only apps the operator signed")
    p.set_defaults(command=supernode)
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's public endpoint")
    p.add_argument("--data-dir", required=True, help="this device's recordings: "
                   "<dir>/<speaker>/<utterance>.{wav,flac}; never leaves the device")
    p.add_argument("--ca", help="the CA certificate (ca.crt from `fedspeaker certs`)")
    p.add_argument("--key", help="this device's private key (from `fedspeaker node-key`)")
    p.add_argument("--app-key", help="the operator's app-signing public key(s) (KEY.pub from "
                   "`fedspeaker app-key`, one per line): only apps they signed run here")
    p.add_argument("--state-dir", help="where the device keeps its feature cache and privacy "
                   "ledger (default ~/.cache/fedspeaker/supernode-PORT)")
    p.add_argument("--port", type=int, default=NODE_PORT, help="the SuperNode's loopback port for its "
                   f"SuperExec and ClientApp processes (default {NODE_PORT})")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication; without "
                   "--app-key, no app check either (warns)")

    p = sub.add_parser("operator-proxy", help="on the operator's machine: a loopback endpoint for "
                       "`flwr` that reaches the server's operator port with the operator's client "
                       "certificate")
    p.set_defaults(command=operator_proxy)
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's operator endpoint "
                   "(`fedspeaker superlink --operator-port`)")
    p.add_argument("--certs", required=True, help="folder holding ca.crt, operator.crt, operator.key")
    p.add_argument("--port", type=int, default=LINK_PORT, help="loopback port `flwr` dials "
                   f"(default {LINK_PORT})")
    p.add_argument("--run-dir", help="folder for nginx's configuration and logs "
                   "(default ~/.cache/fedspeaker/operator-proxy-PORT)")
