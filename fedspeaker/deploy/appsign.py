"""The operator's signature over a Flower App Bundle (FAB), and its check on a device.

A run ships its app to every device as a FAB, and the device executes the ClientApp
in it. The operator signs, with an ed25519 key kept off the server, the SHA-256 of the
FAB's exact bytes (the ``fab_hash`` Flower itself computes), under a prefix that keeps
the signature from meaning anything else:

    signature = base64url(ed25519_sign(key, b"fedspeaker-fab-v1:" + sha256hex(FAB)))

It travels as the run-config value ``fab-signature``; the run config is not part of
the FAB, so carrying it changes nothing that is signed. ``flwr run DIR`` rebuilds the
FAB from DIR deterministically with Flower's own builder, so signing
``build_app(DIR)`` signs exactly what that command will send, as long as DIR does not
change in between (if it does, the devices refuse the run).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import tomllib
import zipfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedspeaker.deploy.certs import keep_old, write_file
from fedspeaker.errors import FedSpeakerError

SIGNATURE_KEY = "fab-signature"  # the run-config key (fedspeaker/config.py: fab_signature)
PREFIX = b"fedspeaker-fab-v1:"


class AppVerificationError(FedSpeakerError):
    """The app bundle is not one the operator signed: none of it may run."""


def make_app_key(private_path: Path, *, force: bool = False) -> Path:
    """An ed25519 app-signing key pair (OpenSSH format, as ``ssh-keygen -t ed25519`` makes);
    returns the public key's path. The private key signs releases and stays with the
    operator; the ``.pub`` file goes to every device. An existing pair is refused, or with
    ``force`` kept in a dated folder beside the new one."""
    keep_old([private_path, private_path.with_name(private_path.name + ".pub")], force=force,
             what="app-signing key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_file(private_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), private=True)
    public_path = private_path.with_name(private_path.name + ".pub")
    write_file(public_path, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" fedspeaker-app\n")
    return public_path


def build_app(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` sends, built by Flower's own function."""
    from flwr.cli.build import build_fab_from_disk

    if not (app_dir / "pyproject.toml").is_file():
        raise FedSpeakerError(f"{app_dir}: not a Flower app (no pyproject.toml)")
    try:
        return build_fab_from_disk(app_dir)
    except ValueError as exc:
        raise FedSpeakerError(f"{app_dir}: cannot build the app bundle: {exc}") from None


def sign_fab(fab: bytes, private_key: Path) -> str:
    """The signature of ``fab`` with the operator's private key (base64url, no padding)."""
    key = _load_private_key(private_key)
    return base64.urlsafe_b64encode(key.sign(_message(fab_digest(fab)))).decode("ascii").rstrip("=")


def fab_digest(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def load_public_keys(path: Path) -> list[ed25519.Ed25519PublicKey]:
    """The operator's public key(s): one ``ssh-ed25519 ...`` line each (more than one
    while a key is being replaced)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FedSpeakerError(f"{path}: cannot read the operator's app key ({exc})") from None
    keys = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(line.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            key = None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise FedSpeakerError(f"{path}: not an ed25519 public key (`fedspeaker app-key` "
                                  "writes one): " + line[:24] + "...")
        keys.append(key)
    if not keys:
        raise FedSpeakerError(f"{path}: holds no public key")
    return keys


def verify_fab(fab: bytes, signature: str, keys: list[ed25519.Ed25519PublicKey], *,
               claimed_hash: str, fab_id: str, fab_version: str) -> str:
    """Raise AppVerificationError unless one of ``keys`` signed exactly these bytes; the
    digest otherwise.

    Flower finds the installed app by the hash, id and version the run claims, so those
    must be the signed bundle's too.
    """
    digest = fab_digest(fab)
    if claimed_hash != digest:
        raise AppVerificationError(f"the run claims app bundle {claimed_hash[:12]} but sent {digest[:12]}")
    if not signature:
        raise AppVerificationError(f"app bundle {digest[:12]} carries no `{SIGNATURE_KEY}` in its run config")
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError):
        raise AppVerificationError(f"app bundle {digest[:12]}: malformed `{SIGNATURE_KEY}`") from None
    if not any(_verifies(key, raw, _message(digest)) for key in keys):
        raise AppVerificationError(f"app bundle {digest[:12]}: its signature is not the operator's "
                                   "(the app differs from the one signed, or another key signed it)")
    signed_id, signed_version = app_identity(fab)
    if (fab_id, fab_version) != (signed_id, signed_version):
        raise AppVerificationError(f"the run says app {fab_id} {fab_version}, the signed bundle is "
                                   f"{signed_id} {signed_version}")
    return digest


def app_identity(fab: bytes) -> tuple[str, str]:
    """(publisher/name, version) as Flower reads them from the bundle's pyproject.toml."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        return (f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}",
                str(config["project"]["version"]))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppVerificationError(f"not a readable app bundle ({exc})") from None


def _message(digest: str) -> bytes:
    return PREFIX + digest.encode("ascii")


def _verifies(key: ed25519.Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FedSpeakerError(f"{path}: cannot read the app-signing key ({exc})") from None
    key = None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = load(data, password=None)
            break
        except (ValueError, TypeError):
            continue
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FedSpeakerError(f"{path}: not an unencrypted ed25519 private key "
                              "(make one with `fedspeaker app-key`)")
    return key
