"""What every benchmark shares: the repo's paths, free ports, the OPA binary, readiness waits."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "bin"
# The one request every benchmark sends: a read the repo's policy allows for tenant acme.
PATH = "/v1/tenants/acme/secrets/db-password"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port p such that p + 1 is free too (a second worker's admin listener takes p + 1)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on loopback")


def tool(name: str, env: str | None = None) -> str | None:
    """A tool from $ENV, then .tools/bin (where `make tools` / `make bench-tools` put it), then PATH."""
    for candidate in (os.environ.get(env) if env else None, str(TOOLS / name), shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def opa_binary() -> str:
    binary = tool("opa", "OPA_BIN")
    if binary is None:
        sys.exit("OPA not found: run `make tools`")
    return binary


def opa_argv(port: int, socket: Path | None = None, policies: Path = ROOT / "policies") -> list[str]:
    """The real OPA server on loopback with the repo's policies, or ``policies`` (and on
    ``socket``, if given)."""
    return [
        opa_binary(),
        "run",
        "--server",
        "--addr",
        f"127.0.0.1:{port}",
        *(("--addr", f"unix://{socket}") if socket is not None else ()),
        "--skip-version-check",
        "--log-level",
        "error",
        str(policies),
    ]


def opa_environ() -> dict[str, str]:
    """OPA's environment as deployed: Go's collector set as in deploy/ (GOGC, GOMEMLIMIT)."""
    return {**os.environ, "GOGC": "400", "GOMEMLIMIT": "200MiB"}


def start_opa(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(opa_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=opa_environ())


async def wait_http(url: str, timeout: float = 30) -> None:
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


def wait_http_sync(url: str, timeout: float = 30, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until ``url`` answers 200; give up early when the process that should answer died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with status {alive.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


def wait_tcp(port: int, timeout: float = 30, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"port {port}: the process exited with status {alive.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def redis_ping(port: int, timeout: float = 20, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {alive.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")
