"""The stages of the walk, one class each, and their order: :func:`walk`.

A stage is an object with one method, ``async run(x)``, over the request's
:class:`~.exchange.Exchange`: it reads what the stages before it found, sets its own fields,
and raises :class:`~vvault_pep.errors.PepError` to refuse.  A stage that answers (a deny, or
the upstream's response) sets ``x.response`` and the walk ends there.  The services a stage
uses are given once, when the list is built; nothing is looked up per request.

Adding a stage is a class here and a line in :func:`walk`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry.trace import Span, SpanKind

from .. import __version__
from ..config.models import Config
from ..core import decision as enforce
from ..core import responses, sanitize, xfcc
from ..core.decision import Decision
from ..core.hosts import ServedHosts
from ..core.policy_input import build_input
from ..core.principal import Identity, subject_of
from ..core.problem import problem_body
from ..core.routing import RouteTable
from ..decide import inflight
from ..decide.cache import DecisionCache, hints_of, lifetime
from ..decide.pdp import PdpClient
from ..edge import body
from ..edge.forward import Outcome, Upstreams
from ..errors import PepError, Refusal
from ..identity.authn import Authenticator
from ..identity.posture import PostureVerifier
from ..observe.telemetry import KNOWN_METHODS, Telemetry, method_of
from ..shared import ratelimit
from ..shared.containment import Containment
from ..shared.ratelimit import RateLimiter
from ..shared.risk import RiskSignals
from . import memo
from .exchange import Exchange, Trail
from .services import quarantine

# Answers never stored: they say nothing about the next request's answer.
NEVER_CACHED = frozenset({"pdp.undefined", "pdp.malformed_decision", "enforce.unsupported_obligation"})


class Stage(Protocol):
    async def run(self, x: Exchange) -> None: ...


class Forwarder(Protocol):
    """Sends the allowed request on: the upstreams, or nothing at all (``explain``)."""

    async def send(self, x: Exchange, headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, Outcome]: ...


def walk(
    config: Config,
    *,
    hosts: ServedHosts,
    routes: RouteTable,
    authn: Authenticator,
    posture: PostureVerifier,
    risk: RiskSignals,
    containment: Containment,
    limiter: RateLimiter,
    cache: DecisionCache,
    pdp: PdpClient,
    tel: Telemetry,
    in_flight: inflight.InFlight,
    forwarder: Forwarder,
    live: bool = True,
    memoiser: memo.Memoiser | None = None,
) -> list[Stage]:
    """The order of the walk, written once.

    ``live=False`` is ``explain``'s walk: the same stages, but nothing is stored in the cache,
    no obligation is carried out and no denial is counted; the forwarder sends nothing.
    The stages before :class:`Remember` are the static part a connection's memo may stand in
    for (:mod:`.memo`); the pipeline then starts the walk after it.
    """
    return [
        Peer(config),
        Sanitize(config, hosts, tel),
        Route(config, routes, tel),
        Authenticate(authn, tel),
        Posture(config, posture, tel),
        Name(config),
        Remember(memoiser),
        Body(config, in_flight, tel),
        Context(risk, containment, cache, tel),
        RateLimit(limiter),
        Decide(config, cache, pdp, tel, live=live),
        Obligations(containment, cache, limiter, live=live),
        Enforce(config, risk, tel, live=live),
        Forward(config, in_flight, tel, forwarder),
    ]


class Timed:
    """One stage's timing: into the trail and the histogram, a span when received.

    A plain context manager rather than a generator one: it runs nine times a request.
    """

    __slots__ = ("_kind", "_name", "_span_cm", "_started", "_tel", "_trail")

    def __init__(self, tel: Telemetry, trail: Trail, name: str, kind: SpanKind = SpanKind.INTERNAL) -> None:
        self._tel, self._trail, self._name, self._kind = tel, trail, name, kind
        self._span_cm: Any = None

    def __enter__(self) -> Span:
        self._started = time.perf_counter()
        tel = self._tel
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
            self._tel.stage_duration.observe(elapsed, self._name)


class Peer:
    """listener: the verified client certificate, as data (through a trusted front proxy's XFCC)."""

    def __init__(self, config: Config) -> None:
        self.xfcc, self.tls = config.xfcc, config.listener.tls

    async def run(self, x: Exchange) -> None:
        conn = x.conn
        if conn is not None and self.xfcc.trusted_proxies:
            # Only a front proxy's own verified certificate makes its XFCC believed.
            conn = xfcc.accept(self.xfcc, conn, x.raw_headers, require_client_auth_eku=self.tls.require_client_auth_eku)
            if conn.forwarded_by is not None:
                x.trail.fields["forwarded_by"] = conn.forwarded_by.spiffe_id or conn.forwarded_by.sha256
            x.conn = conn
        # Behind a trusted front proxy the source address is the proxy's, shared by every
        # client: without a forwarded certificate nothing names this caller, so it is refused.
        if (self.tls.client_auth == "required" or x.forwarded) and (conn is None or conn.peer is None):
            raise PepError("tls.client_cert_required", "a client certificate is required")
        if conn and conn.peer:
            x.trail.fields["client_cert"] = {"sha256": conn.peer.sha256, "spiffe_id": conn.peer.spiffe_id}
            # Checked on every request, not only at the handshake: a keep-alive
            # connection outlives a short-lived certificate.
            if not conn.peer.valid_at(now()):
                raise PepError("tls.client_cert_expired", "the client certificate is not valid now")


class Sanitize:
    """sanitize: one canonical view, before anything reads the request; unknown hosts refused."""

    def __init__(self, config: Config, hosts: ServedHosts, tel: Telemetry) -> None:
        self.config, self.hosts, self.tel = config, hosts, tel
        self.extra_secrets = frozenset({config.posture.header})
        # The largest body any route takes: a larger one is refused before routing.
        self.max_body_any = max(
            (config.limits.max_body_bytes, *(r.max_body_bytes for r in config.routes if r.max_body_bytes is not None))
        )

    async def run(self, x: Exchange) -> None:
        config, span = self.config, x.span
        with Timed(self.tel, x.trail, "sanitize"):
            sanitize.check_method(x.method)
            x.target = target = sanitize.canonical_target(x.raw_path, config.sanitize, config.limits.max_query_params)
            x.trail.fields["path"] = target.path
            span.set_attribute("url.path", target.path)
            x.headers = headers = sanitize.check_headers(
                x.raw_headers, config.sanitize, config.limits, self.extra_secrets
            )
            span.set_attribute("server.address", headers.host)
            span.set_attribute("server.port", headers.port or 443)
            if not self.hosts.serves(headers.host):
                raise PepError("sanitize.unknown_host", "this listener does not serve that host")
            if headers.content_length is not None and headers.content_length > self.max_body_any:
                raise PepError("sanitize.body_too_large", "request body exceeds the limit")


class Route:
    """route: no match is a 404, never a default upstream; then the route's body limit."""

    def __init__(self, config: Config, routes: RouteTable, tel: Telemetry) -> None:
        self.limits, self.routes, self.tel = config.limits, routes, tel

    async def run(self, x: Exchange) -> None:
        headers, target, trail, span = x.headers, x.target, x.trail, x.span
        with Timed(self.tel, trail, "route"):
            x.match = match = self.routes.match(headers.host, x.method, target.segments, target.trailing_slash)
        route = match.route
        x.max_body = route.max_body_bytes if route.max_body_bytes is not None else self.limits.max_body_bytes
        if headers.content_length is not None and headers.content_length > x.max_body:
            raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        trail.fields["route"] = route.name
        trail.fields["decision_path"] = route.policy
        trail.http_route = route.path
        span.update_name(f"{x.method if x.method in KNOWN_METHODS else 'HTTP'} {route.path}")
        span.set_attribute("http.route", route.path)
        span.set_attribute("vvault_pep.route", route.name)


class Authenticate:
    """authenticate: a token the PEP verified itself, and/or a workload certificate."""

    def __init__(self, authn: Authenticator, tel: Telemetry) -> None:
        self.authn, self.tel = authn, tel

    async def run(self, x: Exchange) -> None:
        with Timed(self.tel, x.trail, "authn"):
            x.identity = identity = await self.authn.authenticate(
                x.headers.authorization, x.target.query_params, x.conn.peer if x.conn else None, x.match.route.authn
            )
        x.trail.fields["identity"] = identity_fields(identity)


class Posture:
    """posture: a signed device assertion, verified and bound to this caller, as data."""

    def __init__(self, config: Config, posture: PostureVerifier, tel: Telemetry) -> None:
        self.wanted, self.posture, self.tel = config.posture.header.encode(), posture, tel

    async def run(self, x: Exchange) -> None:
        with Timed(self.tel, x.trail, "posture"):
            wanted = self.wanted
            assertions = [v.decode("utf-8", "replace") for k, v in x.raw_headers if k.lower() == wanted]
            x.device = device = await self.posture.assess(assertions, x.identity, x.conn.peer if x.conn else None)
        x.trail.fields["device_id"] = device.get("id")


class Name:
    """The subject, from verified names only: containment, rate limits, risk, cache epochs,
    in-flight limits and the audit record all read it, never the input or the client's words."""

    def __init__(self, config: Config) -> None:
        self.tenants = config.identity.workload.tenants

    async def run(self, x: Exchange) -> None:
        peer = x.conn.peer if x.conn else None
        x.subject = x.trail.subject = subject_of(x.identity, peer, x.device, self.tenants)


class Remember:
    """The static part just walked, into the connection's memo when it may be reused."""

    def __init__(self, memoiser: memo.Memoiser | None) -> None:
        self.memoiser = memoiser

    async def run(self, x: Exchange) -> None:
        if self.memoiser is not None and x.memo is not None:
            self.memoiser.remember(x)


class Body:
    """body: read before the decision only where the route lets the policy see it, under the
    body deadline and holding the caller's in-flight slot while it arrives."""

    def __init__(self, config: Config, in_flight: inflight.InFlight, tel: Telemetry) -> None:
        self.limits, self.inflight, self.tel = config.limits, in_flight, tel

    async def run(self, x: Exchange) -> None:
        route = x.match.route
        cfg = route.body
        if cfg is not None:
            who = x.subject
            x.trail.release = self.inflight.take(inflight.client_of(who, x.source_ip), who.principal)
            with Timed(self.tel, x.trail, "body"):
                deadline = route.body_deadline_s or self.limits.body_deadline_s
                x.inspected = await body.inspect(x.request, cfg, x.headers, self.limits.body_idle_timeout_s, deadline)


class Context:
    """Risk, containment and the cache's revision/epochs for the subject: from pushed and
    locally counted state, or (while the push channel is not known healthy) in one Redis round trip.

    The policy input is built here, once: for OPA and the cache key, never read by a stage.
    """

    def __init__(self, risk: RiskSignals, containment: Containment, cache: DecisionCache, tel: Telemetry) -> None:
        self.risk, self.containment, self.cache, self.tel = risk, containment, cache, tel

    async def run(self, x: Exchange) -> None:
        trail, route = x.trail, x.match.route
        x.facts = facts = x.facts_at(trail.request_id, now(), x.inspected)
        who = x.subject
        # risk, containment and the cache's revision/epochs: answered locally when they can be;
        # the reads they still need are queued now and share one round trip (with those of
        # other requests in flight).
        static = x.static
        draft = memo.policy_input(static, facts) if static is not None else build_input(facts, pep_version=__version__)
        with Timed(self.tel, trail, "context"):
            pending = (
                self.risk.assess(who, None if x.forwarded else facts.source_ip, facts.now),
                # contain: every scope of the subject, before any cached allow or OPA
                self.containment.check(who),
                self.cache.context(who.scopes) if route.cache.enabled else _no_context(),
            )
            try:
                x.risk = risk = await pending[0]
                x.contained = contained = await pending[1]
                if self.containment.shared is not None:
                    # Said in the record: a request judged while Redis could not answer was
                    # checked against what this replica knows only.
                    trail.fields["shared_state"] = "ok" if contained.answered else "unavailable"
                contained.raise_if_held()
                x.cache_context = await pending[2]
            finally:
                for waiting in pending:
                    waiting.close()  # those not awaited after a refusal (a no-op for the others)
        trail.fields["risk_score"] = risk.get("score")
        # build_input is pure and risk is the only fact that changed: the same document
        # as build_input(facts with risk), without building it twice.
        x.policy_input = trail.policy_input = doc = {**draft, "risk": risk}
        if static is not None:
            trail.redacted = memo.redacted_input(static, doc)


class RateLimit:
    """The route's rate limit, keyed on the verified subject (or the source address)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def run(self, x: Exchange) -> None:
        route = x.match.route
        if route.rate_limit is not None:
            key = ratelimit.key_of(route.rate_limit, route.name, x.subject, x.source_ip)
            verdict = await self.limiter.check(route.rate_limit, key)
            if not verdict.allowed:
                raise ratelimit.refuse(verdict)


class Decide:
    """decide: L1 → L2 → OPA; only a definite, fresh answer is stored (never those in NEVER_CACHED).

    Not ``live`` (``explain``), nothing is stored; the key a live request reads or stores is
    kept in ``x.cache_key`` instead.
    """

    def __init__(self, config: Config, cache: DecisionCache, pdp: PdpClient, tel: Telemetry, *, live: bool) -> None:
        self.cache_cfg, self.cache, self.pdp, self.tel, self.live = config.cache, cache, pdp, tel, live

    async def run(self, x: Exchange) -> None:
        trail, route, doc, cache = x.trail, x.match.route, x.policy_input, self.cache
        with Timed(self.tel, trail, "cache"):
            static = x.static  # its input is the same as this one outside the per-request parts
            cached, layer, revision, epochs = await cache.lookup(
                route, doc, x.cache_context, interpret=interpret_cached, memo=static.key_memo if static else None
            )
        x.layer, x.revision, x.epochs = layer, revision, epochs
        trail.fields["cache"] = layer
        trail.fields["bundles"] = {"revision": revision or cache.opa_revision}
        self.tel.cache_lookup(layer)
        if layer in ("l1", "l2"):
            x.decision = cached
            trail.raw_result, trail.has_result = cached.raw, True
            if not self.live:
                x.cache_key = await cache.key_of(route, doc, x.cache_context)
            return
        with Timed(self.tel, trail, "pdp", SpanKind.CLIENT) as pdp_span:
            sent = cache.opa_input(route, doc)
            try:
                answer = await self.pdp.decide(
                    route.policy,
                    sent,
                    provenance=layer == "miss" or sent is not doc,
                    headers=self.tel.inject(pdp_span),
                )
                fresh = cache.note_bundles(answer.bundles)
                if sent is not doc and not fresh:
                    # Decided by a revision the paths were not derived from: ask again whole.
                    answer = await self.pdp.decide(route.policy, doc, headers=self.tel.inject(pdp_span))
            except PepError as err:
                self.tel.pdp_errors.inc(err.code)
                raise
        trail.fields["opa_decision_id"] = answer.opa_decision_id
        trail.raw_result, trail.has_result = answer.result, answer.defined
        x.decision = decision = enforce.interpret(answer.result, defined=answer.defined)
        if layer == "miss" and fresh and answer.defined and decision.code not in NEVER_CACHED:
            hints = hints_of(answer.result)
            identity = x.identity
            now = time.time()
            ttl = lifetime(
                allow=decision.allow,
                route=route,
                cfg=self.cache_cfg,
                hints=hints,
                token_exp=identity.user.expires_at if identity.user else None,
                now=now,
                time_dependent=cache.time_dependent(route),
            )
            if self.live:
                # The same moment the lifetime was counted from: the entry ends at the token's exp, not after it.
                cache.store(
                    route, doc, answer.result, ttl_s=ttl, hints=hints, revision=revision, epochs=epochs, now=now
                )
            elif ttl > 0:
                x.cache_key = cache.entry_key(route, doc, revision, epochs, hints.vary)


class Obligations:
    """The decision's quarantine obligations, then the rate limit the policy chose for this caller."""

    def __init__(self, containment: Containment, cache: DecisionCache, limiter: RateLimiter, *, live: bool) -> None:
        self.containment, self.cache, self.limiter, self.live = containment, cache, limiter, live

    async def run(self, x: Exchange) -> None:
        decision, trail, who = x.decision, x.trail, x.subject
        trail.fields["result"] = result_of_decision(decision)
        if decision.obligations:
            done = []
            for scope, ttl_s, reason in decision.obligations:
                value = who.value_of(scope)
                if value is None or not self.live:
                    why = "no such scope" if value is None else "explain carries out nothing"
                    done.append({"type": "quarantine", "scope": scope, "executed": False, "why": why})
                    continue
                by = f"policy:{trail.decision_id}"
                _, shared = await quarantine(self.containment, self.cache, scope, value, ttl_s, reason, by=by)
                done.append(
                    {"type": "quarantine", "scope": scope, "value": value, "ttl_s": ttl_s, "reason": reason,
                     "executed": True, "shared": shared}
                )  # fmt: skip
            trail.fields["obligations"] = done
        policy_limit = decision.extras.get("rate_limit")
        if decision.allow and policy_limit is not None:
            # A limit the policy chose for this caller (e.g. tighter for a risky one).
            route = x.match.route
            key = ratelimit.key_of(policy_limit, f"policy:{route.name}", who, x.source_ip)
            verdict = await self.limiter.check(policy_limit, key)
            if not verdict.allowed:
                raise ratelimit.refuse(verdict)


class Enforce:
    """enforce: a deny stops here unless the route or the rule is in monitor mode."""

    def __init__(self, config: Config, risk: RiskSignals, tel: Telemetry, *, live: bool) -> None:
        self.debug_headers, self.risk, self.tel, self.live = config.cache.debug_headers, risk, tel, live

    async def run(self, x: Exchange) -> None:
        decision, trail, span, route = x.decision, x.trail, x.span, x.match.route
        if self.debug_headers:
            x.decision = decision = dataclasses.replace(
                decision, response_headers=(*decision.response_headers, ("X-Decision-Cache", x.layer))
            )
        enforced = route.mode == "enforce" and not decision.monitor_only
        trail.fields["enforced"] = enforced
        span.set_attribute("vvault_pep.result.allow", decision.allow)
        span.set_attribute("vvault_pep.result.code", decision.code)
        span.set_attribute("vvault_pep.cache", x.layer)
        if not decision.allow:
            if self.live:
                await self.risk.record_denial(x.subject, x.source_ip)
            if enforced:
                refusal = enforce.refusal_of(decision)
                x.response = refuse(x, refusal, extra_headers=decision.response_headers)
                return
            trail.fields["would_have"] = {"status": decision.status, "code": decision.code}
            self.tel.would_deny.inc(route.name, decision.code)


class Forward:
    """forward: one in-flight slot for this caller, then the request goes on, answer streamed back.

    The slot is taken before 100 Continue, so a caller over its limit is refused without
    sending its body.
    """

    def __init__(self, config: Config, in_flight: inflight.InFlight, tel: Telemetry, forwarder: Forwarder) -> None:
        self.config, self.inflight, self.tel, self.forwarder = config, in_flight, tel, forwarder

    async def run(self, x: Exchange) -> None:
        config, trail, route, headers, inspected = self.config, x.trail, x.match.route, x.headers, x.inspected
        if route.body is None:  # a body route took its slot before reading the body
            trail.release = self.inflight.take(inflight.client_of(x.subject, x.source_ip), x.subject.principal)
        request = x.request
        if (
            request is not None
            and headers.expect_continue
            and x.version >= (1, 1)
            and not (inspected and inspected.continued)
        ):
            # Only now that the request is allowed may the client send its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream = config.upstreams[route.upstream]
        with Timed(self.tel, trail, "upstream", SpanKind.CLIENT) as up_span:
            send = upstream_headers(x)
            if upstream.xfcc and x.conn and x.conn.peer:
                element = x.static.xfcc if x.static is not None else None
                send.append(("X-Forwarded-Client-Cert", element or xfcc.emit(x.conn.peer, config.xfcc.by)))
            send.extend(self.tel.inject(up_span).items())
            if self.tel.recording:
                _client_span(up_span, x.method, upstream.url, x.target, config)
            started = time.perf_counter()
            response, outcome = await self.forwarder.send(x, send)
            up_span.set_attribute("http.response.status_code", outcome.status)
            self.tel.upstream_duration.observe(
                time.perf_counter() - started, route.upstream, f"{outcome.status // 100}xx"
            )
        trail.fields["upstream_status"] = outcome.status
        trail.fields["bytes_in"] = outcome.bytes_in
        trail.fields["bytes_out"] = outcome.bytes_out
        if outcome.aborted:
            trail.fields["aborted"] = outcome.aborted
        x.response = response


class ToUpstreams:
    """The live forwarder: the route's upstream, body streamed, answer filtered and streamed back."""

    def __init__(self, config: Config, upstreams: Upstreams | None) -> None:
        if upstreams is None:
            raise ValueError("a live walk needs the upstreams")
        self.config, self.upstreams = config, upstreams
        self.header_policies = {r.name: responses.policy_for(config.responses, r.responses) for r in config.routes}

    async def send(self, x: Exchange, headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, Outcome]:
        if x.request is None:
            raise PepError("internal.error", "no request to forward")
        config, route, decision, inspected = self.config, x.match.route, x.decision, x.inspected
        return await self.upstreams.forward(
            route.upstream,
            x.request,
            path=x.target.path,
            query=x.target.query,
            headers=headers,
            content_length=x.headers.content_length,
            chunked=x.headers.chunked,
            response_headers=[("X-Request-Id", x.trail.request_id), *decision.response_headers],
            redact=decision.redact,
            redact_max_bytes=config.limits.max_redact_bytes,
            header_policy=self.header_policies[route.name],
            body_deadline_s=route.body_deadline_s or config.limits.body_deadline_s,
            prefix=inspected.raw if inspected else b"",
            max_body_bytes=x.max_body,
        )


def upstream_headers(x: Exchange) -> list[tuple[str, str]]:
    """The client's headers the upstream may see, then the PEP's and the policy's own."""
    pep: list[tuple[str, str]] = []
    if x.source_ip:
        pep.append(("X-Forwarded-For", x.source_ip))
    pep.append(("X-Forwarded-Proto", "https"))
    pep.append(("X-Forwarded-Host", x.host))
    pep.append(("X-Request-Id", x.trail.request_id))
    pep.extend(x.decision.upstream_headers)
    static = x.static
    if static is not None:
        # The memo's lists already lack what the PEP always sets; the policy's own names too.
        forward = (*static.forward, *x.volatile_forward) if x.volatile_forward else static.forward
        if not x.decision.upstream_headers:
            return [*forward, *pep]
        named = {name.lower() for name, _ in x.decision.upstream_headers}
        return [(k, v) for k, v in forward if k.lower() not in named] + pep
    # What the PEP or the policy sets replaces the client's header of that name,
    # never sits beside it: frameworks read the first of duplicate headers.
    # x-forwarded-client-cert is the PEP's to set (xfcc.emit), whatever sanitize is configured to strip.
    owned = {name.lower() for name, _ in pep} | {xfcc.HEADER}
    if not x.match.route.forward_authorization:
        owned.add("authorization")  # the PEP judged the credential; the app reads the PEP's headers
    return [(k, v) for k, v in x.headers.forward if k.lower() not in owned] + pep


def refuse(x: Exchange, refusal: Refusal, extra_headers: tuple[tuple[str, str], ...] = ()) -> web.StreamResponse:
    """A refusal as the client sees it: problem+json, no-store, the request id."""
    trail = x.trail
    body = problem_body(refusal, request_id=trail.request_id, decision_id=trail.decision_id)
    resp = web.Response(status=refusal.status, body=body, content_type="application/problem+json")
    resp.headers["X-Request-Id"] = trail.request_id
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Server"] = "vvault-pep"  # not the framework and its version
    for name, value in (*refusal.headers, *extra_headers):
        resp.headers[name] = value
    if refusal.allow_methods:
        resp.headers["Allow"] = ", ".join(refusal.allow_methods)
    if (x.request is not None and x.request.can_read_body) or refusal.code.startswith("sanitize."):
        # The body was never read, or the framing is suspect: close rather
        # than parse what follows as the next request.
        resp.force_close()
    return resp


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


def interpret_cached(result: Any) -> Decision:
    return dataclasses.replace(enforce.interpret(result, defined=True), raw=result)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def identity_fields(identity: Identity) -> dict[str, Any]:
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


def result_of_decision(decision: Decision) -> dict[str, Any]:
    return {
        "allow": decision.allow,
        "status": decision.status,
        "code": decision.code,
        "reasons": [decision.reason] if decision.reason else [],
    }
