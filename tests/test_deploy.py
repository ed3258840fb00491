"""Deployment pieces without a federation: certificates and keys, the app signature and
its check, the nginx endpoint, the Flower commands `fedspeaker superlink` / `supernode`
run, and a device's own data folder."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from fedspeaker import cli
from fedspeaker.data.features import FeatureSpec
from fedspeaker.data.speakers import load_device_examples
from fedspeaker.deploy import apprunner
from fedspeaker.deploy.appsign import (AppVerificationError, build_app, fab_digest, load_public_keys,
                                       make_app_key, sign_fab, verify_fab)
from fedspeaker.deploy.certs import CertificatePaths, make_certificates, make_node_key, write_file
from fedspeaker.deploy.flower import SuperLinkOptions, SuperNodeOptions
from fedspeaker.deploy.proxy import FLEET_ROUTES, PublicEndpoint, find_nginx
from fedspeaker.errors import CorpusError, FedSpeakerError
from tests.conftest import nginx_or_skip, write_tone




def tiny_app(folder: Path, reply: str = "42") -> Path:
    """The smallest Flower app: enough for Flower to build its bundle."""
    (folder / "tiny").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "tiny"\nversion = "1.0.0"\nlicense = "Apache-2.0"\n'
        'dependencies = ["flwr"]\n[tool.flwr.app]\npublisher = "fedspeaker"\n'
        '[tool.flwr.app.components]\nserverapp = "tiny.server:app"\nclientapp = "tiny.client:app"\n'
        '[tool.flwr.app.config]\nfab-signature = ""\n')
    (folder / "tiny" / "__init__.py").write_text("")
    (folder / "tiny" / "client.py").write_text(f"REPLY = {reply}\n")
    (folder / "tiny" / "server.py").write_text("")
    return folder


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, ["link.example.org", "10.0.0.7", "localhost"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    public = x509.load_pem_x509_certificate(paths.public_cert.read_bytes())
    link = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    for cert in (public, link):
        cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = public.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in names.get_values_for_type(x509.DNSName)
    assert "10.0.0.7" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    # the SuperLink listens on loopback only, and its certificate says so
    link_names = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert link_names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert all(ip.is_loopback for ip in link_names.get_values_for_type(x509.IPAddress))
    for private in (paths.ca_key, paths.server_key, paths.public_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert not paths.operator_cert.exists()  # only with operator=True
    # what Python's TLS stack (and httpx on a device) will accept
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    context.load_cert_chain(str(paths.public_cert), str(paths.public_key))


def test_the_operator_certificate_comes_from_its_own_ca(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, [], operator=True)
    operator = x509.load_pem_x509_certificate(paths.operator_cert.read_bytes())
    operator.verify_directly_issued_by(x509.load_pem_x509_certificate(paths.operator_ca_cert.read_bytes()))
    with pytest.raises((ValueError, Exception)):  # not by the CA every device holds
        operator.verify_directly_issued_by(x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))
    usage = operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for private in (paths.operator_key, paths.operator_ca_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_private_file_is_owner_only_even_if_it_existed(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    write_file(path, b"new", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"new"


def test_node_keys_are_what_flower_loads_and_are_never_overwritten(tmp_path: Path) -> None:
    public = make_node_key(tmp_path / "phone")
    assert try_load_public_key(public)  # Flower's own check of `flwr supernode register`
    load_ssh_private_key((tmp_path / "phone").read_bytes(), password=None)
    assert stat.S_IMODE((tmp_path / "phone").stat().st_mode) == 0o600
    with pytest.raises(FedSpeakerError, match="already exists"):
        make_node_key(tmp_path / "phone")


def test_a_signature_covers_every_byte_of_the_app(tmp_path: Path) -> None:
    public = make_app_key(tmp_path / "keys" / "app")
    assert stat.S_IMODE((tmp_path / "keys" / "app").stat().st_mode) == 0o600
    keys = load_public_keys(public)
    fab = build_app(tiny_app(tmp_path / "app"))
    assert build_app(tmp_path / "app") == fab  # what `flwr run` rebuilds is what was signed
    signature = sign_fab(fab, tmp_path / "keys" / "app")
    ok = dict(claimed_hash=fab_digest(fab), fab_id="fedspeaker/tiny", fab_version="1.0.0")
    assert verify_fab(fab, signature, keys, **ok) == fab_digest(fab)

    other = build_app(tiny_app(tmp_path / "other", reply="43"))  # one byte differs
    with pytest.raises(AppVerificationError, match="not the operator's"):
        verify_fab(other, signature, keys, **{**ok, "claimed_hash": fab_digest(other)})
    with pytest.raises(AppVerificationError, match="claims"):  # a hash that is not the content's
        verify_fab(other, signature, keys, **ok)
    with pytest.raises(AppVerificationError, match="no `fab-signature`"):
        verify_fab(fab, "", keys, **ok)
    with pytest.raises(AppVerificationError):
        verify_fab(fab, "not base64 !", keys, **ok)
    with pytest.raises(AppVerificationError, match="signed bundle is fedspeaker/tiny"):
        verify_fab(fab, signature, keys, **{**ok, "fab_id": "fedspeaker/other"})
    # another key's signature is refused; a device that trusts both (a key being
    # replaced) accepts either
    second = make_app_key(tmp_path / "keys" / "next")
    with pytest.raises(AppVerificationError):
        verify_fab(fab, sign_fab(fab, tmp_path / "keys" / "next"), keys, **ok)
    both = tmp_path / "both.pub"
    both.write_text(public.read_text() + second.read_text())
    verify_fab(fab, sign_fab(fab, tmp_path / "keys" / "next"), load_public_keys(both), **ok)
    (tmp_path / "bad.pub").write_text(Path(make_node_key(tmp_path / "node")).read_text())
    with pytest.raises(FedSpeakerError, match="not an ed25519"):
        load_public_keys(tmp_path / "bad.pub")  # a P-384 node key is not an app key


def fake_task(fab: bytes, signature: str, fab_id: str = "fedspeaker/tiny") -> tuple:
    run = SimpleNamespace(fab_id=fab_id, fab_version="1.0.0", fab_hash=fab_digest(fab), run_id=7)
    return (object(), SimpleNamespace(run_config={"fab-signature": signature}), run,
            SimpleNamespace(content=fab, hash_str=fab_digest(fab)))


def test_the_runner_refuses_an_unsigned_app_before_installing_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    forgotten: list[bool] = []  # in the runner's process it unloads fedspeaker; not in this one
    monkeypatch.setattr(apprunner, "_forget_own_modules", lambda: forgotten.append(True))
    keys = load_public_keys(make_app_key(tmp_path / "app.key"))
    signed = build_app(tiny_app(tmp_path / "app"))
    signature = sign_fab(signed, tmp_path / "app.key")
    tampered = build_app(tiny_app(tmp_path / "tampered", reply="43"))
    installed: list[bytes] = []
    for fab, sig, accepted in ((tampered, signature, False), (signed, "", False), (signed, signature, True)):
        task = fake_task(fab, sig)
        check = apprunner.AppCheck(keys, lambda: task, lambda content, **kw: installed.append(content))
        _, _, _, pulled = check.pull_task_input()
        if accepted:
            check.install_from_fab(pulled.content, skip_prompt=True)
        else:
            with pytest.raises(AppVerificationError):
                check.install_from_fab(pulled.content, skip_prompt=True)
    assert installed == [signed] and forgotten == [True]
    # a copy already installed under the signed bundle's name must hold its files
    folder = tmp_path / "home" / "apps" / f"fedspeaker.tiny.1.0.0.{fab_digest(signed)[:8]}"
    (folder / "tiny").mkdir(parents=True)
    (folder / "tiny" / "client.py").write_text("REPLY = 43\n")
    task = fake_task(signed, signature)
    check = apprunner.AppCheck(keys, lambda: task, lambda content, **kw: installed.append(content))
    check.pull_task_input()
    with pytest.raises(AppVerificationError, match="installed copy"):
        check.install_from_fab(signed)


def test_the_runner_refuses_everything_if_flower_changed_its_runner(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    monkeypatch.setattr(runner, "run_clientapp", lambda **kw: None)  # calls neither wrapped function
    with pytest.raises(FedSpeakerError, match="no longer calls"):
        apprunner.install([])
    keys = tmp_path / "none.pub"
    keys.write_text("")
    assert apprunner.main(["--app-keys", str(keys)]) == 1  # no key: fail closed


def test_the_launcher_runs_the_checking_runner_with_the_operators_keys(tmp_path: Path) -> None:
    keys = make_app_key(tmp_path / "app key")
    launcher = apprunner.write_launcher(tmp_path / "state" / "fedspeaker-clientapp", app_keys=keys)
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o700
    text = launcher.read_text()
    assert "-m fedspeaker.deploy.apprunner" in text and str(keys.resolve()) in text
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert "runtime-api-address" in done.stdout  # Flower's flwr-clientapp behind the check


def test_superlink_listens_on_loopback_with_tls_and_node_authentication(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path / "certs", ["localhost"])
    options = SuperLinkOptions(certs=paths.folder, port=9999, superexec_secret=tmp_path / "run" / "secret")
    cmd = options.command()
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(paths.server_cert)
    # ServerApps are started (and reaped) by fedspeaker's SuperExec, which shares the secret
    assert cmd[cmd.index("--isolation") + 1] == "process"
    options.prepare()
    assert stat.S_IMODE(options.superexec_secret.stat().st_mode) == 0o600
    superexec = options.superexec_command(1234)
    assert superexec[:5] == [sys.executable, "-P", "-m", "fedspeaker.deploy.superexec", "--serverapp"]
    assert "127.0.0.1:9999" in superexec and str(paths.ca_cert) in superexec
    assert str(options.superexec_secret) in superexec and superexec[-2:] == ["--parent-pid", "1234"]
    with pytest.raises(FedSpeakerError, match="loopback only"):
        SuperLinkOptions(certs=paths.folder, host="0.0.0.0").command()
    insecure = SuperLinkOptions(certs=None, insecure=True, host="0.0.0.0").command()
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert insecure[insecure.index("--isolation") + 1] == "subprocess"  # Flower's SuperExec, as is
    with pytest.raises(FedSpeakerError, match="needs --certs"):
        SuperLinkOptions(certs=None).command()
    with pytest.raises(FedSpeakerError, match="fedspeaker certs"):
        SuperLinkOptions(certs=tmp_path / "nowhere").command()


def test_the_public_endpoint_forwards_only_the_fleet_api(tmp_path: Path) -> None:
    from flwr.superlink.routers.fleet.router import router

    # the routes a SuperNode calls, as Flower's own router lists them
    assert sorted(FLEET_ROUTES) == sorted(r.path.removeprefix("/v1/fleet/") for r in router.routes)
    paths = make_certificates(tmp_path / "certs", ["link.example.org"], operator=True)
    endpoint = PublicEndpoint(certs=paths, run_dir=tmp_path / "nginx", host="0.0.0.0", port=9093,
                              link_port=9092, operator_port=9095)
    config = endpoint.config()
    assert "proxy_pass https://flower_superlink/v1/fleet/$1;" in config
    assert "server 127.0.0.1:9092;" in config and "listen 0.0.0.0:9093 ssl;" in config
    assert "proxy_ssl_verify on;" in config and "ssl_verify_client on;" in config
    assert config.count("location / { return 404; }") == 2  # nothing else, on either server
    assert "runtime" not in config
    nginx_or_skip()
    endpoint.write()  # `nginx -t` accepts it


def test_supernode_checks_apps_in_process_isolation_on_its_own_folders(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path / "certs", ["localhost"])
    make_node_key(tmp_path / "key")
    app_keys = make_app_key(tmp_path / "app")
    (tmp_path / "my data").mkdir()
    base = dict(superlink="link:9093", data_dir=tmp_path / "my data", ca_cert=paths.ca_cert,
                key=tmp_path / "key", port=9200)
    options = SuperNodeOptions(**base, app_keys=app_keys, state_dir=tmp_path / "state")
    cmd = options.command()
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'data-dir="{tmp_path / "my data"}"' in node_config
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    options.prepare()
    secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    superexec = options.superexec_command(1234)
    assert superexec[:5] == [sys.executable, "-P", "-m", "fedspeaker.deploy.superexec", "--clientapp"]
    assert str(secret) in superexec and "127.0.0.1:9200" in superexec
    assert "supernode-9200" in str(SuperNodeOptions(**base, app_keys=app_keys).state)  # one per port
    with pytest.raises(FedSpeakerError, match="--app-key"):  # the check cannot be left out
        SuperNodeOptions(**base).command()
    with pytest.raises(FedSpeakerError, match="--key"):
        SuperNodeOptions(**{**base, "key": None}, app_keys=app_keys).command()
    with pytest.raises(FedSpeakerError, match="no such folder"):
        SuperNodeOptions(**{**base, "data_dir": tmp_path / "elsewhere"}, app_keys=app_keys).command()
    insecure = SuperNodeOptions(**{**base, "ca_cert": None, "key": None}, insecure=True).command()
    assert "--insecure" in insecure and insecure[insecure.index("--isolation") + 1] == "subprocess"


def test_the_superexec_starts_nothing_without_an_executable_runner(tmp_path: Path) -> None:
    from fedspeaker.deploy import superexec

    assert superexec.main(["--clientapp", str(tmp_path / "missing"), "--runtime-api-address", "x"]) == 1


def test_the_servers_superexec_starts_serverapps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.cli as flower_cli
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    from fedspeaker.deploy import superexec

    for task, command in list(TASK_TYPE_TO_COMMAND.items()):
        monkeypatch.setitem(TASK_TYPE_TO_COMMAND, task, command)  # restored after the test
    table: dict = {}
    monkeypatch.setattr(flower_cli, "flower_superexec", lambda: table.update(TASK_TYPE_TO_COMMAND))
    monkeypatch.setattr(superexec, "reap_finished_children", lambda: None)
    monkeypatch.setattr(sys, "argv", ["superexec"])
    assert superexec.main(["--serverapp", "--runtime-api-address", "127.0.0.1:1"]) == 0
    assert table[TaskType.SERVER_APP] == str(Path(sys.executable).parent / "flwr-serverapp")
    assert Path(table[TaskType.SERVER_APP]).is_file()
    assert all(table[t] == "/bin/false" for t in TaskType if t != TaskType.SERVER_APP)
    assert sys.argv == ["superexec", "--runtime-api-address", "127.0.0.1:1"]  # Flower's own arguments


def test_the_superexec_reaps_an_app_process_whose_handle_was_dropped() -> None:
    from fedspeaker.deploy.processes import _is_zombie
    from fedspeaker.deploy.superexec import reap_finished_children

    reap_finished_children(interval=0.1)
    pid = subprocess.Popen(["sleep", "0.3"]).pid  # dropped at once, as Flower's SuperExec does
    time.sleep(0.3)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "still <defunct>" if _is_zombie(pid) else "still running"


def test_insecure_mode_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: ran.append(cmd))
    assert cli.main(["superlink", "--insecure"]) == 0
    assert "NOT encrypted" in capsys.readouterr().err
    assert "--insecure" in ran[0]
    assert cli.main(["superlink", "--certs", str(tmp_path)]) == 2  # no certificates there
    assert "fedspeaker certs" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    assert cli.main(["supernode", "--superlink", "x:1", "--data-dir", str(tmp_path / "data"),
                     "--insecure"]) == 0
    assert "runs any app" in capsys.readouterr().err


def test_deployment_key_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["certs", "--out", str(tmp_path / "c"), "--host", "link.example.org", "--operator"]) == 0
    CertificatePaths(tmp_path / "c").require_server_files()
    CertificatePaths(tmp_path / "c").require_operator_client()
    assert cli.main(["node-key", str(tmp_path / "k" / "car")]) == 0
    assert "flwr supernode register car.pub" in capsys.readouterr().out
    assert cli.main(["app-key", str(tmp_path / "k" / "app")]) == 0
    assert "app.pub" in capsys.readouterr().out
    app = tiny_app(tmp_path / "app")
    assert cli.main(["sign-app", str(app), "--key", str(tmp_path / "k" / "app")]) == 0
    out, err = capsys.readouterr()
    fab = build_app(app)
    verify_fab(fab, out.strip(), load_public_keys(tmp_path / "k" / "app.pub"),
               claimed_hash=fab_digest(fab), fab_id="fedspeaker/tiny", fab_version="1.0.0")
    assert f"fab-signature='{out.strip()}'" in err
    private = (tmp_path / "k" / "app").read_text()
    assert private.strip().splitlines()[1] not in out + err  # the key itself is never printed


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


def test_the_superlink_command_starts_the_server_side_and_stops_all_of_it(tmp_path: Path) -> None:
    import signal

    from fedspeaker.deploy.flower import flower_env
    from fedspeaker.deploy.processes import child_process, free_ports

    nginx_or_skip()
    make_certificates(tmp_path / "certs", [])
    public, link = free_ports(2)
    cmd = [sys.executable, "-m", "fedspeaker.cli", "superlink", "--certs", str(tmp_path / "certs"),
           "--port", str(public), "--link-port", str(link), "--run-dir", str(tmp_path / "nginx")]
    with open(tmp_path / "out.log", "w") as log, child_process(cmd, flower_env(tmp_path), log) as server:
        deadline = time.monotonic() + 60
        while "server side up" not in (tmp_path / "out.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()
            time.sleep(0.2)
        server.remember_descendants()
        started = dict(server.seen)
        assert len(started) >= 3  # the SuperLink, nginx's master and worker (and Flower's SuperExec)
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        with socket_to(public, context) as tls:  # the public endpoint speaks TLS with our certificate
            assert tls.version()
        server.proc.send_signal(signal.SIGTERM)  # as `kill` or Ctrl-C
        assert server.proc.wait(timeout=60) == 130
        # the command itself stopped everything it started (before this test's own cleanup)
        assert not [pid for pid in started if server._alive(pid)]
    assert "every process this run started has been stopped" in (tmp_path / "out.log").read_text()


def socket_to(port: int, context: ssl.SSLContext):
    import socket

    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="127.0.0.1")


def test_ports_drawn_together_are_distinct_and_free() -> None:
    """Ray refused a node whose agent and metrics ports were handed the same free port."""
    import socket

    from fedspeaker.deploy.processes import free_ports

    for _ in range(20):
        ports = free_ports(12)
        assert len(set(ports)) == 12
        with socket.socket() as s:  # each is free to bind once the draw is over
            s.bind(("127.0.0.1", ports[0]))
