"""`make demo` / `make demo-check`: the example upstream, OPA and the PEP, together.

    python -m examples.demo            # run until Ctrl-C, print curl commands
    python -m examples.demo --check    # send an allowed and a denied request, exit 0 if both behave

The PEP runs with `examples/config/demo.yaml` and supervises OPA itself
(`opa.managed: true`).  A fresh demo PKI is written to `.demo/pki`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import sys
from pathlib import Path

import aiohttp

from examples.pki import make_pki

ROOT = Path(__file__).resolve().parent.parent
PKI = ROOT / ".demo" / "pki"
CONFIG = ROOT / "examples" / "config" / "demo.yaml"
ALLOWED = "/v1/tenants/acme/secrets/db-password"
DENIED = "/v1/tenants/globex/secrets/db-password"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _opa_binary() -> str:
    for candidate in (os.environ.get("OPA_BIN"), str(ROOT / ".tools" / "bin" / "opa"), shutil.which("opa")):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("OPA not found: run `make tools` first (or set OPA_BIN)")


async def _wait_ready(admin_port: int, proc: asyncio.subprocess.Process, timeout: float = 60) -> None:
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(timeout):
            while True:
                if proc.returncode is not None:
                    raise SystemExit(f"vvault-pep exited with status {proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)


async def _send(port: int, path: str) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.pem"))
    ctx.load_cert_chain(str(PKI / "client-reader.pem"), str(PKI / "client-reader-key.pem"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(f"https://localhost:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.text()


async def main(check: bool) -> int:
    make_pki(PKI)
    ports = {"PEP_PORT": 8443, "PEP_ADMIN_PORT": 9901, "OPA_PORT": 8181, "UPSTREAM_PORT": 8080}
    if check:  # never collide with anything already running
        ports = {k: _free_port() for k in ports}
    env = {**os.environ, "OPA_BIN": _opa_binary(), "PEP_PKI": str(PKI), **{k: str(v) for k, v in ports.items()}}
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.vvault_api.app", "--port", str(ports["UPSTREAM_PORT"]), cwd=ROOT, env=env
    )
    pep = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vvault_pep.cli",
        "serve",
        "--config",
        str(CONFIG),
        "--log-level",
        "WARNING",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL if check else None,
    )
    try:
        print("starting the example upstream, OPA (managed by the PEP) and vvault-pep …", flush=True)
        await _wait_ready(ports["PEP_ADMIN_PORT"], pep)
        port = ports["PEP_PORT"]
        curl = f"curl --cacert {PKI}/ca.pem --cert {PKI}/client-reader.pem --key {PKI}/client-reader-key.pem"
        if not check:
            print(
                f"\nvvault-pep is ready on https://localhost:{port} (admin: http://127.0.0.1:{ports['PEP_ADMIN_PORT']})"
            )
            print("\n# allowed: the demo reader reads a secret of its own tenant")
            print(f"{curl} https://localhost:{port}{ALLOWED}")
            print("\n# denied (403 problem+json): another tenant's secret")
            print(f"{curl} https://localhost:{port}{DENIED}")
            print("\n# refused at the TLS handshake: no client certificate")
            print(f"curl --cacert {PKI}/ca.pem https://localhost:{port}{ALLOWED}")
            print("\nAudit records (one JSON line per request) appear below. Ctrl-C stops everything.\n", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            return 0
        allowed_status, allowed_body = await _send(port, ALLOWED)
        denied_status, denied_body = await _send(port, DENIED)
        print(f"GET {ALLOWED} -> {allowed_status} {allowed_body}")
        print(f"GET {DENIED} -> {denied_status} {denied_body}")
        forwarded = allowed_status == 200 and '"value"' in allowed_body
        denied = denied_status == 403 and "policy.tenant_not_entitled" in denied_body
        print("demo-check:", "ok" if forwarded and denied else "FAILED")
        return 0 if forwarded and denied else 1
    finally:
        for proc in (pep, upstream):
            if proc.returncode is None:
                proc.terminate()
        for proc in (pep, upstream):
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="send the two requests and exit 0 only if both behave")
    sys.exit(asyncio.run(main(parser.parse_args().check)))
