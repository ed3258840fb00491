"""`fedspeaker certs | node-key | device-data | superlink | supernode`: a real federation
across machines.

The last two exec Flower's own `flower-superlink` / `flower-supernode` (fedspeaker/deploy.py);
these functions only turn flags into those commands and say what they do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedspeaker.deploy.flower import DEFAULT_PORT, INSECURE_WARNING, SuperLinkOptions, SuperNodeOptions, flower_env
from fedspeaker.config import PARTITIONS
from fedspeaker.errors import FedSpeakerError


def certs(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.certs import DEFAULT_HOSTS, make_certificates

    hosts = list(dict.fromkeys([*args.host, *DEFAULT_HOSTS]))
    paths = make_certificates(Path(args.out).expanduser(), hosts, days=args.days)
    print(f"development CA and SuperLink certificate for {', '.join(hosts)} (valid {args.days} days):\n"
          f"  {paths.ca_cert}  copy to every device and to where you run `flwr`\n"
          f"  {paths.server_cert}, {paths.server_key}  stay on the SuperLink machine\n"
          f"  {paths.ca_key}  signs certificates: keep it private, or delete it once done")
    return 0


def node_key(args: argparse.Namespace) -> int:
    from fedspeaker.deploy.certs import make_node_key

    private = Path(args.key).expanduser()
    public = make_node_key(private)
    print(f"SuperNode key pair: {private} (stays on this device) and {public}.\n"
          f"On the server machine register the public key, then start this device's SuperNode:\n"
          f"  flwr supernode register {public.name} <superlink connection>")
    return 0


def superlink(args: argparse.Namespace) -> int:
    options = SuperLinkOptions(
        certs=Path(args.certs).expanduser() if args.certs else None, host=args.host, port=args.port,
        database=Path(args.database).expanduser() if args.database else None, insecure=args.insecure)
    return _exec(options.command(), args.insecure)


def supernode(args: argparse.Namespace) -> int:
    options = SuperNodeOptions(
        superlink=args.superlink, data_dir=Path(args.data_dir).expanduser(),
        ca_cert=Path(args.ca).expanduser() if args.ca else None,
        key=Path(args.key).expanduser() if args.key else None,
        state_dir=Path(args.state_dir).expanduser() if args.state_dir else None,
        port=args.port, insecure=args.insecure)
    return _exec(options.command(), args.insecure)


def device_data(args: argparse.Namespace) -> int:
    from fedspeaker.config import RunSettings
    from simulations.loopback import device_folders

    settings = RunSettings(num_clients=args.clients, partition=args.partition, seed=args.seed,
                           data_dir=args.data_dir or "")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FedSpeakerError(f"{out}: not empty; give a new folder")
    for folder in device_folders(settings, out):
        files = sum(1 for _ in folder.rglob("*") if _.is_file())
        speakers = sum(1 for _ in folder.iterdir())
        print(f"{folder}: {files} recordings of {speakers} speakers (links into {settings.corpus_dir})")
    return 0


def _exec(cmd: list[str], insecure: bool) -> int:
    """Replace this process with Flower's, so signals and exit codes are Flower's own."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    print("running: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, flower_env())
    return 0  # not reached


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a development CA and a TLS certificate for the SuperLink")
    p.set_defaults(command=certs)
    p.add_argument("--out", default="certs", help="folder for ca.crt, ca.key, superlink.crt, "
                   "superlink.key (default certs)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or IP address devices use to reach the SuperLink (repeatable; "
                   "localhost and 127.0.0.1 are always included)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")

    p = sub.add_parser("node-key", help="make this device's SuperNode authentication key pair")
    p.set_defaults(command=node_key)
    p.add_argument("key", help="private key file to write (its public key goes to KEY.pub)")

    p = sub.add_parser("device-data", help="split a corpus's training utterances into one folder "
                       "per device, as a simulation would, to try a deployment on one machine")
    p.set_defaults(command=device_data)
    p.add_argument("--clients", type=int, default=2, help="devices (default 2)")
    p.add_argument("--out", default="devices", help="folder for device-0, device-1, ... (default devices)")
    p.add_argument("--data-dir", help="corpus root (default: the bundled corpus)")
    p.add_argument("--partition", default="dirichlet", choices=PARTITIONS,
                   help="as for simulate (default dirichlet)")
    p.add_argument("--seed", type=int, default=0, help="as for simulate (default 0)")

    p = sub.add_parser("superlink", help="start Flower's SuperLink: TLS, SuperNode authentication")
    p.set_defaults(command=superlink)
    p.add_argument("--certs", help="folder from `fedspeaker certs`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0 for devices on the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--database", help="file Flower keeps runs and registered SuperNodes in "
                   "(default: in memory, forgotten on restart)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (warns)")

    p = sub.add_parser("supernode", help="start Flower's SuperNode on a device, on its own recordings")
    p.set_defaults(command=supernode)
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--data-dir", required=True, help="this device's recordings: "
                   "<dir>/<speaker>/<utterance>.{wav,flac}; never leaves the device")
    p.add_argument("--ca", help="the CA certificate (ca.crt from `fedspeaker certs`)")
    p.add_argument("--key", help="this device's private key (from `fedspeaker node-key`)")
    p.add_argument("--state-dir", help="where the device keeps its feature cache and privacy "
                   "ledger (default ~/.cache/fedspeaker/supernode-PORT)")
    p.add_argument("--port", type=int, default=9094,
                   help="the SuperNode's loopback port for its ClientApp processes (default 9094)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication (warns)")
