"""Managed OPA: start ``opa run --server`` beside the PEP, keep it alive, stop it.

Used when ``opa.managed: true`` — the one-command way to try the PEP.  In
production OPA runs as its own sidecar and the PEP only talks to it.

By default (``opa.managed_listen: unix``) the child listens on a Unix socket in
a folder the PEP creates with mode 0700: no other local user can bind there
first or connect, so nothing but this child can answer for it.  With
``managed_listen: tcp`` it listens on ``opa.url`` (loopback) — an explicit,
warned choice: the supervisor then checks, on Linux, that the listening socket
on that port belongs to its own child before calling it up, so a process that
already held the port is found out instead of trusted.  The child loads
``opa.policy_dir`` and gets ``PR_SET_PDEATHSIG`` so it cannot outlive a PEP
that was killed.  The child is up only while it lives *and* answers; if it
exits, it is restarted with capped exponential backoff; while it is down,
decisions fail closed (503).
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
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ..config.models import Opa
from ..decide.pdp import PdpClient

log = logging.getLogger("vvault_pep.opa")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Go's collector for the OPA the PEP starts: at 5x the live heap instead of Go's 2x. A decision
# allocates ~1,100 objects; measured side by side this costs OPA a quarter less CPU per decision
# for ~25 MB more memory (docs/performance.md). GOGC or GOMEMLIMIT set for the PEP win.
OPA_GOGC = "400"


def opa_env(environ: dict[str, str]) -> dict[str, str]:
    """The managed OPA's environment: the PEP's, with ``GOGC`` defaulted when it is not set."""
    return {**environ, "GOGC": environ.get("GOGC", OPA_GOGC)}


def opa_addr(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return parts.netloc


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (Linux /proc/net/tcp{,6})."""
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                out.add(fields[9])
    return out


def owns_port(pid: int, port: int) -> bool | None:
    """Does process ``pid`` hold the socket listening on ``port``?  None where /proc cannot tell."""
    if not Path("/proc/net/tcp").exists():
        return None
    listening = _listening_inodes(port)
    if not listening:
        return False
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    fds: set[str] = set()
    for fd in names:
        with contextlib.suppress(OSError):  # closed meanwhile (listdir's own fd, for one)
            fds.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return any(f"socket:[{inode}]" in fds for inode in listening)


class OpaSupervisor:
    def __init__(self, opa: Opa, client: PdpClient | None = None) -> None:
        assert opa.policy_dir is not None  # config validation guarantees it
        self._opa = opa
        self.client = client
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        self._dir: str | None = None
        if opa.managed_listen == "unix":
            # mkdtemp creates the folder with mode 0700, owned by this user.
            self._dir = tempfile.mkdtemp(prefix="vvault-pep-opa-")
            os.chmod(self._dir, 0o700)
            self.url = f"unix://{self._dir}/opa.sock"
        else:
            self.url = opa.url
            log.warning(
                "managed OPA listens on TCP %s (opa.managed_listen: tcp): another local process could "
                "bind that port first; the default, a private Unix socket, cannot be taken",
                opa.url,
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    def describe(self) -> dict[str, object]:
        """Which process answers for OPA: for /readyz and ``check``."""
        return {"managed": True, "pid": self.pid, "listen": self.url, "restarts": self.restarts}

    async def healthy(self, timeout_s: float = 1.0) -> bool:
        """Up only while the child lives, answers, and (TCP) holds the port itself."""
        pid = self.pid
        if pid is None or self.client is None:
            return False
        if self._opa.managed_listen == "tcp" and owns_port(pid, urlsplit(self.url).port or 80) is False:
            return False
        return await self.client.healthy(timeout_s=timeout_s)

    def _argv(self) -> list[str]:
        binary = shutil.which(self._opa.binary) or self._opa.binary
        return [
            binary,
            "run",
            "--server",
            "--addr",
            opa_addr(self.url),
            "--unix-socket-perm",
            "600",
            "--skip-version-check",
            "--log-level",
            "error",
            str(self._opa.policy_dir),
        ]

    async def _spawn(self) -> asyncio.subprocess.Process:
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            # a stale socket from a dead OPA blocks the bind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(parts.path)
        return await asyncio.create_subprocess_exec(
            *self._argv(), stdin=asyncio.subprocess.DEVNULL, env=opa_env(dict(os.environ)), preexec_fn=_die_with_parent
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
                raise RuntimeError(
                    f"the managed OPA exited with status {self._proc.returncode} while starting on {self.url}"
                )
            if await self.healthy(timeout_s=0.5):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the managed OPA did not become ready on {self.url} within {timeout_s:.0f}s")

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
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
