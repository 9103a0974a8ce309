"""Helpers shared by the tests: real OPA processes, raw TLS requests, configs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vvault_pep.config import Config

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
TEST_POLICIES = ROOT / "tests" / "policies"
_T = TypeVar("_T")


def run_on_own_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on a loop of its own: ``asyncio.run`` would unset the thread's loop that
    other tests' fixtures read."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def opa_binary() -> str:
    for candidate in (os.environ.get("OPA_BIN"), str(ROOT / ".tools" / "bin" / "opa"), shutil.which("opa")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError("OPA not found: run `make tools` (builds it into .tools/bin) or set OPA_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OpaProcess:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_opa(addr: str | None = None, paths: tuple[Path, ...] = (POLICIES, TEST_POLICIES)) -> OpaProcess:
    """Start the real OPA server on loopback (or a unix:// socket) and wait for /health."""
    for _attempt in range(3):
        listen = addr or f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen(
            [
                opa_binary(),
                "run",
                "--server",
                "--addr",
                listen,
                "--skip-version-check",
                "--log-level",
                "error",
                *map(str, paths),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        url = listen if listen.startswith("unix://") else f"http://{listen}"
        if _wait_healthy(proc, url):
            return OpaProcess(proc, url)
        proc.kill()
        proc.wait()
    raise RuntimeError("OPA did not start")


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if url.startswith("unix://"):
            if Path(url.removeprefix("unix://")).exists():
                return True
        else:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=0.5) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
        time.sleep(0.05)
    return False


def client_context(pki: Path, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if name is not None:
        ctx.load_cert_chain(str(pki / f"client-{name}.pem"), str(pki / f"client-{name}-key.pem"))
    return ctx


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_https(port: int, ctx: ssl.SSLContext, request: bytes, timeout: float = 10) -> RawResponse:
    """Send bytes exactly as given over TLS and parse one response (Connection: close)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read(-1)
        finally:
            writer.close()
    if not data:
        raise ConnectionResetError("the server closed the connection without answering")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return RawResponse(status, headers, body)


def get(path: str, *extra: str, host: str = "localhost") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


ROUTES: list[dict[str, Any]] = [
    {
        "name": "sets_user",
        "path": "/v1/tenants/{tenant}/stream/{n}",
        "host": "user.test",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/sets_user",
    },
    {
        "name": "secrets",
        "path": "/v1/tenants/{tenant}/secrets/{path*}",
        "methods": ["GET", "HEAD", "PUT", "DELETE"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
    },
    {
        "name": "collection_query",
        "path": "/v1/tenants/{tenant}/collections/{collection}/query",
        "methods": ["POST"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
    },
    {
        "name": "admin",
        "path": "/v1/admin/{path*}",
        "methods": ["GET", "POST"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
    },
    # test routes, each driving one decision shape from tests/policies/faults.rego
    {
        "name": "open_blobs",
        "path": "/v1/tenants/{tenant}/blobs/{name}",
        "methods": ["GET", "PUT"],
        "upstream": "vvault",
        "policy": "faults/allow_with_headers",
    },
    {
        "name": "open_stream",
        "path": "/v1/tenants/{tenant}/stream/{n}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
    },
    {
        "name": "monitor",
        "path": "/monitor/v1/tenants/{tenant}/secrets/{path*}",
        "methods": ["GET"],
        "upstream": "vvault_prefixed",
        "policy": "faults/plain_false",
        "mode": "monitor",
    },
    {
        "name": "undefined",
        "path": "/undefined/{rest*}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "vvault/nonexistent/decision",
    },
    {"name": "fault", "path": "/fault/{shape}", "methods": ["GET"], "upstream": "vvault", "policy": "faults/conflict"},
    {"name": "down", "path": "/down/{rest*}", "methods": ["GET"], "upstream": "down", "policy": "faults/plain_true"},
    {"name": "hang", "path": "/hang/{rest*}", "methods": ["GET"], "upstream": "hang", "policy": "faults/plain_true"},
]
SHAPES = [
    "plain_false",
    "string_decision",
    "allow_as_string",
    "status_out_of_range",
    "status_as_bool",
    "crlf_header",
    "reserved_header",
    "obligation",
    "custom_status",
    "conflict",
]
for shape in SHAPES:
    ROUTES.append(
        {
            "name": f"shape_{shape}",
            "path": f"/shape/{shape}",
            "methods": ["GET"],
            "upstream": "vvault",
            "policy": f"faults/{shape}",
        }
    )


def make_config(pki: Path, **kwargs: Any) -> Config:
    return Config.model_validate(config_doc(pki, **kwargs))


def config_doc(
    pki: Path,
    *,
    opa_url: str,
    upstream_port: int,
    hang_port: int = 9,
    down_port: int = 9,
    listener: dict[str, Any] | None = None,
    opa: dict[str, Any] | None = None,
    cache: bool = False,
    **sections: Any,
) -> dict[str, Any]:
    tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server-key.pem"),
        "client_ca_file": str(pki / "ca.pem"),
        "client_auth": "required",
    }
    doc: dict[str, Any] = {
        "listener": {"host": "127.0.0.1", "port": 0, "tls": tls, **(listener or {})},
        "admin": {"host": "127.0.0.1", "port": 0},
        "opa": {"url": opa_url, "timeout_ms": 500, **(opa or {})},
        "upstreams": {
            "vvault": {"url": f"http://127.0.0.1:{upstream_port}"},
            "vvault_prefixed": {"url": f"http://127.0.0.1:{upstream_port}"},
            "down": {"url": f"http://127.0.0.1:{down_port}", "connect_timeout_s": 1},
            "hang": {"url": f"http://127.0.0.1:{hang_port}", "read_timeout_s": 0.5},
        },
        "routes": ROUTES,
        **sections,
    }
    # Most tests drive the policy with callers of every kind, anonymous ones included:
    # a route that does not say what it requires lets anyone reach the policy here.
    doc["routes"] = [{**r, "authn": r.get("authn", {"require": "none"})} for r in doc["routes"]]
    if not cache:
        # Most tests are about what OPA answers now: ask it every time.
        doc["routes"] = [{**r, "cache": r.get("cache", "off")} for r in doc["routes"]]
    if "tls" in (listener or {}):
        doc["listener"]["tls"] = {**tls, **listener["tls"]}  # type: ignore[index]
    return doc


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    drain: asyncio.Task[bytes]
    admin_ports: tuple[int, ...] = ()


STARTED: list[asyncio.subprocess.Process] = []  # killed after each test if still running (conftest)


async def start_serve(
    config_path: Path,
    *,
    timeout: float = 30,
    workers: int = 1,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """`vvault-pep serve` as a user starts it; returns once it (every worker) says where it listens."""
    import re
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vvault_pep.cli",
        "serve",
        "--config",
        str(config_path),
        "--log-level",
        "WARNING",
        *(("--workers", str(workers)) if workers > 1 else ()),
        *extra,
        env={**os.environ, **env} if env is not None else None,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    STARTED.append(proc)
    assert proc.stderr is not None
    found: list[re.Match[str]] = []
    said: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < workers:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("vvault-pep exited before listening:\n" + "".join(said))
                said.append(line)
                if m := re.search(r"mTLS on [^:]+:(\d+), admin on [^:]+:(\d+)", line):
                    found.append(m)
    except BaseException:
        # Never leave a PEP behind (its workers follow their supervisor).
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    # keep reading stderr so the child never blocks on a full pipe
    drain = asyncio.create_task(proc.stderr.read(), name="drain-pep-stderr")
    admin_ports = tuple(sorted(int(m.group(2)) for m in found))
    return ServeProcess(proc, int(found[0].group(1)), admin_ports[0], drain, admin_ports)
