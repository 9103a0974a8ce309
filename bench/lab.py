"""The benchmark's world on loopback: upstream, OPA, Redis, the proxies under test, the peer.

:class:`Lab` owns a work directory (PKI, the issuer's JWKS, configs, audit files, logs,
vegeta's results) and a :class:`~bench.stack.Stack`; :meth:`Lab.close` stops everything and
deletes the directory.  Each ``add_*`` starts one scenario's server, waits until it is
ready and checks that the benchmark's request gets a 200 through it before anything is
measured.

The PEP runs as in production, every stage on: the mTLS listener (client certificate
required), bearer tokens from an ES256 issuer (keys from a ``jwks_file``) with the route
requiring a user, SPIFFE workload identity from the client certificate, Redis for risk
signals, containment and the L2 decision cache, and the audit log written to a real file.
Device posture is not configured: the request reads a ``config``-class secret, for which
the policy asks no posture.
"""

from __future__ import annotations

import compileall
import http.client
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from examples.pki import make_pki

from bench.common import (
    ADMIN_TOKEN,
    PATH,
    ROOT,
    free_port,
    free_port_pair,
    opa_argv,
    opa_environ,
    redis_ping,
    wait_http_sync,
    wait_tcp,
)
from bench.issuer import AUDIENCE, BenchIssuer
from bench.stack import Pinning, Side, Stack
from bench.vegeta import ClientTls
from vvault_pep.config.models import DEFAULT_MEMO_VOLATILE

CacheMode = Literal["l1", "l2", "off"]
AUDIT_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    proc: str | None  # the Stack process whose tree is the proxy (None: no proxy)
    admin_ports: tuple[int, ...] = ()  # a PEP's admin listeners, one per worker
    cold_tokens: bool = False  # a new token on every request
    verifies_tokens: bool = False  # a forged token must not get through


def compile_package(code: Path) -> None:
    """Bytecode for the ``vvault_pep`` package in ``code``, as a wheel or the image installs it.

    Without it a PEP started where ``PYTHONDONTWRITEBYTECODE`` is set (this lab's machine,
    ``.ci/run``) compiles every module from source at each start, and its memory then holds
    what compiling left behind (~1.5 MB of RSS) on top of what an installed PEP holds.
    """
    compileall.compile_dir(str(code / "vvault_pep"), quiet=1)


class Lab:
    def __init__(self, pinning: Pinning, *, prefix: str = "vvault-bench-") -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.stack = Stack(self.work, pinning)
        self.pki = make_pki(self.work / "pki")
        self.tls = ClientTls(
            root=self.pki / "ca.pem", cert=self.pki / "client-reader.pem", key=self.pki / "client-reader-key.pem"
        )
        self.issuer = BenchIssuer()
        self.issuer.serve()
        self.jwks = self.issuer.write_jwks(self.work / "jwks.json")
        self.token = self.issuer.token("bench-fixed")
        self.upstream_port = free_port()
        self.opa_port = free_port()
        # The PEPs ask OPA over a Unix socket, as deploy/ runs the sidecar; VVAULT_BENCH_OPA=tcp
        # makes them use loopback TCP instead (OPA listens on both; its health check is TCP).
        self.opa_socket = self.work / "opa.sock"
        self.opa_url = (
            f"http://127.0.0.1:{self.opa_port}"
            if os.environ.get("VVAULT_BENCH_OPA") == "tcp"
            else f"unix://{self.opa_socket}"
        )
        self.redis_port = free_port()
        self.cluster_ports: list[int] = []
        self.endpoints: dict[str, Endpoint] = {}

    # --- the shared services -------------------------------------------------------------

    def start_services(self) -> None:
        upstream = self.stack.start(
            "upstream",
            [sys.executable, "-m", "examples.vvault_api.app", "--port", str(self.upstream_port)],
            "driver",
            cwd=ROOT,
        )
        opa = self.stack.start("opa", opa_argv(self.opa_port, self.opa_socket), "sut", env=opa_environ())
        redis_dir = self.work / "redis"
        redis_dir.mkdir()
        redis = self.stack.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            "sut",
        )
        wait_http_sync(f"http://127.0.0.1:{self.upstream_port}/v1/tenants/acme/collections", alive=upstream)
        wait_http_sync(f"http://127.0.0.1:{self.opa_port}/health", alive=opa)
        redis_ping(self.redis_port, alive=redis)

    def start_cluster(self) -> str | None:
        """A three-master Redis Cluster for the ``*-cluster`` scenarios; None, or why not."""
        if self.cluster_ports:
            return None
        if shutil.which("redis-cli") is None:
            return "redis-cli not found (it creates the cluster)"
        ports = _cluster_ports(3)
        if not ports:
            return "no three free ports with their cluster-bus ports (+10000) free"
        where = self.work / "redis-cluster"
        where.mkdir()
        try:
            for port in ports:
                proc = self.stack.start(
                    f"redis-cluster-{port}",
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(where),
                     "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                     "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no"],
                    "sut",
                )  # fmt: skip
                redis_ping(port, alive=proc)
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            for port in ports:
                _cluster_ok(port)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return f"the cluster did not start: {exc}"
        self.cluster_ports = ports
        return None

    # --- scenarios -----------------------------------------------------------------------

    def add_direct(self) -> Endpoint:
        return self._add(Endpoint("direct", f"http://127.0.0.1:{self.upstream_port}{PATH}", None))

    def add_passthrough(self) -> Endpoint:
        port = free_port()
        proc = self.stack.start(
            "passthrough",
            [
                sys.executable,
                "-m",
                "bench.passthrough",
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{self.upstream_port}",
                "--pki",
                str(self.pki),
            ],
            "sut",
            cwd=ROOT,
        )
        wait_tcp(port, alive=proc)
        return self._add(Endpoint("passthrough", f"https://127.0.0.1:{port}{PATH}", "passthrough"))

    def add_pep(
        self,
        name: str,
        cache: CacheMode,
        *,
        workers: int | None = None,
        cold_tokens: bool = False,
        side: Side = "sut",
        code: Path | None = None,
        cluster: bool = False,
        env: dict[str, str] | None = None,
    ) -> Endpoint:
        """A PEP; ``code``: a directory holding another ``vvault_pep`` package to run instead
        (``env``: variables it runs with, such as ``VVAULT_PEP_PURE``);
        ``cluster``: on the Redis Cluster of :meth:`start_cluster` instead of the standalone."""
        compile_package(code or ROOT / "proxy")
        config = self.pep_config(name, cache)
        if not _knows_volatile_headers(code or ROOT / "proxy") or os.environ.get("VVAULT_BENCH_MEMO") == "exact":
            del config["listener"]["memo_volatile_headers"]  # an older revision's PEP, or asked for
        if cluster:
            nodes = [f"127.0.0.1:{p}" for p in self.cluster_ports]
            config["redis"] = {"url": f"redis://{nodes[0]}", "mode": "cluster", "nodes": nodes[1:]}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path), "--log-level", "WARNING"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        extra = {**(env or {}), **({"PYTHONPATH": str(code)} if code is not None else {})}
        proc = self.stack.start(name, argv, side, cwd=ROOT, env={**os.environ, **extra} if extra else None)
        admin_ports = tuple(config["admin"]["port"] + k for k in range(workers or 1))
        try:
            for port in admin_ports:
                wait_http_sync(f"http://127.0.0.1:{port}/readyz", alive=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{self.stack.log_tail(name)}") from exc
        url = f"https://127.0.0.1:{config['listener']['port']}{PATH}"
        return self._add(Endpoint(name, url, name, admin_ports, cold_tokens, verifies_tokens=True))

    def pep_config(self, name: str, cache: CacheMode) -> dict[str, Any]:
        pki = self.pki
        route_cache: dict[str, Any] | str = "off" if cache == "off" else {"ttl_s": 300}
        return {
            "listener": {
                "host": "127.0.0.1",
                "port": free_port(),
                "drain_s": 0,
                # vegeta numbers every request (X-Vegeta-Seq), as many clients send a request id:
                # named beside the defaults, as an operator names their clients' own.
                "memo_volatile_headers": [*DEFAULT_MEMO_VOLATILE, "x-vegeta-seq"],
                "tls": {
                    "cert_file": str(pki / "server.pem"),
                    "key_file": str(pki / "server-key.pem"),
                    "client_ca_file": str(pki / "ca.pem"),
                    "client_auth": "required",
                },
            },
            "admin": {"host": "127.0.0.1", "port": free_port_pair(), "token": ADMIN_TOKEN},
            "opa": {"url": self.opa_url},
            "redis": {"url": f"redis://127.0.0.1:{self.redis_port}/0"},
            "identity": {
                "issuers": [
                    {
                        "name": "bench",
                        "issuer": self.issuer.url,
                        "audiences": [AUDIENCE],
                        "algorithms": ["ES256"],
                        "discovery": False,
                        "jwks_file": str(self.jwks),
                        "allow_http": True,  # the issuer helper is plain HTTP on loopback
                        "required_claims": ["sub", "tenant"],
                    }
                ],
                "workload": {"trust_domains": ["demo.vvault"]},
            },
            "cache": {"l1_max_entries": 0 if cache == "l2" else 10_000, "default_ttl_s": 300, "max_ttl_s": 300},
            "audit": {
                "sinks": [
                    {"type": "file", "path": str(self.work / f"audit-{name}.jsonl"), "max_bytes": AUDIT_MAX_BYTES}
                ]
            },
            "upstreams": {"vvault": {"url": f"http://127.0.0.1:{self.upstream_port}"}},
            "routes": [
                {
                    "name": "secrets",
                    "path": "/v1/tenants/{tenant}/secrets/{path*}",
                    "methods": ["GET"],
                    "upstream": "vvault",
                    "policy": "vvault/authz/decision",
                    "authn": {"require": "user"},
                    "cache": route_cache,
                }
            ],
        }

    def add_caddy(self, binary: str) -> Endpoint:
        """Caddy as a bare mTLS reverse proxy: the best-known proxy of another stack.

        The same server certificate, client certificates required and verified against the
        same CA, HTTP/1.1 only, keep-alive to the upstream, no access log, no admin endpoint.
        vegeta sends no SNI to an IP address, so ``strict_sni_host`` is off and the one
        certificate is every connection's default.
        """
        port = free_port()
        pki = self.pki
        config = {
            "admin": {"disabled": True},
            "logging": {"logs": {"default": {"level": "ERROR"}}},
            "storage": {"module": "file_system", "root": str(self.work / "caddy-data")},
            "apps": {
                "tls": {
                    "certificates": {
                        "load_files": [
                            {
                                "certificate": str(pki / "server.pem"),
                                "key": str(pki / "server-key.pem"),
                                "tags": ["bench"],
                            }
                        ]
                    },
                    "disable_ocsp_stapling": True,
                },
                "http": {
                    "servers": {
                        "bench": {
                            "listen": [f"127.0.0.1:{port}"],
                            "protocols": ["h1"],
                            "strict_sni_host": False,
                            "automatic_https": {"disable": True},
                            "tls_connection_policies": [
                                {
                                    "certificate_selection": {"any_tag": ["bench"]},
                                    "protocol_min": "tls1.2",
                                    "client_authentication": {
                                        "ca": {"provider": "file", "pem_files": [str(pki / "ca.pem")]},
                                        "mode": "require_and_verify",
                                    },
                                }
                            ],
                            "routes": [
                                {
                                    "handle": [
                                        {
                                            "handler": "reverse_proxy",
                                            "upstreams": [{"dial": f"127.0.0.1:{self.upstream_port}"}],
                                        }
                                    ]
                                }
                            ],
                        }
                    }
                },
            },
        }
        path = self.work / "caddy.json"
        path.write_text(json.dumps(config))
        proc = self.stack.start(
            "caddy", [binary, "run", "--config", str(path)], "sut", env={**os.environ, "HOME": str(self.work)}
        )
        try:
            wait_tcp(port, alive=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"caddy did not start: {exc}\n{self.stack.log_tail('caddy')}") from exc
        return self._add(Endpoint("caddy", f"https://127.0.0.1:{port}{PATH}", "caddy"))

    def add_peer(self, binary: str) -> Endpoint:
        """oauth2-proxy validating the same tokens (OIDC discovery of the issuer helper) and forwarding.

        It terminates TLS but does not ask for client certificates: less work per connection
        than the PEP and the passthrough, which verify one.
        """
        port = free_port()
        pki = self.pki
        proc = self.stack.start(
            "peer",
            [
                binary,
                "--provider=oidc",
                f"--oidc-issuer-url={self.issuer.url}",
                f"--client-id={AUDIENCE}",
                "--client-secret=bench-client-secret",
                "--cookie-secret=0123456789abcdef0123456789abcdef",
                "--email-domain=*",
                "--skip-jwt-bearer-tokens",
                f"--upstream=http://127.0.0.1:{self.upstream_port}/",
                f"--http-address=127.0.0.1:{free_port()}",
                f"--https-address=127.0.0.1:{port}",
                f"--tls-cert-file={pki / 'server.pem'}",
                f"--tls-key-file={pki / 'server-key.pem'}",
                f"--redirect-url=https://127.0.0.1:{port}/oauth2/callback",
                # its request log to a file, like the PEP's audit log
                f"--logging-filename={self.work / 'peer-requests.log'}",
                "--silence-ping-logging",
            ],
            "sut",
        )
        try:
            wait_tcp(port, alive=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"peer did not start: {exc}\n{self.stack.log_tail('peer')}") from exc
        return self._add(Endpoint("peer", f"https://127.0.0.1:{port}{PATH}", "peer", verifies_tokens=True))

    def _add(self, endpoint: Endpoint) -> Endpoint:
        self.check(endpoint)
        self.endpoints[endpoint.name] = endpoint
        return endpoint

    def check(self, endpoint: Endpoint) -> None:
        """The benchmark's request must get a 200, and a forged token must not, or nothing is measured."""
        status, body = self.request(endpoint.url, self.token)
        if status != 200:
            log = self.stack.log_tail(endpoint.proc) if endpoint.proc else ""
            raise RuntimeError(f"{endpoint.name}: HTTP {status} for the benchmark's request: {body[:500]!r}\n{log}")
        if endpoint.verifies_tokens:
            header, payload, signature = self.token.split(".")
            forged = f"{header}.{payload}.{signature[::-1]}"
            status, body = self.request(endpoint.url, forged)
            if status == 200:
                raise RuntimeError(f"{endpoint.name}: a token with a bad signature got HTTP 200: it checks nothing")

    def request(self, url: str, token: str) -> tuple[int, bytes]:
        scheme, _, rest = url.partition("://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        conn: http.client.HTTPConnection
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=str(self.tls.root))
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        else:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/" + path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admin_get(self, endpoint: Endpoint, path: str) -> Any:
        out = []
        for port in endpoint.admin_ports:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                out.append(json.loads(resp.read()))
        return out

    def close(self) -> None:
        try:
            self.stack.stop_all()
        finally:
            self.issuer.stop()
            shutil.rmtree(self.work, ignore_errors=True)


def _knows_volatile_headers(tree: Path) -> bool:
    """Whether the ``vvault_pep`` under ``tree`` (a revision's, or this one) takes
    ``listener.memo_volatile_headers``: older revisions refuse a key they do not know."""
    return "memo_volatile_headers" in (tree / "vvault_pep" / "config" / "models.py").read_text()


def _cluster_ports(n: int) -> list[int]:
    """n ports, each with its cluster-bus port (port + 10000) free too."""
    found: list[int] = []
    for _ in range(200):
        port = random.randint(20_000, 40_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        if port not in found:
            found.append(port)
        if len(found) == n:
            return found
    return []


def _cluster_ok(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, timeout=5)
        if b"cluster_state:ok" in res.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"cluster node {port} never reported cluster_state:ok")
