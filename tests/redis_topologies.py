"""Real Redis topologies for the tests: a Cluster and a Sentinel-managed primary.

Both are made of real ``redis-server`` processes on loopback, on free ports, with no
persistence, and started only by the tests that ask for them (session fixtures in
``tests/conftest.py``):

* :class:`ClusterTopology` — three masters with one replica each, created with
  ``redis-cli --cluster create``; ``cluster-node-timeout`` is short so that a killed
  master's replica takes over in a few seconds, and ``cluster-require-full-coverage no``
  so that the other masters keep answering meanwhile (what docs/deploy.md recommends).
* :class:`SentinelTopology` — one primary, one replica and three Sentinels (quorum 2),
  with a short ``down-after-milliseconds`` and ``failover-timeout``.

Each has ``kill_*`` to fail a node for real (SIGKILL) and :meth:`heal` to bring the
topology back to full strength for the next test (the killed node returns as a replica).
Every wait is for a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from tests.support import free_port

SERVICE = "pep-primary"  # the Sentinel master name
T = TypeVar("T", "ClusterTopology", "SentinelTopology")


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run `make redis` (installs it from Debian)")
    return found


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> float:
    """Poll ``check`` until it is true; the seconds it took.  Errors count as "not yet"."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
            if check():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _ports(n: int, *, cluster: bool = False) -> list[int]:
    """``n`` distinct free ports (for a cluster node, its bus port, port + 10000, free too)."""
    ports: list[int] = []
    while len(ports) < n:
        port = _cluster_port() if cluster else free_port()
        if port not in ports and port + 10000 not in ports and port - 10000 not in ports:
            ports.append(port)
    return ports


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _conn(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


def _ping(port: int) -> bool:
    with _conn(port) as c:
        return bool(c.ping())


class PortTaken(Exception):
    """Our redis-server exited at start: something else took its port meanwhile."""


class _Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._all: list[subprocess.Popen[bytes]] = []  # every process started, for stop_all

    def spawn(self, port: int, *args: str) -> None:
        log = (self.workdir / f"redis-{port}.log").open("ab")
        proc = subprocess.Popen(
            [_binary("redis-server"), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        self.procs[port] = proc
        self._all.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise PortTaken(f"redis-server for port {port} exited with {proc.returncode}")
            return _ping(port)

        wait_for(f"redis-server on port {port}", up, timeout=20)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def alive(self, port: int) -> bool:
        return self.procs[port].poll() is None

    def stop_all(self) -> None:
        for proc in self._all:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._all:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_COMMON = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes")


class ClusterTopology:
    """Three masters, one replica each, on loopback."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = _ports(6, cluster=True)
        self._procs = _Processes(workdir)

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _start_node(self, port: int) -> None:
        self._procs.spawn(
            port,
            "--port", str(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "no",
            *_COMMON,
        )  # fmt: skip

    def start(self) -> None:
        try:
            for port in self.ports:
                self._start_node(port)
            subprocess.run(
                [_binary("redis-cli"), "--cluster", "create", *self.nodes, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            wait_for("a healthy cluster", self.healthy, timeout=45)
        except BaseException:
            self.stop()
            raise

    def _view(self, port: int) -> list[list[str]]:
        with _conn(port) as c:
            raw = c.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [line.split() for line in text.splitlines() if line.strip()]

    def healthy(self) -> bool:
        """Every node up and agreeing: three masters with slots, each with a connected replica."""
        for port in self.ports:
            with _conn(port) as c:
                info = c.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
            view = self._view(port)
            if len(view) != 6 or any("fail" in row[2] or row[7] != "connected" for row in view):
                return False
            masters = {row[0] for row in view if "master" in row[2] and len(row) > 8}
            replicas_of = {row[3] for row in view if "slave" in row[2]}
            if len(masters) != 3 or replicas_of != masters:
                return False
        for port in self.ports:  # replicas have finished their sync
            with _conn(port) as c:
                repl = c.info("replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        return True

    def _roles(self) -> list[tuple[int, str]]:
        for port in self.ports:
            if self._procs.alive(port):
                with contextlib.suppress(redis.RedisError, OSError):
                    return [
                        (int(row[1].split(":")[1].split("@")[0]), "master" if "master" in row[2] else "replica")
                        for row in self._view(port)
                        if ("fail" not in row[2] and row[7] == "connected") or "myself" in row[2]
                    ]
        return []

    def masters(self) -> list[int]:
        """Ports of the masters now (the nodes that take writes)."""
        return [p for p, role in self._roles() if role == "master" and self._procs.alive(p)]

    def replicas(self) -> list[int]:
        return [p for p, role in self._roles() if role == "replica" and self._procs.alive(p)]

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        for port in self.ports:
            if not self._procs.alive(port):
                continue
            with _conn(port) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for row in self._view(port):
                if "master" not in row[2] or "fail" in row[2]:
                    continue
                for span in row[8:]:
                    if span.startswith("["):
                        continue
                    lo, _, hi = span.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return int(row[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no live master serves {key!r}")

    def kill(self, port: int) -> None:
        self._procs.kill(port)

    def heal(self) -> None:
        """Restart killed nodes (they rejoin as replicas) and wait for a healthy cluster."""
        for port in self.ports:
            if not self._procs.alive(port):
                self._start_node(port)
        wait_for("the cluster to heal", self.healthy, timeout=45)

    def stop(self) -> None:
        self._procs.stop_all()


class SentinelTopology:
    """A primary, a replica, three Sentinels with quorum 2."""

    DOWN_AFTER_MS = 1000
    FAILOVER_TIMEOUT_MS = 4000

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        ports = _ports(5)
        self.data_ports = ports[:2]  # [initial primary, initial replica]
        self.sentinel_ports = ports[2:]
        self._procs = _Processes(workdir)

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def _start_data(self, port: int, primary: int | None) -> None:
        extra = ("--replicaof", "127.0.0.1", str(primary)) if primary is not None else ()
        self._procs.spawn(port, "--port", str(port), *_COMMON, *extra)

    def _start_sentinel(self, port: int) -> None:
        conf = self.workdir / f"sentinel-{port}.conf"
        if not conf.exists():  # Sentinel rewrites its own file: keep it across restarts
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.data_ports[0]} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {self.FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        self._procs.spawn(port, str(conf), "--sentinel")

    def start(self) -> None:
        try:
            self._start_data(self.data_ports[0], None)
            self._start_data(self.data_ports[1], self.data_ports[0])
            for port in self.sentinel_ports:
                self._start_sentinel(port)
            wait_for("Sentinels that know each other and the replica", self.healthy, timeout=45)
        except BaseException:
            self.stop()
            raise

    def primary(self) -> int:
        """The primary's port, as a majority of the Sentinels report it now."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError), _conn(port) as c:
                _, p = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                votes[int(p)] = votes.get(int(p), 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=(0, 0))
        if best[1] < 2:
            raise RuntimeError("the Sentinels do not agree on a primary")
        return best[0]

    def healthy(self) -> bool:
        primary = self.primary()
        if not self._procs.alive(primary):
            return False
        with _conn(primary) as c:
            repl = c.info("replication")
        if repl.get("role") != "master" or int(repl.get("connected_slaves", 0)) != 1:
            return False
        replica = next(p for p in self.data_ports if p != primary)
        with _conn(replica) as c:
            rrepl = c.info("replication")
        if rrepl.get("role") != "slave" or rrepl.get("master_link_status") != "up":
            return False
        if int(rrepl.get("master_port", 0)) != primary:
            return False
        for port in self.sentinel_ports:
            with _conn(port) as c:
                master = c.sentinel_master(SERVICE)
                if master["is_sdown"] or master["is_odown"] or int(master["port"]) != primary:
                    return False
                if master["num-other-sentinels"] != 2:
                    return False
                replicas = c.sentinel_slaves(SERVICE)
                if not any(int(r["port"]) == replica and not r["is_sdown"] for r in replicas):
                    return False
        return True

    def kill_primary(self) -> int:
        primary = self.primary()
        self._procs.kill(primary)
        return primary

    def heal(self) -> None:
        """Restart a killed data node (Sentinel turns it into a replica) and wait for health."""
        primary = self.primary()
        for port in self.data_ports:
            if not self._procs.alive(port):
                self._start_data(port, primary if port != primary else None)
        wait_for("the Sentinel setup to heal", self.healthy, timeout=45)

    def stop(self) -> None:
        self._procs.stop_all()


# ------------------------------------------------------------------ fixtures (see conftest.py)


def _started(make: Callable[[], T]) -> T:
    """Start a topology; again on fresh ports if another process took one of them meanwhile."""
    for attempt in range(3):
        topology = make()
        try:
            topology.start()
            return topology
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topology = _started(lambda: ClusterTopology(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topology = _started(lambda: SentinelTopology(tmp_path_factory.mktemp("redis-sentinel")))
    try:
        yield topology
    finally:
        topology.stop()


class OneNodeCluster:
    """A real Redis Cluster of one master holding every slot: starts in a moment."""

    def __init__(self, workdir: Path) -> None:
        self.port = _cluster_port()  # its bus port (port + 10000) free too
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _ok(self) -> bool:
        with contextlib.suppress(redis.RedisError, OSError), redis.Redis(port=self.port, socket_timeout=2) as c:
            return b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
        return False

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server not found"
        node = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        as_cluster = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.proc = subprocess.Popen(
            [binary, *node, *as_cluster, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        added = False
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError), redis.Redis(port=self.port, socket_timeout=2) as c:
                if not added:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                    added = True
                if self._ok():
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the one-node cluster did not become ok")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
