"""The request's walk, written once: :meth:`Pipeline._walk`.

    listener → sanitize → route → authenticate → posture → risk → policy input
             → contain → cache → decide → enforce (+ obligations) → forward
                                                     └→ audit, trace, metrics

Each stage is a call into its own module; this file only orders them, times
each one (a span and a histogram per stage), maps every failure to a
refusal, and writes the audit record in a ``finally`` so a request is on
record even when the client went away mid-way.  Nothing here lets a request
through on an error: the decision starts as denied.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from . import __version__, body, enforce, inflight, ratelimit, responses, sanitize, xfcc
from .audit import AuditLog, now_rfc3339, redact
from .authn import Authenticator, Identity
from .cache import DecisionCache, hints_of, lifetime
from .config import Config
from .containment import Containment
from .enforce import Decision
from .errors import STATUS, PepError, Refusal
from .forward import Upstreams
from .hosts import served_hosts
from .listener import MtlsServer
from .pdp import PdpClient
from .policy_input import Facts, build_input
from .posture import PostureVerifier
from .principal import Subject, subject_of
from .ratelimit import RateLimiter
from .risk import RiskSignals
from .routing import Match, RouteTable
from .telemetry import KNOWN_METHODS, Telemetry, method_of

log = logging.getLogger("vvault_pep.pipeline")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class _Trail:
    """What the audit record needs, filled in as the walk goes."""

    request_id: str
    decision_id: str
    started: float
    span: Span = INVALID_SPAN
    trace_id: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    policy_input: dict[str, Any] | None = None
    release: Callable[[], None] = inflight.nothing_held  # the caller's in-flight slot, once taken
    raw_result: Any = None  # the policy's own answer, for OPA-format decision logs
    http_route: str = ""  # the matched route's template (http.route)
    error_code: str | None = None  # the PEP's refusal code, when it refused (error.type)
    has_result: bool = False
    subject: Subject | None = None


class Pipeline:
    def __init__(
        self,
        config: Config,
        pdp: PdpClient,
        upstreams: Upstreams,
        authn: Authenticator,
        cache: DecisionCache,
        telemetry: Telemetry,
        audit_log: AuditLog,
        containment: Containment,
        limiter: RateLimiter,
        posture: PostureVerifier,
        risk: RiskSignals,
    ) -> None:
        self.containment = containment
        self.limiter = limiter
        self.posture = posture
        self.risk = risk
        self.config = config
        self.authn = authn
        self.cache = cache
        self.pdp = pdp
        self.upstreams = upstreams
        self.tel = telemetry
        self.audit = audit_log
        self.routes = RouteTable(config.routes)
        self.inflight = inflight.InFlight(
            per_client=config.limits.max_in_flight_per_client, per_subject=config.limits.max_in_flight_per_subject
        )
        self.header_policies = {r.name: responses.policy_for(config.responses, r.responses) for r in config.routes}
        self.hosts = served_hosts(config)
        # The largest body any route takes: a larger one is refused before routing.
        self.max_body_any = max(
            (config.limits.max_body_bytes, *(r.max_body_bytes for r in config.routes if r.max_body_bytes is not None))
        )
        self.server: MtlsServer | None = None  # set by the runtime once listening

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trail = _Trail(os.urandom(16).hex(), _uuid4(), time.perf_counter())
        conn = self.server.connection_of(request) if self.server else None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        source_ip = peer[0] if peer else None
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
            trail.span = span
            trail.trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                response = await self._walk(request, trail, span)
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
                    response = self._refuse(request, refusal, trail)
                self._finish(request, trail, response, span)
        return response

    def _stage(self, trail: _Trail, name: str, kind: SpanKind = SpanKind.INTERNAL) -> _Stage:
        return _Stage(self, trail, name, kind)

    async def _walk(self, request: web.BaseRequest, trail: _Trail, span: Span) -> web.StreamResponse:
        config = self.config
        # listener: the verified client certificate, as data
        conn = self.server.connection_of(request) if self.server else None
        if conn is not None and config.xfcc.trusted_proxies:
            # Only a front proxy's own verified certificate makes its XFCC believed.
            conn = xfcc.accept(
                config.xfcc,
                conn,
                request.raw_headers,
                require_client_auth_eku=config.listener.tls.require_client_auth_eku,
            )
            if conn.forwarded_by is not None:
                trail.fields["forwarded_by"] = conn.forwarded_by.spiffe_id or conn.forwarded_by.sha256
        # Behind a trusted front proxy the source address is the proxy's, shared by every
        # client: without a forwarded certificate nothing names this caller, so it is refused.
        forwarded = conn is not None and conn.forwarded_by is not None
        if (config.listener.tls.client_auth == "required" or forwarded) and (conn is None or conn.peer is None):
            raise PepError("tls.client_cert_required", "a client certificate is required")
        if conn and conn.peer:
            trail.fields["client_cert"] = {"sha256": conn.peer.sha256, "spiffe_id": conn.peer.spiffe_id}
            # Checked on every request, not only at the handshake: a keep-alive
            # connection outlives a short-lived certificate.
            if not conn.peer.valid_at(_now()):
                raise PepError("tls.client_cert_expired", "the client certificate is not valid now")
        # sanitize: one canonical view, before anything reads the request
        with self._stage(trail, "sanitize"):
            sanitize.check_method(request.method)
            target = sanitize.canonical_target(request.raw_path, config.sanitize, config.limits.max_query_params)
            trail.fields["path"] = target.path
            span.set_attribute("url.path", target.path)
            headers = sanitize.check_headers(
                request.raw_headers, config.sanitize, config.limits, frozenset({config.posture.header})
            )
            span.set_attribute("server.address", headers.host)
            span.set_attribute("server.port", headers.port or 443)
            if not self.hosts.serves(headers.host):
                raise PepError("sanitize.unknown_host", "this listener does not serve that host")
            if headers.content_length is not None and headers.content_length > self.max_body_any:
                raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        # route: no match is a 404, never a default upstream
        with self._stage(trail, "route"):
            match = self.routes.match(headers.host, request.method, target.segments, target.trailing_slash)
        route = match.route
        max_body = route.max_body_bytes if route.max_body_bytes is not None else config.limits.max_body_bytes
        if headers.content_length is not None and headers.content_length > max_body:
            raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        trail.fields["route"] = route.name
        trail.fields["decision_path"] = route.policy
        trail.http_route = route.path
        span.update_name(f"{request.method if request.method in KNOWN_METHODS else 'HTTP'} {route.path}")
        span.set_attribute("http.route", route.path)
        span.set_attribute("vvault_pep.route", route.name)
        # authenticate: a token the PEP verified itself, and/or a workload certificate
        with self._stage(trail, "authn"):
            identity = await self.authn.authenticate(
                headers.authorization, target.query_params, conn.peer if conn else None, route.authn
            )
        trail.fields["identity"] = _identity_fields(identity)
        # posture: a signed device assertion, verified and bound to this caller, as data
        with self._stage(trail, "posture"):
            wanted = config.posture.header.encode()
            assertions = [v.decode("utf-8", "replace") for k, v in request.raw_headers if k.lower() == wanted]
            device = await self.posture.assess(assertions, identity, conn.peer if conn else None)
        trail.fields["device_id"] = device.get("id")
        # One subject, from verified names only: containment, rate limits, risk, cache
        # epochs and the audit record all read it, never the input or the client's words.
        who = subject_of(identity, conn.peer if conn else None, device, config.identity.workload.tenants)
        trail.subject = who
        peer = request.transport.get_extra_info("peername") if request.transport else None
        # body: read before the decision only where the route lets the policy see it, under
        # the body deadline and holding the caller's in-flight slot while it arrives
        inspected = None
        if route.body is not None:
            trail.release = self.inflight.take(inflight.client_of(who, peer[0] if peer else None), who.principal)
            with self._stage(trail, "body"):
                deadline = route.body_deadline_s or config.limits.body_deadline_s
                inspected = await body.inspect(
                    request, route.body, headers, config.limits.body_idle_timeout_s, deadline
                )
        facts = Facts(
            request_id=trail.request_id,
            method=request.method,
            http_version=f"HTTP/{request.version.major}.{request.version.minor}",
            target=target,
            headers=headers,
            source_ip=peer[0] if peer else None,
            source_port=peer[1] if peer else None,
            connection=conn,
            match=match,
            identity=identity,
            device=device,
            now=_now(),
            body=inspected,
        )
        # risk, containment and the cache's revision/epochs all read Redis: the three reads
        # are queued now and share one round trip (with those of other requests in flight).
        draft = build_input(facts, pep_version=__version__)
        with self._stage(trail, "context"):
            pending = (
                self.risk.assess(who, None if forwarded else facts.source_ip, facts.now),
                # contain: every scope of the subject, before any cached allow or OPA
                self.containment.check(who),
                self.cache.context(who.scopes) if route.cache.enabled else _no_context(),
            )
            try:
                risk = await pending[0]
                contained = await pending[1]
                if self.containment.shared is not None:
                    # Said in the record: a request judged while Redis could not answer was
                    # checked against what this replica knows only.
                    trail.fields["shared_state"] = "ok" if contained.answered else "unavailable"
                contained.raise_if_held()
                context = await pending[2]
            finally:
                for waiting in pending:
                    waiting.close()  # those not awaited after a refusal (a no-op for the others)
        trail.fields["risk_score"] = risk.get("score")
        # build_input is pure and risk is the only fact that changed: the same document
        # as build_input(facts with risk), without building it twice.
        policy_input = {**draft, "risk": risk}
        trail.policy_input = policy_input
        if route.rate_limit is not None:
            verdict = await self.limiter.check(
                route.rate_limit, ratelimit.key_of(route.rate_limit, route.name, who, facts.source_ip)
            )
            if not verdict.allowed:
                raise ratelimit.refuse(verdict)
        # decide: L1 → L2 → OPA; only a definite answer is stored
        with self._stage(trail, "cache"):
            cached, layer, revision, epochs = await self.cache.lookup(
                route, policy_input, context, interpret=_interpret_cached
            )
        trail.fields["cache"] = layer
        trail.fields["bundles"] = {"revision": revision or self.cache.opa_revision}
        self.tel.cache_lookup(layer)
        if layer in ("l1", "l2"):
            decision = cached
            trail.raw_result, trail.has_result = decision.raw, True
        else:
            with self._stage(trail, "pdp", SpanKind.CLIENT) as pdp_span:
                sent = self.cache.opa_input(route, policy_input)
                try:
                    answer = await self.pdp.decide(
                        route.policy,
                        sent,
                        provenance=layer == "miss" or sent is not policy_input,
                        headers=self.tel.inject(pdp_span),
                    )
                    fresh = self.cache.note_bundles(answer.bundles)
                    if sent is not policy_input and not fresh:
                        # Decided by a revision the paths were not derived from: ask again whole.
                        answer = await self.pdp.decide(route.policy, policy_input, headers=self.tel.inject(pdp_span))
                except PepError as err:
                    self.tel.pdp_errors.inc(err.code)
                    raise
            trail.fields["opa_decision_id"] = answer.opa_decision_id
            trail.raw_result, trail.has_result = answer.result, answer.defined
            decision = enforce.interpret(answer.result, defined=answer.defined)
            if layer == "miss" and fresh and answer.defined and decision.code not in _NEVER_CACHED:
                hints = hints_of(answer.result)
                ttl = lifetime(
                    allow=decision.allow,
                    route=route,
                    cfg=config.cache,
                    hints=hints,
                    token_exp=identity.user.expires_at if identity.user else None,
                    now=time.time(),
                    time_dependent=self.cache.time_dependent(route),
                )
                self.cache.store(
                    route, policy_input, answer.result, ttl_s=ttl, hints=hints, revision=revision, epochs=epochs
                )
        trail.fields["result"] = _result_of_decision(decision)
        if decision.obligations:
            trail.fields["obligations"] = await self._carry_out(decision, who, trail)
        policy_limit = decision.extras.get("rate_limit")
        if decision.allow and policy_limit is not None:
            # A limit the policy chose for this caller (e.g. tighter for a risky one).
            verdict = await self.limiter.check(
                policy_limit, ratelimit.key_of(policy_limit, f"policy:{route.name}", who, facts.source_ip)
            )
            if not verdict.allowed:
                raise ratelimit.refuse(verdict)
        if config.cache.debug_headers:
            decision = dataclasses.replace(
                decision, response_headers=(*decision.response_headers, ("X-Decision-Cache", layer))
            )
        # enforce: a deny stops here unless the route or the rule is in monitor mode
        enforced = route.mode == "enforce" and not decision.monitor_only
        trail.fields["enforced"] = enforced
        span.set_attribute("vvault_pep.result.allow", decision.allow)
        span.set_attribute("vvault_pep.result.code", decision.code)
        span.set_attribute("vvault_pep.cache", layer)
        if not decision.allow:
            await self.risk.record_denial(who, facts.source_ip)
            if enforced:
                return self._deny(request, decision, trail)
            trail.fields["would_have"] = {"status": decision.status, "code": decision.code}
            self.tel.would_deny.inc(route.name, decision.code)
        # forward: one slot for this caller while the request is in flight, taken before
        # 100 Continue so that a caller over its limit is refused without sending its body
        if route.body is None:  # a body route took its slot before reading the body
            trail.release = self.inflight.take(inflight.client_of(who, facts.source_ip), who.principal)
        if headers.expect_continue and request.version >= (1, 1) and not (inspected and inspected.continued):
            # Only now that the request is allowed may the client send its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        with self._stage(trail, "upstream", SpanKind.CLIENT) as up_span:
            upstream_headers = self._upstream_headers(request, facts, headers, decision, trail)
            if config.upstreams[route.upstream].xfcc and facts.connection and facts.connection.peer:
                upstream_headers.append(("X-Forwarded-Client-Cert", xfcc.emit(facts.connection.peer, config.xfcc.by)))
            upstream_headers.extend(self.tel.inject(up_span).items())
            if self.tel.recording:
                _client_span(up_span, request.method, config.upstreams[route.upstream].url, target, config)
            started = time.perf_counter()
            response, outcome = await self.upstreams.forward(
                route.upstream,
                request,
                path=target.path,
                query=target.query,
                headers=upstream_headers,
                content_length=headers.content_length,
                chunked=headers.chunked,
                response_headers=[("X-Request-Id", trail.request_id), *decision.response_headers],
                redact=decision.redact,
                redact_max_bytes=config.limits.max_redact_bytes,
                header_policy=self.header_policies[route.name],
                body_deadline_s=route.body_deadline_s or config.limits.body_deadline_s,
                prefix=inspected.raw if inspected else b"",
                max_body_bytes=max_body,
            )
            up_span.set_attribute("http.response.status_code", outcome.status)
            self.tel.upstream_duration.observe(
                time.perf_counter() - started, route.upstream, f"{outcome.status // 100}xx"
            )
        trail.fields["upstream_status"] = outcome.status
        trail.fields["bytes_in"] = outcome.bytes_in
        trail.fields["bytes_out"] = outcome.bytes_out
        if outcome.aborted:
            trail.fields["aborted"] = outcome.aborted
        return response

    async def _carry_out(self, decision: Decision, who: Subject, trail: _Trail) -> list[dict[str, Any]]:
        """Execute the decision's quarantine obligations; the record says what was done."""
        done = []
        for scope, ttl_s, reason in decision.obligations:
            value = who.value_of(scope)
            if value is None:
                done.append({"type": "quarantine", "scope": scope, "executed": False, "why": "no such scope"})
                continue
            _, shared = await self.containment.add(scope, value, ttl_s, reason, by=f"policy:{trail.decision_id}")
            await self.cache.invalidate(scope, value)
            done.append(
                {
                    "type": "quarantine",
                    "scope": scope,
                    "value": value,
                    "ttl_s": ttl_s,
                    "reason": reason,
                    "executed": True,
                    "shared": shared,
                }
            )
        return done

    def _upstream_headers(
        self, request: web.BaseRequest, facts: Facts, headers: sanitize.Headers, decision: Decision, trail: _Trail
    ) -> list[tuple[str, str]]:
        pep: list[tuple[str, str]] = []
        if facts.source_ip:
            pep.append(("X-Forwarded-For", facts.source_ip))
        pep.append(("X-Forwarded-Proto", "https"))
        pep.append(("X-Forwarded-Host", request.host))
        pep.append(("X-Request-Id", trail.request_id))
        pep.extend(decision.upstream_headers)
        # What the PEP or the policy sets replaces the client's header of that name,
        # never sits beside it: frameworks read the first of duplicate headers.
        # x-forwarded-client-cert is the PEP's to set (xfcc.emit), whatever sanitize is configured to strip.
        owned = {name.lower() for name, _ in pep} | {xfcc.HEADER}
        if not facts.match.route.forward_authorization:
            owned.add("authorization")  # the PEP judged the credential; the app reads the PEP's headers
        return [(k, v) for k, v in headers.forward if k.lower() not in owned] + pep

    def _deny(self, request: web.BaseRequest, decision: Decision, trail: _Trail) -> web.StreamResponse:
        refusal = enforce.refusal_of(decision)
        return self._refuse(request, refusal, trail, extra_headers=decision.response_headers)

    def _refuse(
        self,
        request: web.BaseRequest,
        refusal: Refusal,
        trail: _Trail,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> web.StreamResponse:
        body = enforce.problem_body(refusal, request_id=trail.request_id, decision_id=trail.decision_id)
        resp = web.Response(status=refusal.status, body=body, content_type="application/problem+json")
        resp.headers["X-Request-Id"] = trail.request_id
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Server"] = "vvault-pep"  # not the framework and its version
        for name, value in (*refusal.headers, *extra_headers):
            resp.headers[name] = value
        if refusal.allow_methods:
            resp.headers["Allow"] = ", ".join(refusal.allow_methods)
        if request.can_read_body or refusal.code.startswith("sanitize."):
            # The body was never read, or the framing is suspect: close rather
            # than parse what follows as the next request.
            resp.force_close()
        return resp

    def _finish(self, request: web.BaseRequest, trail: _Trail, response: web.StreamResponse | None, span: Span) -> None:
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

    def _record(self, request: web.BaseRequest, trail: _Trail, status: int) -> dict[str, Any]:
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
        if self.config.audit.include_input and trail.policy_input is not None:
            red = self.config.audit.redact
            erase = (*red.erase, f"request.headers.{self.config.posture.header}")
            record["input"], record["redacted"] = redact(trail.policy_input, erase, red.mask, red.query)
        return record


class _Stage:
    """One stage of the walk: timed into the trail and the histogram, a span when received.

    A plain context manager rather than a generator one: it runs nine times a request.
    """

    __slots__ = ("_kind", "_name", "_pipeline", "_span_cm", "_started", "_trail")

    def __init__(self, pipeline: Pipeline, trail: _Trail, name: str, kind: SpanKind) -> None:
        self._pipeline, self._trail, self._name, self._kind = pipeline, trail, name, kind
        self._span_cm: Any = None

    def __enter__(self) -> Span:
        self._started = time.perf_counter()
        tel = self._pipeline.tel
        if tel.recording:
            self._span_cm = tel.tracer.start_as_current_span(self._name, kind=self._kind)
            span: Span = self._span_cm.__enter__()
            return span
        return self._trail.span  # timed and measured, not traced: nothing receives spans

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._span_cm is not None:
                self._span_cm.__exit__(*exc)
        finally:
            elapsed = time.perf_counter() - self._started
            self._trail.stages_ms[self._name] = round(elapsed * 1000, 3)
            self._pipeline.tel.stage_duration.observe(elapsed, self._name)


def _client_span(span: Span, method: str, base: str, target: sanitize.Target, config: Config) -> None:
    """OTel HTTP client conventions on the upstream span (query values redacted unless kept in logs)."""
    parts = urlsplit(base)
    query = target.query
    if query and config.audit.redact.query != "keep":
        query = "&".join(f"{p.partition('=')[0]}=REDACTED" for p in query.split("&"))
    span.set_attribute("http.request.method", method_of(method))
    span.set_attribute("url.full", base + target.path + (f"?{query}" if query else ""))
    span.set_attribute("server.address", parts.hostname or "")
    span.set_attribute("server.port", parts.port or (443 if parts.scheme == "https" else 80))


async def _no_context() -> None:
    return None


def _interpret_cached(result: Any) -> Decision:
    return dataclasses.replace(enforce.interpret(result, defined=True), raw=result)


def _uuid4() -> str:
    """A random (version 4) UUID as text, without building a UUID object."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_NEVER_CACHED = frozenset({"pdp.undefined", "pdp.malformed_decision", "enforce.unsupported_obligation"})


def _identity_fields(identity: Identity) -> dict[str, Any]:
    user, workload = identity.user, identity.workload
    return {
        "kind": identity.kind,
        "subject": user.subject if user else None,
        "issuer": user.issuer if user else None,
        "tenant": user.tenant if user else None,
        "token_id": user.token_id if user else None,
        "cert_bound": identity.cert_bound,
        "workload": workload.spiffe_id if workload else None,
    }


def _result_of(refusal: Refusal) -> dict[str, Any]:
    return {
        "allow": False,
        "status": refusal.status,
        "code": refusal.code,
        "reasons": [refusal.detail or refusal.title],
    }


def _result_of_decision(decision: Decision) -> dict[str, Any]:
    return {
        "allow": decision.allow,
        "status": decision.status,
        "code": decision.code,
        "reasons": [decision.reason] if decision.reason else [],
    }


__all__ = ["STATUS", "Match", "Pipeline"]
