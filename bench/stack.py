"""The processes a benchmark starts, where they run, and how they all stop.

:class:`Stack` starts each process with its output in a log file of the work directory,
pinned to the CPUs of its side — the **system under test** (proxies, OPA, Redis) or the
**driver** (load generator, upstream, the peer's issuer helper) — and stops every one of
them, children included, whatever happened: normal end, an exception, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

from bench.procfs import tree, usable_cpus

Side = Literal["sut", "driver", "any"]  # any: not pinned, whatever the run's pinning


@dataclass(frozen=True)
class Pinning:
    """CPU sets per side; ``None`` means not pinned (the kernel schedules freely)."""

    sut: frozenset[int] | None
    driver: frozenset[int] | None

    @classmethod
    def for_machine(cls, enabled: bool) -> Pinning:
        cpus = usable_cpus()
        if not enabled or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    @property
    def enabled(self) -> bool:
        return self.sut is not None

    def cpus(self, side: Side) -> frozenset[int] | None:
        if self.sut is None or self.driver is None:
            return None
        # "any" is spelled out, not left alone: the harness itself runs on the driver's CPUs
        # and a child inherits them.
        return {"sut": self.sut, "driver": self.driver, "any": self.sut | self.driver}[side]

    def describe(self) -> str:
        if self.sut is None or self.driver is None:
            return "not pinned: every process shares every CPU"
        return (
            f"system under test (proxies, OPA, redis) on CPU {_cpus(self.sut)}; "
            f"load generator, upstream and issuer helper on CPU {_cpus(self.driver)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


@contextlib.contextmanager
def _affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the block with this thread's affinity set to ``cpus``: a child forked inside inherits it.

    Pinning at fork time rather than afterwards matters for Go programs, which size their
    scheduler (GOMAXPROCS) from the CPUs they may use when they start.
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Stack:
    def __init__(self, work: Path, pinning: Pinning) -> None:
        self.work = work
        self.pinning = pinning
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sides: dict[str, Side] = {}

    def start(
        self, name: str, argv: Sequence[str], side: Side, *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        with _affinity(self.pinning.cpus(side)), log:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self.sides[name] = side
        return proc

    def run(
        self, argv: Sequence[str], side: Side, *, stdout: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """A short-lived tool (the load generator) on its side's CPUs."""
        with _affinity(self.pinning.cpus(side)):
            return subprocess.run(list(argv), stdout=stdout, stderr=subprocess.PIPE, check=check)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.work / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def placement(self) -> dict[str, str]:
        """Which process runs where, for the report."""
        out = {}
        for name, side in self.sides.items():
            cpus = self.pinning.cpus(side)
            out[name] = "any CPU" if cpus is None or side == "any" else f"CPU {_cpus(cpus)}"
        return out

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        self.sides.pop(name, None)
        if proc is not None:
            _stop(proc)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; children a parent left behind are killed too."""
    if proc.poll() is not None:
        return
    family = tree(proc.pid)[1:]
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    for pid in family:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def unwind_on_signals() -> None:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so every ``finally`` stops its processes.

    SIGINT too: a shell without job control starts background commands with SIGINT ignored,
    and Python keeps it ignored.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        # Once: a second signal (make passing one on, an impatient Ctrl-C) must not cut
        # the clean-up short and leave servers running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_harness(pin: bool, tool: Callable[[str, str], str | None]) -> tuple[dict[str, str | None], Pinning] | None:
    """What every benchmark does first: find its tools, unwind on signals, pin itself.

    Returns the tools (OPA, vegeta, oauth2-proxy, caddy; None where missing) and the pinning, or
    None (after saying why) when OPA or vegeta is missing.
    """
    tools = {
        "opa": tool("opa", "OPA_BIN"),
        "vegeta": tool("vegeta", "VEGETA_BIN"),
        "oauth2-proxy": tool("oauth2-proxy", "OAUTH2_PROXY_BIN"),
        "caddy": tool("caddy", "CADDY_BIN"),
    }
    if tools["opa"] is None or tools["vegeta"] is None:
        print("OPA or vegeta not found: run `make tools bench-tools`", file=sys.stderr)
        return None
    unwind_on_signals()
    pinning = Pinning.for_machine(pin)
    if pinning.driver is not None:
        os.sched_setaffinity(0, pinning.driver)  # the harness itself drives: token signing, reports
    return tools, pinning
