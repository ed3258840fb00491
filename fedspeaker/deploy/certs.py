"""TLS certificates for the server side and authentication keys for SuperNodes.

A deployment has two TLS endpoints on the server machine: the SuperLink itself, which
listens on 127.0.0.1 only (its certificate names only loopback addresses), and the
public endpoint (nginx) that devices dial, whose certificate names the server's public
names. Both are signed by one federation CA, so a device needs only ``ca.crt``. An
optional, separate operator CA issues the client certificate that opens the operator's
mutual-TLS endpoint; devices never trust it and it never signs a server.

Flower's docs make these with openssl and ssh-keygen; this does the same with
`cryptography`, which Flower already installs. Private keys are created readable by
their owner only and never printed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedspeaker.errors import FedSpeakerError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_HOSTS = LOOPBACK_HOSTS


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
        """The SuperLink's own certificate: loopback names only."""
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    @property
    def public_cert(self) -> Path:
        """The public endpoint's certificate: the names devices dial."""
        return self.folder / "public.crt"

    @property
    def public_key(self) -> Path:
        return self.folder / "public.key"

    @property
    def operator_ca_cert(self) -> Path:
        return self.folder / "operator-ca.crt"

    @property
    def operator_ca_key(self) -> Path:
        return self.folder / "operator-ca.key"

    @property
    def operator_cert(self) -> Path:
        """The operator's client certificate for the mutual-TLS endpoint."""
        return self.folder / "operator.crt"

    @property
    def operator_key(self) -> Path:
        return self.folder / "operator.key"

    def require_server_files(self) -> None:
        self._require(self.ca_cert, self.server_cert, self.server_key, self.public_cert, self.public_key)

    def require_operator_ca(self) -> None:
        if not self.operator_ca_cert.is_file():
            raise FedSpeakerError(f"{self.operator_ca_cert}: not found; make an operator CA and "
                                  f"client certificate with `fedspeaker certs --operator --out {self.folder}`")

    def require_operator_client(self) -> None:
        self._require(self.ca_cert, self.operator_cert, self.operator_key)

    def _require(self, *paths: Path) -> None:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FedSpeakerError(f"{', '.join(map(str, missing))}: not found; make them with "
                                  f"`fedspeaker certs --out {self.folder}`")


def make_certificates(folder: Path, hosts: list[str], days: int = 365, *,
                      operator: bool = False, force: bool = False) -> CertificatePaths:
    """A new federation CA, the SuperLink's loopback certificate and the public endpoint's
    certificate for ``hosts`` (names or IP addresses); with ``operator``, also an operator
    CA and the operator's client certificate.

    A CA already given to devices must never vanish: existing files are refused, or with
    ``force`` moved into a dated folder beside the new ones (``keep_old``)."""
    paths = CertificatePaths(folder)
    files = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.public_cert,
             paths.public_key]
    if operator:
        files += [paths.operator_ca_cert, paths.operator_ca_key, paths.operator_cert, paths.operator_key]
    keep_old(files, force=force, what="certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca("fedspeaker federation CA", days)
    _write_pair(paths.ca_cert, paths.ca_key, ca_cert, ca_key)
    _write_pair(paths.server_cert, paths.server_key,
                *_issue(ca_key, ca_cert, list(LOOPBACK_HOSTS), days=days))
    public_hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    _write_pair(paths.public_cert, paths.public_key, *_issue(ca_key, ca_cert, public_hosts, days=days))
    if operator:
        op_ca_cert, op_ca_key = _make_ca("fedspeaker operator CA", days)
        _write_pair(paths.operator_ca_cert, paths.operator_ca_key, op_ca_cert, op_ca_key)
        _write_pair(paths.operator_cert, paths.operator_key,
                    *_issue(op_ca_key, op_ca_cert, [], days=days, client="fedspeaker operator"))
    return paths


def make_node_key(private_path: Path, *, force: bool = False) -> Path:
    """An EC P-384 key pair for SuperNode authentication; returns the public key's path.

    The private key stays on the device; the ``.pub`` file is what the server registers.
    An existing pair is refused, or with ``force`` kept in a dated folder (``keep_old``).
    """
    keep_old([private_path, private_path.with_name(private_path.name + ".pub")], force=force,
             what="node key")
    key = ec.generate_private_key(ec.SECP384R1())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_file(private_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), private=True)
    public_path = private_path.with_name(private_path.name + ".pub")
    write_file(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return public_path


def keep_old(paths: list[Path], *, force: bool, what: str) -> Path | None:
    """Never lose a secret: refuse to replace any of ``paths`` that exist, or with ``force``
    move them into ``replaced-<UTC date-time>/`` beside them (returned) before new ones are
    written."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return None
    if not force:
        raise FedSpeakerError(f"{', '.join(map(str, existing))}: already exists; refusing to replace "
                              f"the {what} (devices may rely on them). Add --force to make new ones; "
                              "the old ones are then kept in a dated folder beside them")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    backup = existing[0].parent / f"replaced-{stamp}"
    backup.mkdir(mode=0o700)
    for path in existing:
        path.rename(backup / path.name)  # same folder tree: a rename keeps the owner-only modes
    print(f"fedspeaker: the old {what} are kept in {backup}", file=sys.stderr)
    return backup


def write_file(path: Path, content: bytes, *, private: bool = False) -> None:
    """Write ``content``; a private file is owner-only (0600), also if it existed before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(content)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], *,
           days: int, client: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for ``hosts``, or (``client`` = its name) a client certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    start, end = _validity(days)
    builder = (
        x509.CertificateBuilder().subject_name(_name(client or hosts[0]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA384()), key


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> None:
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), private=True)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
