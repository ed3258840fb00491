"""The server's public endpoint: nginx in front of a SuperLink that listens on 127.0.0.1.

flwr 1.41's SuperLink serves every API on one HTTPS port: the Fleet API the devices
use (/v1/fleet/*), and the Control API (register nodes, launch, stop and list runs) and
Runtime API (hands out ServerApp tasks and app bundles) that authenticate no caller in
this distribution. So the SuperLink listens on 127.0.0.1 only, and nginx terminates
TLS on the public address and forwards exactly the Fleet routes a SuperNode calls, as
POSTs, with the path rebuilt from the route's name; everything else gets 404 from
nginx. Optionally a second nginx server opens the Control API to a client certificate
from the operator CA (mutual TLS). The SuperLink's own certificate is checked against
the federation CA on the way in.

nginx runs as a child process (``daemon off``) with its configuration, pid file and
logs in a folder of its own, so it needs no system service and no root.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedspeaker.deploy.certs import CertificatePaths
from fedspeaker.errors import FedSpeakerError

# flwr/superlink/routers/fleet/router.py: every route the SuperNode's Fleet client calls
# (tests/test_deploy.py checks this list against Flower's router)
FLEET_ROUTES = (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
)
NGINX_PLACES = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/opt/homebrew/bin")
INSTALL_HINT = "install it (Debian/Ubuntu: sudo apt-get install nginx-light)"

_HTTP = """\
# written by `fedspeaker superlink`; nginx runs it as a child: nginx -c THIS -g 'daemon off;'
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 512; }}

http {{
    log_format fleet '$remote_addr "$request" $status $body_bytes_sent uri=$uri up=$upstream_addr';
    access_log {run}/access.log fleet;
    server_tokens off;
    client_body_temp_path {run}/tmp/body;
    proxy_temp_path {run}/tmp/proxy;
    fastcgi_temp_path {run}/tmp/fastcgi;
    uwsgi_temp_path {run}/tmp/uwsgi;
    scgi_temp_path {run}/tmp/scgi;

    upstream flower_superlink {{
        server 127.0.0.1:{link_port};
        keepalive 16;
    }}
    # Re-encrypt to the SuperLink and check its certificate (loopback names) against our CA.
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_verify on;
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    # Bodies stream through and replies stay in memory: no temporary files to write.
    proxy_request_buffering off;
    proxy_max_temp_file_size 0;
    # Flower sends model arrays in chunks of at most 5 MiB.
    client_max_body_size 16m;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:fedspeaker:1m;

    # Devices: only the Fleet routes, only POST. The upstream path is rebuilt from the
    # route's name, so whatever the request's path was, the SuperLink sees
    # /v1/fleet/<a known route>. Every other path is answered here with 404.
    server {{
        listen {public} ssl;
        ssl_certificate     {public_cert};
        ssl_certificate_key {public_key};
        location ~ ^/v1/fleet/({routes})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://flower_superlink/v1/fleet/$1;
        }}
        location / {{ return 404; }}
    }}
{operator}}}
"""

_OPERATOR = """
    # The operator: the Control API, only with a client certificate from the operator CA
    # (devices hold none; the federation CA that signed theirs is not trusted here).
    server {{
        listen {listen} ssl;
        ssl_certificate        {public_cert};
        ssl_certificate_key    {public_key};
        ssl_client_certificate {operator_ca};
        ssl_verify_client on;
        ssl_verify_depth 1;
        location ~ ^/v1/control/([a-z0-9-]+)$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://flower_superlink/v1/control/$1;
            proxy_buffering off;        # `flwr log --stream`, `flwr run --stream`
            proxy_read_timeout 3600s;
        }}
        location / {{ return 404; }}
    }}
"""

_SIDECAR = """\
# written by `fedspeaker operator-proxy`; runs on the operator's machine
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 64; }}

http {{
    access_log {run}/access.log;
    server_tokens off;
    client_body_temp_path {run}/tmp/body;
    proxy_temp_path {run}/tmp/proxy;
    fastcgi_temp_path {run}/tmp/fastcgi;
    uwsgi_temp_path {run}/tmp/uwsgi;
    scgi_temp_path {run}/tmp/scgi;
    client_max_body_size 16m;
    proxy_request_buffering off;
    proxy_max_temp_file_size 0;

    # `flwr` cannot present a client certificate: it talks to this loopback listener,
    # which adds the operator's certificate on the way to the server's operator endpoint.
    server {{
        listen {listen};
        location ~ ^/v1/control/([a-z0-9-]+)$ {{
            proxy_pass https://{server}/v1/control/$1;
            proxy_http_version 1.1;
            proxy_ssl_certificate     {operator_cert};
            proxy_ssl_certificate_key {operator_key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {server_name};
            proxy_ssl_server_name on;
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def find_nginx() -> str:
    """nginx's path (it lives in sbin folders, often not on a user's PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *NGINX_PLACES])
    found = shutil.which("nginx", path=search)
    if not found:
        raise FedSpeakerError(f"nginx not found; the server's public endpoint needs it: {INSTALL_HINT}")
    return found


@dataclass(frozen=True, kw_only=True)
class PublicEndpoint:
    """nginx's part of the server side."""

    certs: CertificatePaths
    run_dir: Path  # nginx's configuration, pid file, logs
    host: str = "127.0.0.1"  # where devices connect (0.0.0.0: every address of the machine)
    port: int = 9093
    link_port: int = 9092  # the SuperLink on 127.0.0.1
    operator_port: int | None = None  # the operator's mutual-TLS endpoint, on ``host`` too

    @property
    def config_path(self) -> Path:
        return self.run_dir / "nginx.conf"

    def config(self) -> str:
        certs = CertificatePaths(self.certs.folder.resolve())  # nginx reads paths from its own prefix
        operator = ""
        if self.operator_port is not None:
            operator = _OPERATOR.format(listen=_listen(self.host, self.operator_port),
                                        public_cert=certs.public_cert, public_key=certs.public_key,
                                        operator_ca=certs.operator_ca_cert)
        return _HTTP.format(run=self.run_dir.resolve(), link_port=self.link_port, ca=certs.ca_cert,
                            public=_listen(self.host, self.port), public_cert=certs.public_cert,
                            public_key=certs.public_key, routes="|".join(FLEET_ROUTES),
                            operator=operator)

    def write(self) -> Path:
        """Write the configuration and check it with ``nginx -t``; its path."""
        self.certs.require_server_files()
        if self.operator_port is not None:
            self.certs.require_operator_ca()
        return _write_checked(self.run_dir, self.config())

    def command(self) -> list[str]:
        return _command(self.run_dir)


@dataclass(frozen=True, kw_only=True)
class OperatorProxy:
    """On the operator's machine: a loopback listener for `flwr` that forwards the
    Control API to the server's operator endpoint with the operator's client certificate."""

    certs: CertificatePaths  # holds ca.crt, operator.crt, operator.key
    server: str  # host:port of the server's operator endpoint
    run_dir: Path
    port: int = 9092  # `flwr` connects to 127.0.0.1:port with insecure = true

    def config(self) -> str:
        certs = CertificatePaths(self.certs.folder.resolve())
        name = self.server.rsplit(":", 1)[0].strip("[]")
        if _is_ip(name):
            # nginx checks only DNS names; every certificate our federation CA signs (the
            # server's two) names localhost, and only that CA is trusted here
            name = "localhost"
        return _SIDECAR.format(run=self.run_dir.resolve(), listen=f"127.0.0.1:{self.port}",
                               server=self.server, server_name=name, operator_cert=certs.operator_cert,
                               operator_key=certs.operator_key, ca=certs.ca_cert)

    def write(self) -> Path:
        self.certs.require_operator_client()
        if ":" not in self.server:
            raise FedSpeakerError(f"--server {self.server}: give HOST:PORT of the operator endpoint")
        return _write_checked(self.run_dir, self.config())

    def command(self) -> list[str]:
        return _command(self.run_dir)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if _is_ip(host) and ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


def _command(run_dir: Path) -> list[str]:
    run_dir = run_dir.resolve()
    return [find_nginx(), "-c", str(run_dir / "nginx.conf"), "-e", str(run_dir / "error.log"),
            "-g", "daemon off;"]


def _write_checked(run_dir: Path, config: str) -> Path:
    run_dir = run_dir.resolve()
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    path = run_dir / "nginx.conf"
    path.write_text(config)
    check = subprocess.run([*_command(run_dir)[:-2], "-t", "-q"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    if check.returncode:
        raise FedSpeakerError(f"nginx refuses its configuration {path}:\n{check.stderr.strip()}")
    return path
