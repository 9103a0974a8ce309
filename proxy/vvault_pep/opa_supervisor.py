"""Managed OPA: start ``opa run --server`` beside the PEP, keep it alive, stop it.

Used when ``opa.managed: true`` — the one-command way to try the PEP.  In
production OPA runs as its own sidecar and the PEP only talks to it.

The child listens on the configured loopback address or Unix socket, loads
``opa.policy_dir``, and gets ``PR_SET_PDEATHSIG`` so it cannot outlive a PEP
that was killed.  If it exits, it is restarted with capped exponential
backoff; while it is down, decisions fail closed (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
from urllib.parse import urlsplit

from .config import Opa
from .pdp import PdpClient

log = logging.getLogger("vvault_pep.opa")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def opa_addr(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return parts.netloc


class OpaSupervisor:
    def __init__(self, opa: Opa, client: PdpClient) -> None:
        assert opa.policy_dir is not None  # config validation guarantees it
        self._opa = opa
        self._client = client
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    def _argv(self) -> list[str]:
        binary = shutil.which(self._opa.binary) or self._opa.binary
        return [
            binary,
            "run",
            "--server",
            "--addr",
            opa_addr(self._opa.url),
            "--skip-version-check",
            "--log-level",
            "error",
            str(self._opa.policy_dir),
        ]

    async def _spawn(self) -> asyncio.subprocess.Process:
        parts = urlsplit(self._opa.url)
        if parts.scheme == "unix":
            # a stale socket from a dead OPA blocks the bind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(parts.path)
        return await asyncio.create_subprocess_exec(
            *self._argv(), stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent
        )

    async def start(self) -> None:
        """Start OPA and wait until it answers /health; raise RuntimeError if it never does."""
        self._proc = await self._spawn()
        await self._wait_ready(self._opa.ready_timeout_s)
        self._task = asyncio.create_task(self._watch(), name="opa-supervisor")

    async def _wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(f"OPA exited with status {self._proc.returncode} while starting")
            if await self._client.healthy(timeout_s=0.5):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"OPA did not become ready within {timeout_s:.0f}s")

    async def _watch(self) -> None:
        backoff = 0.1
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("managed OPA exited with status %s; restarting in %.1fs", code, backoff)
            await asyncio.sleep(backoff)
            try:
                self._proc = await self._spawn()
                await self._wait_ready(self._opa.ready_timeout_s)
                self.restarts += 1
                backoff = 0.1
                log.warning("managed OPA restarted (pid %s)", self._proc.pid)
            except (OSError, RuntimeError) as exc:
                log.error("managed OPA restart failed: %s", exc)
                backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
