"""Development TLS certificates for a SuperLink and authentication keys for SuperNodes.

Flower's Deployment Engine wants a CA certificate (every SuperNode and `flwr` trusts
it), a server certificate and key for the SuperLink whose names cover the address the
SuperNodes dial, and one EC key pair per SuperNode in OpenSSH format (the SuperLink
only admits nodes whose public key was registered). Flower's docs make these with
openssl and ssh-keygen; this does the same with `cryptography`, which Flower already
installs, so a fresh machine needs nothing else. Use a real CA in production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedspeaker.errors import FedSpeakerError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertificatePaths:
    """The files `fedspeaker superlink` / `supernode` look for in a certificate folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    def require_server_files(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FedSpeakerError(f"{', '.join(map(str, missing))}: not found; make them with "
                                  f"`fedspeaker certs --out {self.folder}`")


def make_certificates(folder: Path, hosts: list[str], days: int = 365) -> CertificatePaths:
    """A new CA and a SuperLink certificate valid for ``hosts`` (names or IP addresses)."""
    paths = CertificatePaths(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                    not_valid_after=now + datetime.timedelta(days=days))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedspeaker development CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.ca_key, _pem_private(ca_key), private=True)
    _write(paths.server_key, _pem_private(server_key), private=True)
    return paths


def make_node_key(private_path: Path) -> Path:
    """An EC P-384 key pair for SuperNode authentication; returns the public key's path.

    The private key stays on the device; the ``.pub`` file is what the server registers.
    """
    if private_path.exists():
        raise FedSpeakerError(f"{private_path}: already exists; a device keeps its key "
                              "(delete the file first to make a new one)")
    key = ec.generate_private_key(ec.SECP384R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    _write(private_path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    public_path = private_path.with_name(private_path.name + ".pub")
    _write(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n")
    return public_path


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, content: bytes, private: bool = False) -> None:
    """Private keys are created readable by their owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
