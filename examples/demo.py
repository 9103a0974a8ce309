"""`make demo` / `make demo-check`: the example upstream, OPA and the PEP, together.

    python -m examples.demo            # run until Ctrl-C, print curl commands
    python -m examples.demo --check    # send requests itself, exit 0 only if all behave

The PEP runs with `examples/config/demo.yaml` and supervises OPA itself
(`opa.managed: true`).  A fresh demo PKI is written to `.demo/pki` (`--check` uses a
temporary one, so it never disturbs a demo that is running).

Ports: `make demo` uses 8443 (PEP), 9901 (admin), 8181 (OPA) and 8080 (upstream), each
overridable (`PEP_PORT=18443 make demo`), and refuses in one line when one is taken;
`--check` always takes free ones.  Ready means: each child said it is listening on its
port (no other process can hold a port it bound), and the PEP's /readyz, on the admin
port it bound, answers 200 — so the demo never mistakes another demo for its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

from examples.pki import make_pki

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "config" / "demo.yaml"
ALLOWED = "/v1/tenants/acme/secrets/db-password"
DENIED = "/v1/tenants/globex/secrets/db-password"
DEFAULT_PORTS = {"PEP_PORT": 8443, "PEP_ADMIN_PORT": 9901, "OPA_PORT": 8181, "UPSTREAM_PORT": 8080}
READY_TIMEOUT_S = 60.0
PEP_STARTED = re.compile(r"^vvault-pep \S+: mTLS on \S+:(\d+), admin on \S+:(\d+)")
UPSTREAM_STARTED = re.compile(r"^vvault example API: listening on \S+:(\d+)")
# a value for each template variable, to send one request per route and method
SAMPLE_PARAMS = {"tenant": "acme", "path": "db-password", "collection": "docs", "name": "report.pdf"}


class DemoError(Exception):
    """Stops the demo with one line (no traceback)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        # as the servers bind: a port with only TIME_WAIT connections left is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def choose_ports(check: bool, environ: dict[str, str]) -> dict[str, int]:
    if check:  # never collide with anything already running
        return {name: _free_port() for name in DEFAULT_PORTS}
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        try:
            ports[name] = int(environ.get(name, default))
        except ValueError:
            raise DemoError(f"{name}={environ[name]!r} is not a port number") from None
    taken = {name: port for name, port in ports.items() if _in_use(port)}
    if taken:
        listed = ", ".join(f"{port} ({name})" for name, port in taken.items())
        other = " ".join(f"{name}={port + 10000 if port < 55535 else _free_port()}" for name, port in taken.items())
        raise DemoError(
            f"port{'s' if len(taken) > 1 else ''} {listed} already in use (another demo running?): "
            f"stop it, or choose free ports, e.g. {other} make demo"
        )
    return ports


def _opa_binary() -> str:
    for candidate in (os.environ.get("OPA_BIN"), str(ROOT / ".tools" / "bin" / "opa"), shutil.which("opa")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise DemoError("OPA not found: run `make tools` first (or set OPA_BIN)")


async def _started(
    name: str, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader, pattern: re.Pattern[str]
) -> re.Match[str]:
    """Read the child's output until it says it is listening; on exit, its last line."""
    last = ""
    while True:
        raw = await stream.readline()
        if not raw:
            await proc.wait()
            raise DemoError(f"{name} exited with status {proc.returncode} before listening: {last or 'no output'}")
        line = raw.decode(errors="replace").rstrip()
        if match := pattern.match(line):
            return match
        if line.strip() and not line.startswith(" "):  # keep a traceback's last line, not its frames
            last = line.strip()


async def _pump(stream: asyncio.StreamReader, out: int) -> None:
    """Pass a child's output on once it has started (its warnings, the PEP's log lines)."""
    while raw := await stream.readline():
        os.write(out, raw)


async def _wait_ready(admin_port: int, proc: asyncio.subprocess.Process) -> None:
    last = "no answer"
    async with aiohttp.ClientSession() as http:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise DemoError(f"vvault-pep exited with status {proc.returncode} while starting")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                timeout = aiohttp.ClientTimeout(total=2)
                async with http.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=timeout) as resp:
                    if resp.status == 200:
                        return
                    last = f"{resp.status} {await resp.text()}"
            await asyncio.sleep(0.1)
    raise DemoError(f"vvault-pep did not become ready within {READY_TIMEOUT_S:.0f}s: /readyz said {last}")


def _client(pki: Path) -> aiohttp.ClientSession:
    # the CA of this run's fresh PKI: only the PEP this demo started holds its server key
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "client-reader.pem"), str(pki / "client-reader-key.pem"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def _send(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, str]:
    body = b"{}" if method in ("PUT", "POST") else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    async with http.request(method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


def route_samples() -> list[tuple[str, str, str]]:
    """(route, method, path) for every method of every route in the demo config."""
    routes = yaml.safe_load(CONFIG.read_text())["routes"]
    out = []
    for route in routes:
        path = re.sub(r"\{(\w+)\*?\}", lambda m: SAMPLE_PARAMS.get(m.group(1), "x"), route["path"])
        out += [(route["name"], method, path) for method in route.get("methods", ["GET", "HEAD"])]
    return out


async def _check(port: int, pki: Path) -> bool:
    base = f"https://localhost:{port}"
    async with _client(pki) as http:
        allowed_status, allowed_body = await _send(http, "GET", base + ALLOWED)
        denied_status, denied_body = await _send(http, "GET", base + DENIED)
        print(f"GET {ALLOWED} -> {allowed_status} {allowed_body}")
        print(f"GET {DENIED} -> {denied_status} {denied_body}")
        forwarded = allowed_status == 200 and '"value"' in allowed_body
        denied = denied_status == 403 and "policy.tenant_not_entitled" in denied_body
        # Every route the demo serves is one the shipped policy knows: none ends as unknown.
        unknown = []
        samples = route_samples()
        for name, method, path in samples:
            status, body = await _send(http, method, base + path)
            if "policy.unknown_operation" in body or status >= 500:
                unknown.append(f"{method} {path} ({name}) -> {status}")
        print(
            f"{len(samples)} method/route pairs of the demo config: "
            + (f"NOT decidable by the policy: {'; '.join(unknown)}" if unknown else "all decided by the policy")
        )
    return forwarded and denied and not unknown


async def main(check: bool) -> int:
    ports = choose_ports(check, dict(os.environ))
    opa = _opa_binary()
    pki = Path(tempfile.mkdtemp(prefix="vvault-demo-pki-")) if check else ROOT / ".demo" / "pki"
    make_pki(pki)
    env = {
        **os.environ,
        "OPA_BIN": opa,
        "PEP_PKI": str(pki),
        "PYTHONUNBUFFERED": "1",
        **{k: str(v) for k, v in ports.items()},
    }
    print("starting the example upstream, OPA (managed by the PEP) and vvault-pep …", flush=True)
    procs: list[asyncio.subprocess.Process] = []
    pumps: list[asyncio.Task[None]] = []
    try:
        upstream = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "examples.vvault_api.app", "--port", str(ports["UPSTREAM_PORT"]),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.append(upstream)
        assert upstream.stdout is not None
        await _started("the example upstream", upstream, upstream.stdout, UPSTREAM_STARTED)
        pumps.append(asyncio.create_task(_pump(upstream.stdout, 2), name="demo-upstream-output"))
        pep = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(CONFIG), "--log-level", "WARNING",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL if check else None, stderr=asyncio.subprocess.PIPE,
            # its own session: a terminal's Ctrl-C reaches the demo only, which stops the PEP
            # with SIGTERM, and the PEP stops its OPA in turn (nothing is killed mid-drain)
            start_new_session=True,
        )  # fmt: skip
        procs.append(pep)
        assert pep.stderr is not None
        started = await _started("vvault-pep", pep, pep.stderr, PEP_STARTED)
        pumps.append(asyncio.create_task(_pump(pep.stderr, 2), name="demo-pep-output"))
        port, admin_port = int(started.group(1)), int(started.group(2))
        if (port, admin_port) != (ports["PEP_PORT"], ports["PEP_ADMIN_PORT"]):
            raise DemoError(f"vvault-pep listens on {port}/{admin_port}, not the ports it was given")
        await _wait_ready(admin_port, pep)
        if check:
            ok = await _check(port, pki)
            print("demo-check:", "ok" if ok else "FAILED")
            return 0 if ok else 1
        curl = f"curl --cacert {pki}/ca.pem --cert {pki}/client-reader.pem --key {pki}/client-reader-key.pem"
        print(f"\nvvault-pep is ready on https://localhost:{port} (admin: http://127.0.0.1:{admin_port})")
        print("\n# allowed: the demo reader reads a secret of its own tenant")
        print(f"{curl} https://localhost:{port}{ALLOWED}")
        print("\n# denied (403 problem+json): another tenant's secret")
        print(f"{curl} https://localhost:{port}{DENIED}")
        print("\n# refused at the TLS handshake: no client certificate")
        print(f"curl --cacert {pki}/ca.pem https://localhost:{port}{ALLOWED}")
        print("\nAudit records (one JSON line per request) appear below. Ctrl-C stops everything.\n", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        waiters = [asyncio.create_task(stop.wait(), name="demo-stop")]
        waiters += [asyncio.create_task(p.wait(), name=f"demo-child-{p.pid}") for p in procs]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        # Ctrl-C in a terminal reaches the children too: one may exit before our handler runs.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for task in waiters:
            task.cancel()
        if not stop.is_set():
            raise DemoError("a demo process exited on its own: stopping the others")
        print("\nstopping: vvault-pep drains, then stops OPA; the upstream last …", file=sys.stderr, flush=True)
        return 0
    finally:
        for proc in reversed(procs):  # the PEP first: it drains with its upstream still there
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            await proc.wait()
        for task in pumps:
            task.cancel()
        if check:
            shutil.rmtree(pki, ignore_errors=True)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="send requests itself and exit 0 only if all behave")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main(args.check))
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the demo was ready
        return 130


if __name__ == "__main__":
    sys.exit(run())
