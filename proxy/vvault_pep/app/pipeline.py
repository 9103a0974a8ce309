"""The request's walk: the stage list of :func:`~.stages.walk`, run in order over one exchange.

    peer → sanitize → route → authenticate → posture → name (the verified subject) → body
    → context (risk, containment, cache epochs; the policy input) → rate limit
    → decide (L1 → L2 → OPA) → obligations → enforce → forward
                  └→ audit, trace, metrics

Each stage is a class of :mod:`.stages` over the request's :class:`~.exchange.Exchange`;
this file runs them, maps every failure to a refusal, and writes the audit record in a
``finally`` so a request is on record even when the client went away mid-way.  Nothing
here lets a request through on an error: the decision starts as denied.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from aiohttp import web
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from ..config.models import Config
from ..core.hosts import served_hosts
from ..core.routing import Match, RouteTable
from ..decide import inflight
from ..decide.cache import DecisionCache
from ..decide.pdp import PdpClient
from ..edge.forward import Upstreams
from ..edge.listener import MtlsServer
from ..errors import STATUS, PepError, Refusal
from ..identity.authn import Authenticator
from ..identity.posture import PostureVerifier
from ..observe.audit import AuditLog, redact
from ..observe.sinks import now_rfc3339
from ..observe.telemetry import Telemetry, method_of
from ..shared.containment import Containment
from ..shared.ratelimit import RateLimiter
from ..shared.risk import RiskSignals
from . import memo, stages
from .exchange import Exchange, Trail

log = logging.getLogger("vvault_pep.pipeline")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Pipeline:
    def __init__(
        self,
        config: Config,
        pdp: PdpClient,
        upstreams: Upstreams | None,
        authn: Authenticator,
        cache: DecisionCache,
        telemetry: Telemetry,
        audit_log: AuditLog,
        containment: Containment,
        limiter: RateLimiter,
        posture: PostureVerifier,
        risk: RiskSignals,
        *,
        forwarder: stages.Forwarder | None = None,
        live: bool = True,
    ) -> None:
        self.config = config
        self.tel = telemetry
        self.audit = audit_log
        self.inflight = inflight.InFlight(
            per_client=config.limits.max_in_flight_per_client, per_subject=config.limits.max_in_flight_per_subject
        )
        self.tls_reloads = 0  # the runtime counts them: a memo entry made before one is dropped
        # Only a live walk over real connections remembers (never ``explain``'s).
        self.memoiser = (
            memo.Memoiser(config, authn, containment, cache, lambda: self.tls_reloads)
            if live and config.listener.memo
            else None
        )
        self.stages = stages.walk(
            config,
            hosts=served_hosts(config),
            routes=RouteTable(config.routes),
            authn=authn,
            posture=posture,
            risk=risk,
            containment=containment,
            limiter=limiter,
            cache=cache,
            pdp=pdp,
            tel=telemetry,
            in_flight=self.inflight,
            forwarder=forwarder or stages.ToUpstreams(config, upstreams),
            live=live,
            memoiser=self.memoiser,
        )
        # What a recalled request still walks: everything after the static part.
        static_end = next(i for i, stage in enumerate(self.stages) if isinstance(stage, stages.Remember))
        self.after_static = self.stages[static_end + 1 :]
        self.server: MtlsServer | None = None  # set by the runtime once listening

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trail = Trail(os.urandom(16).hex(), _uuid4(), time.perf_counter())
        conn = self.server.connection_of(request) if self.server else None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        source_ip = peer[0] if peer else None
        x = Exchange(
            request, trail, INVALID_SPAN, request.method, request.raw_path, request.raw_headers, request.version,
            peer, conn,
        )  # fmt: skip
        if self.memoiser is not None and self.server is not None:
            x.memo = self.server.memo_of(request, self.memoiser.new)
            if x.memo is not None and x.memo.owner is not self.memoiser:
                x.memo = None
        parent = self.tel.trusted_context(
            request.headers, source_ip, conn.peer.spiffe_id if conn and conn.peer else None
        )
        refusal: Refusal | None = None
        response: web.StreamResponse | None = None
        method = method_of(request.method)
        attributes = {
            "http.request.method": method,
            "url.scheme": "https",
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            "client.address": source_ip or "",
            "vvault_pep.request_id": trail.request_id,
            "vvault_pep.decision_id": trail.decision_id,
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = request.method
        user_agent = request.headers.get("User-Agent")
        if user_agent:
            attributes["user_agent.original"] = user_agent[:256]
        with self.tel.server_span(method if method != "_OTHER" else "HTTP", parent, attributes) as span:
            trail.span = x.span = span
            trail.trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                response = await self.walk(x)
                return response
            except PepError as err:
                refusal = err.refusal()
                if "result" in trail.fields:
                    # Refused after the policy allowed (body too slow, answer withheld …):
                    # the record keeps the decision and says what happened next.
                    trail.fields["error"] = {"code": err.code, "status": err.status, "reason": err.detail}
            except Exception:
                # Never a traceback to the client; the type goes to the log.
                log.exception("unexpected error in the request walk")
                refusal = PepError("internal.error").refusal()
            finally:
                trail.release()
                if refusal is not None:
                    trail.error_code = refusal.code
                    trail.fields.setdefault("result", _result_of(refusal))
                    response = stages.refuse(x, refusal)
                self._finish(request, trail, response, span)
        return response

    async def walk(self, x: Exchange) -> web.StreamResponse:
        """Run the stages in order until one answers (a deny, or the upstream's response).

        A request the connection's memo recalls starts after the static part.
        """
        walk = self.stages
        if x.memo is not None and self.memoiser is not None:
            started = time.perf_counter()
            if self.memoiser.recall(x):
                walk = self.after_static
                elapsed = time.perf_counter() - started
                x.trail.stages_ms["memo"] = round(elapsed * 1000, 3)  # on a recall only: it stands for the rest
                self.tel.stage_duration.observe(elapsed, "memo")
        for stage in walk:
            await stage.run(x)
            if x.response is not None:
                return x.response
        raise PepError("internal.error", "the walk ended without an answer")

    def _finish(self, request: web.BaseRequest, trail: Trail, response: web.StreamResponse | None, span: Span) -> None:
        status = response.status if response is not None else 0
        route = trail.fields.get("route", "none")
        result = trail.fields.get("result") or {}
        span.set_attribute("http.response.status_code", status)
        if status >= 500 or status == 0:
            # error.type: the PEP's stable code when it refused, the status when the upstream failed
            span.set_attribute("error.type", trail.error_code or str(status or "_OTHER"))
            span.set_status(Status(StatusCode.ERROR))
        self.tel.http_duration.observe(
            time.perf_counter() - trail.started, method_of(request.method), trail.http_route, str(status), "https"
        )
        method_class = "read" if request.method in _READ_METHODS else "write"
        self.tel.requests.inc(route, method_class, str(status))
        self.tel.decisions.inc(
            "allow" if result.get("allow") else "deny",
            str(result.get("code", "none")),
            "true" if trail.fields.get("enforced", True) else "false",
        )
        self.audit.emit(self._record(request, trail, status), result=trail.raw_result, has_result=trail.has_result)

    def record_parser_refusal(self, fields: dict[str, Any]) -> None:
        """A request aiohttp's parser refused before the walk: one record all the same."""
        self.tel.requests.inc("none", "unknown", str(fields["status"]))
        self.audit.emit({"timestamp": now_rfc3339(), "decision_id": _uuid4(), "route": None, **fields})

    def _record(self, request: web.BaseRequest, trail: Trail, status: int) -> dict[str, Any]:
        fields = dict(trail.fields)
        cert = fields.pop("client_cert", None) or {}
        identity = fields.get("identity") or {}
        record: dict[str, Any] = {
            "timestamp": now_rfc3339(),
            "decision_id": trail.decision_id,
            "request_id": trail.request_id,
            "trace_id": trail.trace_id,
            "route": fields.pop("route", None),
            "method": request.method,
            "path": fields.pop("decision_path", None),
            "request_path": fields.pop("path", None),
            "source_ip": request.remote,
            "client_cert_sha256": cert.get("sha256"),
            "spiffe_id": cert.get("spiffe_id"),
            "subject": identity.get("subject") or identity.get("workload"),
            "issuer": identity.get("issuer"),
            "tenant": trail.subject.tenant if trail.subject is not None else None,
            # every scope containment checked (verified names only)
            "scopes": [list(pair) for pair in trail.subject.scopes] if trail.subject is not None else [],
            "device_id": fields.pop("device_id", None),
            "risk_score": fields.pop("risk_score", None),
            "bundles": fields.pop("bundles", None),
            "result": fields.pop("result", None),
            "obligations": fields.pop("obligations", []),
            "cache": fields.pop("cache", None),
            "status": status,
            "latency_ms": round((time.perf_counter() - trail.started) * 1000, 3),
            "stages_ms": trail.stages_ms,
            "upstream_status": fields.pop("upstream_status", None),
            "bytes_in": fields.pop("bytes_in", 0),
            "bytes_out": fields.pop("bytes_out", 0),
            **fields,
        }
        if self.config.audit.include_input and trail.redacted is not None:
            record["input"], record["redacted"] = trail.redacted
        elif self.config.audit.include_input and trail.policy_input is not None:
            red = self.config.audit.redact
            erase = (*red.erase, f"request.headers.{self.config.posture.header}")
            record["input"], record["redacted"] = redact(trail.policy_input, erase, red.mask, red.query)
        return record


def _uuid4() -> str:
    """A random (version 4) UUID as text, without building a UUID object."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _result_of(refusal: Refusal) -> dict[str, Any]:
    return {
        "allow": False,
        "status": refusal.status,
        "code": refusal.code,
        "reasons": [refusal.detail or refusal.title],
    }


__all__ = ["STATUS", "Match", "Pipeline"]
