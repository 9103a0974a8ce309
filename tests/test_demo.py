"""`make demo` on a machine where its ports are taken: one line, nothing started, and a
child that could not bind its port never counts as ready."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from examples.demo import UPSTREAM_STARTED, DemoError, _started
from tests.support import ROOT, free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_taken_port_is_refused_in_one_line(taken_port: int) -> None:
    pki = ROOT / ".demo" / "pki" / "ca.pem"
    before = pki.stat().st_mtime_ns if pki.exists() else None
    env = {
        **os.environ,
        "PEP_PORT": str(taken_port),
        "PEP_ADMIN_PORT": str(free_port()),
        "OPA_PORT": str(free_port()),
        "UPSTREAM_PORT": str(free_port()),
    }
    res = subprocess.run(
        [sys.executable, "-m", "examples.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 1
    assert res.stdout == ""  # nothing was started
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"demo: port {taken_port} (PEP_PORT) already in use")
    # The suggestion is another port: 10000 up when that exists, else a free one.
    suggested = re.search(r"PEP_PORT=(\d+) make demo", lines[0])
    assert suggested is not None, lines[0]
    assert int(suggested.group(1)) == (taken_port + 10000 if taken_port < 55535 else int(suggested.group(1)))
    assert int(suggested.group(1)) != taken_port
    assert (pki.stat().st_mtime_ns if pki.exists() else None) == before  # a running demo's PKI is left alone


async def test_a_child_that_cannot_bind_is_never_ready(taken_port: int) -> None:
    """Something answers on the port, but not the process the demo started: not ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.vvault_api.app", "--port", str(taken_port),
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    with pytest.raises(DemoError) as err:
        await asyncio.wait_for(_started("the example upstream", proc, proc.stdout, UPSTREAM_STARTED), 30)
    assert str(err.value).startswith("the example upstream exited with status 1 before listening: OSError")
    assert "address already in use" in str(err.value)


async def test_the_upstream_says_when_it_listens() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.vvault_api.app", "--port", str(port),
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        match = await asyncio.wait_for(_started("the example upstream", proc, proc.stdout, UPSTREAM_STARTED), 30)
        assert int(match.group(1)) == port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it holds the port it announced
    finally:
        proc.terminate()
        await proc.wait()
