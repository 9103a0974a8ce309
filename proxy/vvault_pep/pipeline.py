"""The request's walk, written once: :meth:`Pipeline.handle`.

    listener → sanitize → route → policy input → decide → enforce → forward
                                                                  └→ audit

Each stage is a call into its own module; this file only orders them, maps
every failure to a refusal, and writes the audit record in a ``finally`` so a
request is on record even when the client went away mid-way.  Nothing here
lets a request through on an error: the decision starts as denied.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import __version__, audit, enforce, sanitize
from .authn import Authenticator, Identity
from .cache import DecisionCache, hints_of, lifetime
from .config import Config
from .enforce import Decision
from .errors import STATUS, PepError, Refusal
from .forward import Upstreams
from .listener import MtlsServer
from .pdp import PdpClient
from .policy_input import Facts, build_input
from .routing import Match, RouteTable

log = logging.getLogger("vvault_pep.pipeline")


@dataclass
class _Trail:
    """What the audit record needs, filled in as the walk goes."""

    request_id: str
    decision_id: str
    started: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages_ms[stage] = round((now - since) * 1000, 3)
        return now


class Pipeline:
    def __init__(
        self, config: Config, pdp: PdpClient, upstreams: Upstreams, authn: Authenticator, cache: DecisionCache
    ) -> None:
        self.config = config
        self.authn = authn
        self.cache = cache
        self.pdp = pdp
        self.upstreams = upstreams
        self.routes = RouteTable(config.routes)
        self.server: MtlsServer | None = None  # set by the runtime once listening

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trail = _Trail(uuid.uuid4().hex, str(uuid.uuid4()), time.perf_counter())
        refusal: Refusal | None = None
        response: web.StreamResponse | None = None
        try:
            response = await self._walk(request, trail)
            return response
        except PepError as err:
            refusal = err.refusal()
        except Exception:
            # Never a traceback to the client; the type goes to the log.
            log.exception("unexpected error in the request walk")
            refusal = PepError("internal.error").refusal()
        finally:
            if refusal is not None:
                trail.fields.setdefault("result", _result_of(refusal))
                response = self._refuse(request, refusal, trail)
            self._audit(request, trail, response)
        return response

    async def _walk(self, request: web.BaseRequest, trail: _Trail) -> web.StreamResponse:
        config = self.config
        t = trail.started
        # listener: the verified client certificate, as data
        conn = self.server.connection_of(request) if self.server else None
        if config.listener.tls.client_auth == "required" and (conn is None or conn.peer is None):
            raise PepError("tls.client_cert_required", "a client certificate is required")
        if conn and conn.peer:
            trail.fields["client_cert"] = {"sha256": conn.peer.sha256, "spiffe_id": conn.peer.spiffe_id}
        # sanitize: one canonical view, before anything reads the request
        target = sanitize.canonical_target(request.raw_path, config.sanitize)
        trail.fields["path"] = target.path
        headers = sanitize.check_headers(request.raw_headers, config.sanitize, config.limits)
        if headers.content_length is not None and headers.content_length > config.limits.max_body_bytes:
            raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        t = trail.lap("sanitize", t)
        # route: no match is a 404, never a default upstream
        match = self.routes.match(headers.host, request.method, target.segments, target.trailing_slash)
        trail.fields["route"] = match.route.name
        trail.fields["decision_path"] = match.route.policy
        t = trail.lap("route", t)
        # authenticate: a token the PEP verified itself, and/or a workload certificate
        identity = await self.authn.authenticate(
            headers.authorization, target.query_params, conn.peer if conn else None, match.route.authn
        )
        trail.fields["identity"] = _identity_fields(identity)
        t = trail.lap("authn", t)
        # policy input → decide
        peer = request.transport.get_extra_info("peername") if request.transport else None
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
            now=dt.datetime.now(dt.UTC),
        )
        trail.fields["source_ip"] = facts.source_ip
        policy_input = build_input(facts, pep_version=__version__)
        # decide: L1 → L2 → OPA; only a definite answer is stored
        route = match.route
        t = time.perf_counter()
        cached, layer, revision, epochs = await self.cache.lookup(route, policy_input)
        trail.fields["cache"] = layer
        t = trail.lap("cache", t)
        if layer in ("l1", "l2"):
            decision = enforce.interpret(cached, defined=True)
        else:
            answer = await self.pdp.decide(route.policy, policy_input, provenance=layer == "miss")
            t = trail.lap("pdp", t)
            trail.fields["opa_decision_id"] = answer.opa_decision_id
            decision = enforce.interpret(answer.result, defined=answer.defined)
            fresh = self.cache.note_bundles(answer.bundles)
            if layer == "miss" and fresh and answer.defined and decision.code not in _NEVER_CACHED:
                hints = hints_of(answer.result)
                ttl = lifetime(
                    allow=decision.allow,
                    route=route,
                    cfg=config.cache,
                    hints=hints,
                    token_exp=identity.user.expires_at if identity.user else None,
                    now=time.time(),
                )
                self.cache.store(
                    route, policy_input, answer.result, ttl_s=ttl, hints=hints, revision=revision, epochs=epochs
                )
        trail.fields["result"] = _result_of_decision(decision)
        if config.cache.debug_headers:
            decision = dataclasses.replace(
                decision, response_headers=(*decision.response_headers, ("X-Decision-Cache", layer))
            )
        enforced = match.route.mode == "enforce"
        trail.fields["enforced"] = enforced
        if not decision.allow and enforced:
            return self._deny(request, decision, trail)
        # forward
        if headers.expect_continue and request.version >= (1, 1):
            # Only now that the request is allowed may the client send its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream_headers = self._upstream_headers(request, facts, headers, decision, trail)
        response, outcome = await self.upstreams.forward(
            match.route.upstream,
            request,
            path=target.path,
            query=target.query,
            headers=upstream_headers,
            content_length=headers.content_length,
            chunked=headers.chunked,
            response_headers=[("X-Request-Id", trail.request_id), *decision.response_headers],
        )
        trail.lap("upstream", t)
        trail.fields["upstream_status"] = outcome.status
        trail.fields["bytes_in"] = outcome.bytes_in
        trail.fields["bytes_out"] = outcome.bytes_out
        return response

    def _upstream_headers(
        self, request: web.BaseRequest, facts: Facts, headers: sanitize.Headers, decision: Decision, trail: _Trail
    ) -> list[tuple[str, str]]:
        out = list(headers.forward)
        # Set, never appended: the client's copies were stripped in sanitize.
        if facts.source_ip:
            out.append(("X-Forwarded-For", facts.source_ip))
        out.append(("X-Forwarded-Proto", "https"))
        out.append(("X-Forwarded-Host", request.host))
        out.append(("X-Request-Id", trail.request_id))
        out.extend(decision.upstream_headers)
        return out

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
        for name, value in (*refusal.headers, *extra_headers):
            resp.headers[name] = value
        if refusal.code == "route.method_not_allowed":
            resp.headers["Allow"] = refusal.detail.removeprefix("allowed: ")
        if request.can_read_body or refusal.code.startswith("sanitize."):
            # The body was never read, or the framing is suspect: close rather
            # than parse what follows as the next request.
            resp.force_close()
        return resp

    def _audit(self, request: web.BaseRequest, trail: _Trail, response: web.StreamResponse | None) -> None:
        cert = trail.fields.pop("client_cert", None) or {}
        result = trail.fields.pop("result", None)
        record: dict[str, Any] = {
            "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "decision_id": trail.decision_id,
            "request_id": trail.request_id,
            "method": request.method,
            "path": trail.fields.pop("decision_path", None),
            "request_path": trail.fields.pop("path", None),
            "client_cert_sha256": cert.get("sha256"),
            "spiffe_id": cert.get("spiffe_id"),
            "result": result,
            "status": response.status if response is not None else None,
            "latency_ms": round((time.perf_counter() - trail.started) * 1000, 3),
            "stages_ms": trail.stages_ms,
            **trail.fields,
        }
        audit.emit(record)


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
