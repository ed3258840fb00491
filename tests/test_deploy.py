"""Deployment pieces without a federation: certificates, node keys, the Flower commands
`fedspeaker superlink` / `supernode` run, and a device's own data folder."""

from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from fedspeaker import cli
from fedspeaker.deploy.certs import CertificatePaths, make_certificates, make_node_key
from fedspeaker.data.speakers import load_device_examples
from fedspeaker.deploy.flower import SuperLinkOptions, SuperNodeOptions
from fedspeaker.errors import CorpusError, FedSpeakerError
from fedspeaker.data.features import FeatureSpec
from tests.conftest import write_tone


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, ["link.example.org", "10.0.0.7", "localhost"])
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    for private in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # what Python's TLS stack (and gRPC/httpx on a device) will accept
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    context.load_cert_chain(str(paths.server_cert), str(paths.server_key))


def test_node_keys_are_what_flower_loads_and_are_never_overwritten(tmp_path: Path) -> None:
    public = make_node_key(tmp_path / "phone")
    assert try_load_public_key(public)  # Flower's own check of `flwr supernode register`
    load_ssh_private_key((tmp_path / "phone").read_bytes(), password=None)
    assert stat.S_IMODE((tmp_path / "phone").stat().st_mode) == 0o600
    with pytest.raises(FedSpeakerError, match="already exists"):
        make_node_key(tmp_path / "phone")


def test_superlink_has_tls_and_node_authentication_unless_insecure(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path / "certs", ["localhost"])
    cmd = SuperLinkOptions(paths.folder, port=9999).command()
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(paths.server_cert)
    insecure = SuperLinkOptions(None, insecure=True).command()
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(FedSpeakerError, match="needs --certs"):
        SuperLinkOptions(None).command()
    with pytest.raises(FedSpeakerError, match="fedspeaker certs"):
        SuperLinkOptions(tmp_path / "nowhere").command()


def test_supernode_gets_its_own_data_and_state_folders(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path / "certs", ["localhost"])
    make_node_key(tmp_path / "key")
    (tmp_path / "my data").mkdir()
    cmd = SuperNodeOptions("link:9093", tmp_path / "my data", paths.ca_cert, tmp_path / "key",
                           port=9200).command()
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'data-dir="{tmp_path / "my data"}"' in node_config
    assert "supernode-9200" in node_config  # two nodes on one machine never share state
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    with pytest.raises(FedSpeakerError, match="--key"):
        SuperNodeOptions("link:9093", tmp_path / "my data", paths.ca_cert, None).command()
    with pytest.raises(FedSpeakerError, match="no such folder"):
        SuperNodeOptions("link:9093", tmp_path / "elsewhere", paths.ca_cert, tmp_path / "key").command()


def test_insecure_mode_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: ran.append(cmd))
    assert cli.main(["superlink", "--insecure"]) == 0
    assert "NOT encrypted" in capsys.readouterr().err
    assert "--insecure" in ran[0]
    assert cli.main(["superlink", "--certs", str(tmp_path)]) == 2  # no certificates there
    assert "fedspeaker certs" in capsys.readouterr().err


def test_certs_and_node_key_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["certs", "--out", str(tmp_path / "c"), "--host", "link.example.org"]) == 0
    CertificatePaths(tmp_path / "c").require_server_files()
    assert cli.main(["node-key", str(tmp_path / "k" / "car")]) == 0
    assert "flwr supernode register car.pub" in capsys.readouterr().out


def test_a_device_trains_on_its_own_folder_labelled_by_the_servers_speakers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = tmp_path / "device"
    write_tone(device / "bob" / "1.wav", 180)
    write_tone(device / "bob" / "2.flac", 185)
    write_tone(device / "carol" / "1.wav", 260)
    write_tone(device / "stranger" / "1.wav", 300)  # not a training speaker of this federation
    (device / "carol" / "broken.wav").write_bytes(b"not audio")
    with caplog.at_level(logging.WARNING):
        feats, labels = load_device_examples(device, tmp_path / "state", FeatureSpec(),
                                             ["alice", "bob", "carol"])
    assert labels == [1, 1, 2]
    assert all(f.shape[0] == 40 for f in feats)
    assert "stranger" in caplog.text and "broken.wav" in caplog.text
    with pytest.raises(CorpusError, match="no usable recordings"):
        load_device_examples(device, tmp_path / "state", FeatureSpec(), ["dave"])
