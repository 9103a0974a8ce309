"""Runtime: start the pieces in order, stop them in reverse.

Start: managed OPA (if asked) → PDP pool → upstream pools → admin listener →
mTLS data listener.  Stop: data listener (finish in-flight requests) → admin
→ pools → OPA.  The admin listener (``/healthz``, ``/readyz``) is a separate
socket, loopback by default, never the mTLS data port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import platform
import ssl
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .. import __version__
from ..config.models import Config, ListenerTls
from ..core.policy_input import SCHEMA
from ..decide import revision
from ..decide.cache import DecisionCache
from ..decide.pdp import PdpClient
from ..edge.forward import Upstreams
from ..edge.listener import CrlStatus, MtlsServer, crl_status, load_crls, server_context
from ..edge.opa_supervisor import OpaSupervisor
from ..errors import PepError
from ..identity.authn import Authenticator
from ..identity.posture import PostureVerifier
from ..observe.audit import AuditLog
from ..observe.telemetry import Telemetry
from ..shared.containment import Containment
from ..shared.push import Push
from ..shared.ratelimit import RateLimiter
from ..shared.risk import RiskSignals
from ..shared.state import Generation, SharedState
from .admin import AdminApi, AdminRunner
from .heap import HeapTrimmer
from .pipeline import Pipeline
from .services import key_decisions, policy_client

log = logging.getLogger("vvault_pep.runtime")


class PepRuntime:
    def __init__(
        self, config: Config, *, telemetry: Telemetry | None = None, worker: int = 0, workers: int = 1
    ) -> None:
        self.config = config
        # One of several processes sharing the listener (SO_REUSEPORT); worker k serves
        # its admin listener on admin.port + k.
        self.worker = worker
        self.workers = workers
        self.telemetry = telemetry or Telemetry(config.telemetry)
        self.audit: AuditLog | None = None
        self.pdp: PdpClient | None = None
        self.supervisor: OpaSupervisor | None = None
        self.upstreams: Upstreams | None = None
        self.pipeline: Pipeline | None = None
        self.authn: Authenticator | None = None
        self.shared: SharedState | None = None
        self.cache: DecisionCache | None = None
        self.containment: Containment | None = None
        self.push: Push | None = None
        self.risk: RiskSignals | None = None
        self.generation = Generation()
        self.posture: PostureVerifier | None = None
        self._revision_task: asyncio.Task[None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self.heap = HeapTrimmer(config.limits.heap_trim_interval_s)
        self._heap_task: asyncio.Task[None] | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        self._admin_ssl: ssl.SSLContext | None = None
        self._admin_stamp: tuple[float, ...] = ()
        self._crl_stale_logged: set[str] = set()
        self._crl_cache: dict[str, tuple[float, list[CrlStatus]]] = {}
        self._tls_stamp: tuple[float, ...] = ()
        self.tls_reloads = 0
        self._data_server: asyncio.Server | None = None
        self._mtls: MtlsServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self.port: int = 0
        self.admin_port: int = 0
        self.draining = False  # set on SIGTERM: not ready, still serving

    async def start(self) -> None:
        config = self.config
        ssl_ctx = server_context(config.listener.tls)  # fail before starting anything
        self._ssl_ctx = ssl_ctx
        self._tls_stamp = _stamp(config.listener.tls)
        self.audit = AuditLog(config.audit)
        self.audit.start()
        derived: dict[str, tuple[str, ...]] | None = None
        self.pdp, self.supervisor = policy_client(config)
        if self.supervisor is not None:
            await self.supervisor.start()
            derived = await self._managed_policy_paths()
        self.upstreams = Upstreams(
            config.upstreams,
            max_body_bytes=config.limits.max_body_bytes,
            body_idle_timeout_s=config.limits.body_idle_timeout_s,
            buffer_body_bytes=config.limits.buffer_body_bytes,
            send_idle_timeout_s=config.limits.send_idle_timeout_s,
        )
        self.authn = Authenticator(config.identity)
        await self.authn.start()
        self.shared = SharedState(config.redis) if config.redis is not None else None
        # One number for everything the replica knows of shared state (memos compare it).
        self.generation = Generation()
        push = config.redis is not None and config.redis.push and self.shared is not None
        self.push = Push(self.shared, self.generation) if push and self.shared is not None else None
        self.cache = DecisionCache(config.cache, self.shared, push=self.push, generation=self.generation)
        await key_decisions(config, self.pdp, self.cache, derived)
        self._revision_task = asyncio.create_task(self._revision_loop(), name="opa-revision")
        self.containment = Containment(self.shared, push=self.push, generation=self.generation)
        await self.containment.start()
        if self.push is not None:
            # Subscribe, reconcile in full, hear our own beat: then L1 hits need no Redis.
            await self.push.start(first_s=2.0)
            if not self.push.healthy:  # Redis slow or away: read what it holds now; reads meanwhile
                await self.containment.reconcile()
        if self.shared is not None:
            # Both ways on every (re)connection, on data loss and periodically.
            self.shared.watch((self.containment.reconcile, self.cache.reconcile))
        self.posture = PostureVerifier(config.posture)
        await self.posture.start()
        self.risk = RiskSignals(config.risk, self.shared)
        self.pipeline = Pipeline(
            config,
            self.pdp,
            self.upstreams,
            self.authn,
            self.cache,
            self.telemetry,
            self.audit,
            self.containment,
            RateLimiter(self.shared),
            self.posture,
            self.risk,
        )
        self._observe()

        admin = web.Application()
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/readyz", self._readyz)
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/version", self._version)
        api = AdminApi(self)
        api.install(admin)
        self._admin_runner = AdminRunner(admin, api, access_log=None)
        await self._admin_runner.setup()
        admin_ssl = server_context(config.admin.tls) if config.admin.tls is not None else None
        self._admin_ssl = admin_ssl
        self._admin_stamp = _stamp(config.admin.tls) if config.admin.tls is not None else ()
        admin_port = config.admin.port + self.worker if config.admin.port else 0
        site = web.TCPSite(self._admin_runner, config.admin.host, admin_port, ssl_context=admin_ssl)
        await site.start()
        self.admin_port = _bound_port(site)

        self._mtls = MtlsServer(
            self.pipeline.handle,
            require_client_auth_eku=config.listener.tls.require_client_auth_eku,
            trust_domains=config.identity.workload.trust_domains,
            max_line_size=config.limits.max_request_line_bytes,
            max_field_size=config.limits.max_header_bytes,
            max_headers=config.limits.max_headers,
            keepalive_timeout=config.listener.keepalive_timeout_s,
            access_log=None,
            auto_decompress=False,
        )
        self.pipeline.server = self._mtls
        self._mtls.on_refusal = self.pipeline.record_parser_refusal
        loop = asyncio.get_running_loop()
        self._data_server = await loop.create_server(
            self._mtls,
            config.listener.host,
            config.listener.port,
            ssl=ssl_ctx,
            ssl_handshake_timeout=10,
            reuse_address=True,
            reuse_port=self.workers > 1,  # the kernel spreads connections over the workers
        )
        self.port = self._data_server.sockets[0].getsockname()[1]
        self._tls_task = asyncio.create_task(self._tls_reloader(), name="tls-reload")
        if self.heap.enabled:
            self._heap_task = asyncio.create_task(self.heap.run(), name="heap-trim")
        log.info(
            "listening on %s:%s (mTLS), admin on %s:%s",
            config.listener.host,
            self.port,
            config.admin.host,
            self.admin_port,
        )

    async def stop(self) -> None:
        for task in (self._tls_task, self._heap_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._data_server is not None:
            self._data_server.close()
            if self._mtls is not None:
                await self._mtls.shutdown(5)
            await self._data_server.wait_closed()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.upstreams is not None:
            await self.upstreams.close()
        if self.authn is not None:
            await self.authn.stop()
        if self._revision_task is not None:
            self._revision_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revision_task
        if self.cache is not None:
            await self.cache.stop()
        if self.risk is not None:
            await self.risk.stop()  # what was counted here reaches Redis
        if self.containment is not None:
            await self.containment.stop()
        if self.push is not None:
            await self.push.stop()
        if self.posture is not None:
            await self.posture.stop()
        if self.shared is not None:
            await self.shared.close()
        # Flushing exporters blocks on network I/O: keep it off the event loop.
        if self.audit is not None:
            await asyncio.to_thread(self.audit.stop)
        await asyncio.to_thread(self.telemetry.shutdown)
        if self.pdp is not None:
            await self.pdp.close()
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def _tls_reloader(self) -> None:
        """Pick up rotated certificate and CRL files for new handshakes (the listeners keep running).

        The new chain, any CA added to the bundle and any newer CRL take effect at once
        (OpenSSL uses the CRL with the latest lastUpdate per issuer); a CA removed from
        the bundle stays trusted until the next restart (OpenSSL's store only grows).
        """
        tls = self.config.listener.tls
        while True:
            await asyncio.sleep(tls.reload_interval_s)
            self._log_stale_crls()
            stamp = _stamp(tls)
            if stamp != self._tls_stamp and self._ssl_ctx is not None and self._reload(self._ssl_ctx, tls):
                self._tls_stamp = stamp
                self.tls_reloads += 1
                if self.pipeline is not None:
                    self.pipeline.tls_reloads += 1
                log.warning("TLS certificate files changed: reloaded")
            admin_tls = self.config.admin.tls
            if admin_tls is not None and self._admin_ssl is not None:
                stamp = _stamp(admin_tls)
                if stamp != self._admin_stamp and self._reload(self._admin_ssl, admin_tls):
                    self._admin_stamp = stamp
                    log.warning("admin TLS certificate files changed: reloaded")

    @staticmethod
    def _reload(ctx: ssl.SSLContext, tls: ListenerTls) -> bool:
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
            load_crls(ctx, tls.crl_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Half-written files during a rotation: keep serving the old ones, retry.
            log.warning("TLS reload failed, keeping the current files: %s", type(exc).__name__)
            return False
        return True

    def crl_freshness(self) -> dict[str, float]:
        """Seconds until each configured CRL's nextUpdate (negative: stale, refusing)."""
        now = dt.datetime.now(dt.UTC)
        out: dict[str, float] = {}
        files = [*self.config.listener.tls.crl_file, *(self.config.admin.tls.crl_file if self.config.admin.tls else ())]
        statuses: list[CrlStatus] = []
        for path in dict.fromkeys(files):
            # Parsed again only when the file changes: a CRL can be megabytes, scrapes are frequent.
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                mtime = -1.0
            cached = self._crl_cache.get(str(path))
            if cached is None or cached[0] != mtime:
                cached = (mtime, crl_status([path]))
                self._crl_cache[str(path)] = cached
            statuses.extend(cached[1])
        for status in statuses:
            left = (status.next_update - now).total_seconds() if status.next_update else -1.0
            key = f"{status.file}#{status.issuer}"
            out[key] = min(left, out.get(key, left))
        return out

    def _log_stale_crls(self) -> None:
        for key, left in self.crl_freshness().items():
            if left <= 0 and key not in self._crl_stale_logged:
                self._crl_stale_logged.add(key)
                log.error("CRL past its nextUpdate (%s): handshakes it covers are refused", key)
            elif left > 0:
                self._crl_stale_logged.discard(key)

    async def _managed_policy_paths(self) -> dict[str, tuple[str, ...]]:
        return await revision.managed_policy_paths(self.config)

    async def _refresh_revision(self, *, modules: bool = True) -> None:
        assert self.pdp is not None
        assert self.cache is not None
        await revision.refresh(self.config, self.pdp, self.cache, modules=modules)

    async def _revision_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.cache
        modules_at = loop.time()
        while True:
            await asyncio.sleep(cfg.revision_check_s)
            due = cfg.policy_check_s > 0 and loop.time() - modules_at >= cfg.policy_check_s
            if due:
                modules_at = loop.time()
            await self._refresh_revision(modules=due)

    def _observe(self) -> None:
        """Values read at scrape time from the parts that own them."""
        tel = self.telemetry

        def jwks(kind: str) -> dict[tuple[tuple[str, str], ...], float]:
            keysets = self.authn.keysets.values() if self.authn else []
            return {(("issuer", k.issuer.name),): float(getattr(k, kind)) for k in keysets}

        tel.observe("vvault_pep.jwks.fetches", "JWKS fetches per issuer", lambda: jwks("fetches"))
        tel.observe("vvault_pep.jwks.failures", "failed JWKS fetches per issuer", lambda: jwks("failures"))

        def redis(counter: str) -> dict[tuple[tuple[str, str], ...], float]:
            return {(): float(getattr(self.shared, counter))} if self.shared else {}

        for name, counter, description in (
            ("errors", "errors", "Redis calls that failed or timed out"),
            ("late", "late", "Redis replies a caller stopped waiting for (risk.timeout_ms)"),
            ("round_trips", "batches", "pipelines sent on the request path (reads are batched)"),
            ("commands", "batched_commands", "reads and writes queued on the request path"),
        ):
            tel.observe(f"vvault_pep.redis.{name}", description, functools.partial(redis, counter))

        def shared_state(value: Callable[[], float]) -> dict[tuple[tuple[str, str], ...], float]:
            return {(): value()} if self.shared and self.containment and self.cache else {}

        shared_gauges: tuple[tuple[str, str, Callable[[], float], bool], ...] = (
            ("redis.reachable", "1 while Redis answers, 0 while this replica enforces what it knows",
             lambda: float(self.shared is not None and self.shared.reachable and self.shared.available), True),
            ("redis.outages", "times Redis became unreachable",
             lambda: float(self.shared.outages if self.shared else 0), False),
            ("redis.data_losses", "times Redis was found without its data (restart, flush, failover)",
             lambda: float(self.shared.data_losses if self.shared else 0), False),
            ("containment.unshared", "quarantines and lifts made here that Redis has not heard yet",
             lambda: float(self.containment.unshared if self.containment else 0), True),
            ("containment.written_back", "quarantines written back to a Redis that lacked them",
             lambda: float(self.containment.written_back if self.containment else 0), False),
            ("containment.reconciles", "reconciliations with Redis that completed",
             lambda: float(self.containment.reconciles if self.containment else 0), False),
            ("push.healthy", "1 while L1 hits are answered from pushed state, 0 while scopes are read per request",
             lambda: float(self.push is not None and self.push.healthy), True),
            ("push.fallbacks", "times the push channel was found not healthy and requests fell back to reads",
             lambda: float(self.push.fallbacks if self.push else 0), False),
        )  # fmt: skip
        for name, description, value, gauge in shared_gauges:
            tel.observe(f"vvault_pep.{name}", description, functools.partial(shared_state, value), gauge=gauge)
        tel.observe(
            "vvault_pep.audit.dropped", "audit records dropped by a full sink",
            lambda: {(("sink", k),): float(v) for k, v in (self.audit.dropped() if self.audit else {}).items()},
        )  # fmt: skip

        def audit_counter(kind: str) -> dict[tuple[tuple[str, str], ...], float]:
            counts = getattr(self.audit, kind)() if self.audit else {}
            return {(("sink", k),): float(v) for k, v in counts.items()}

        for kind, what in (("escaped", "a value JSON cannot carry, escaped"), ("truncated", "over the size cap, cut")):
            tel.observe(
                f"vvault_pep.audit.{kind}", f"audit records written with {what}", functools.partial(audit_counter, kind)
            )
        tel.observe(
            "vvault_pep.tls.crl_seconds_left", "seconds until each CRL's nextUpdate (<= 0: stale, refusing)",
            lambda: {(("crl", k),): v for k, v in self.crl_freshness().items()},
            gauge=True,
        )  # fmt: skip
        tel.observe(
            "vvault_pep.tls.refused", "connections refused after the handshake (bad SVID, EKU, resumption)",
            lambda: {(("why", "certificate"),): float(self._mtls.refused_certificates),
                     (("why", "resumption"),): float(self._mtls.refused_resumptions)} if self._mtls else {},
        )  # fmt: skip

        def heap(counter: str) -> dict[tuple[tuple[str, str], ...], float]:
            return {(): float(getattr(self.heap, counter))} if self.heap.enabled else {}

        for name, counter, description in (
            ("trims", "trims", "times freed C-heap memory was handed back to the kernel"),
            ("trim_seconds", "seconds", "event-loop time spent handing it back"),
            ("released_bytes", "released_bytes", "resident memory the trims gave back"),
        ):
            tel.observe(f"vvault_pep.heap.{name}", description, functools.partial(heap, counter))
        tel.observe(
            "vvault_pep.connections.open", "open client connections",
            lambda: {(): float(len(self._mtls.connections)) if self._mtls else 0.0},
            gauge=True,
        )  # fmt: skip

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.telemetry.metrics_text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def _version(self, request: web.Request) -> web.Response:
        """What is running: the PEP, its Python, and the OPA it asks (when OPA answers)."""
        assert self.pdp is not None
        body = {
            "version": __version__,
            "python": platform.python_version(),
            "input_schema": SCHEMA,
            "opa": await self.pdp.version(),
        }
        return web.json_response(body)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        assert self.pdp is not None
        if self.supervisor is not None:
            # Which process answers: the child the PEP started, alive, on its own socket.
            checks: dict[str, Any] = {"opa": await self.supervisor.healthy(), "opa_process": self.supervisor.describe()}
        else:
            checks = {"opa": await self.pdp.healthy(), "opa_process": {"managed": False, "url": self.pdp.url}}
        paths = sorted({r.policy for r in self.config.routes})
        if checks["opa"]:
            try:
                checks["policies"] = await self.pdp.defined_paths(paths)
            except PepError as err:
                checks["policies"] = {"error": err.code}
        else:
            checks["policies"] = {p: False for p in paths}
        if self.authn is not None and self.authn.keysets:
            checks["jwks"] = self.authn.ready()
        if self.shared is not None:
            # Informational: without Redis the PEP still serves (L1 and OPA only).
            checks["redis"] = await self.shared.call(lambda c: c.ping()) is not None
            checks["shared_state"] = self.shared_state()
        crls = self.crl_freshness()
        if crls:
            checks["crl"] = {k: left > 0 for k, left in crls.items()}
        if self.draining:
            checks["draining"] = True
        ok = (
            not self.draining
            and checks["opa"] is True
            and all(v is True for v in checks["policies"].values())
            and all(checks.get("jwks", {}).values())
            and all(checks.get("crl", {}).values())
        )
        return ok, checks

    def shared_state(self) -> dict[str, Any]:
        """Where this replica stands with Redis: while unreachable it enforces what it knows."""
        shared, containment, cache = self.shared, self.containment, self.cache
        assert shared is not None
        assert containment is not None
        assert cache is not None
        return {
            "reachable": shared.reachable and shared.available,
            "enforcing": "shared" if shared.reachable and shared.available else "local",
            "down_since": shared.down_since,
            "outages": shared.outages,
            "data_losses": shared.data_losses,
            "unshared_quarantines": containment.unshared,
            "unshared_epoch_bumps": cache.unshared,
            "last_reconciled": containment.last_reconciled,
            # "push": L1 hits answered from pushed state; "reads": per-request reads; "off"
            "l1_hits": ("push" if self.push.healthy else "reads") if self.push is not None else "off",
        }

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, checks = await self.readiness()
        body = orjson.dumps({"ready": ok, "checks": checks})
        return web.Response(status=200 if ok else 503, body=body, content_type="application/json")


def _stamp(tls: ListenerTls) -> tuple[float, ...]:
    out = []
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file, *tls.crl_file):
        try:
            out.append(os.stat(path).st_mtime)
        except OSError:
            out.append(-1.0)
    return tuple(out)


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the listening server here
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])
