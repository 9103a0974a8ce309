"""``vvault-pep explain``: why would this request be allowed or denied?

Runs the pipeline's own stage list (:func:`~.stages.walk`) for one described request —
method, path, host, bearer token file, client certificate, posture assertion file — with the
real OPA (with ``opa.managed``, a managed OPA of its own), the configured issuers and, when
configured, Redis: the host and body checks, containment and rate limits run as they would
for a live request, and the cache key printed is the one a live request reads or stores.  The
walk is not live: the forwarder sends nothing, nothing is stored in the cache, no obligation
is carried out and no denial is counted (a rate limit does count this request).

The client certificate given here is parsed, not verified against the CA bundle: this is a
diagnostic tool for people who already hold the request.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from opentelemetry.trace import INVALID_SPAN

from ..config.models import Config
from ..core.request import Connection, parse_peer
from ..decide import revision
from ..decide.cache import DecisionCache
from ..edge.forward import Outcome
from ..errors import PepError
from ..identity.authn import Authenticator
from ..identity.posture import PostureVerifier
from ..observe.audit import AuditLog
from ..observe.telemetry import Telemetry
from ..shared.containment import Containment
from ..shared.ratelimit import RateLimiter
from ..shared.risk import RiskSignals
from ..shared.state import SharedState
from .exchange import Exchange, Trail
from .pipeline import Pipeline
from .services import key_decisions, policy_client


class SendNothing:
    """The forwarder of ``explain``: says where the request would go, sends nothing."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []

    async def send(self, x: Exchange, headers: list[tuple[str, str]]) -> tuple[web.StreamResponse, Outcome]:
        self.headers = headers
        return web.Response(status=204), Outcome(0, 0, 0)


async def explain(
    config: Config,
    *,
    method: str,
    path: str,
    host: str,
    token: str | None,
    cert_pem: bytes | None,
    posture: str | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "path": path, "host": host}}
    raw_headers = [(b"Host", host.encode())]
    if token is not None:
        raw_headers.append((b"Authorization", b"Bearer " + token.strip().encode()))
    if posture is not None:
        raw_headers.append((config.posture.header.encode(), posture.strip().encode()))
    peer = None
    if cert_pem is not None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        peer = parse_peer(
            cert.public_bytes(serialization.Encoding.DER),
            require_client_auth_eku=False,
            trust_domains=config.identity.workload.trust_domains,
        )
    authn, devices = Authenticator(config.identity), PostureVerifier(config.posture)
    # With opa.managed, its own managed OPA on a private socket, as `serve` would: never
    # whatever answers on opa.url.
    pdp, supervisor = policy_client(config)
    shared = SharedState(config.redis) if config.redis is not None else None
    cache = DecisionCache(config.cache, shared)
    await authn.start()
    await devices.start()
    try:
        derived: dict[str, tuple[str, ...]] | None = None
        if supervisor is not None:
            try:
                await supervisor.start()
                derived = await revision.managed_policy_paths(config)
            except (OSError, RuntimeError) as exc:
                out["answer"] = {"status": 503, "code": "pdp.unavailable", "detail": str(exc), "stage": "pdp"}
                return out
        # What OPA runs and what its policies read, as the runtime learns them at start (an OPA
        # that does not answer is the decide stage's refusal, below).
        await key_decisions(config, pdp, cache, derived)
        forwarder = SendNothing()
        pipeline = Pipeline(
            config, pdp, None, authn, cache, _quiet(config), AuditLog(config.audit),
            Containment(shared), RateLimiter(shared), devices, RiskSignals(config.risk, shared),
            forwarder=forwarder, live=False,
        )  # fmt: skip
        trail = Trail(os.urandom(16).hex(), str(uuid.uuid4()), time.perf_counter())
        x = Exchange(
            None, trail, INVALID_SPAN, method, path, tuple(raw_headers), (1, 1), ("127.0.0.1", None),
            Connection("TLSv1.3", None, "http/1.1", peer),
        )  # fmt: skip
        stage_name = ""
        try:
            for stage in pipeline.stages:
                stage_name = type(stage).__name__.lower()
                await stage.run(x)
                if x.response is not None:
                    break
        except PepError as err:
            _describe(out, x)
            out["answer"] = {"status": err.status, "code": err.code, "detail": err.detail, "stage": stage_name}
            return out
        _describe(out, x)
        decision = x.decision
        enforced = x.match.route.mode == "enforce" and not decision.monitor_only
        if decision.allow or not enforced:
            out["answer"] = {"status": "forwarded", "to": x.match.route.upstream, "enforced": enforced}
        else:
            out["answer"] = {"status": decision.status, "code": decision.code, "detail": decision.reason}
        return out
    finally:
        await authn.stop()
        await devices.stop()
        await cache.stop()
        if shared is not None:
            await shared.close()
        await pdp.close()
        if supervisor is not None:
            await supervisor.stop()


def _describe(out: dict[str, Any], x: Exchange) -> None:
    """What the walk found, as far as it went."""
    fields = x.trail.fields
    if "route" in fields:
        route = x.match.route
        out["route"] = {"name": route.name, "policy": route.policy, "upstream": route.upstream}
    if x.trail.policy_input is not None:
        out["input"] = x.trail.policy_input
    if "shared_state" in fields:
        out["shared_state"] = fields["shared_state"]
    if not x.trail.has_result and "cache" not in fields:
        return
    raw = x.trail.raw_result
    out["opa_result"] = raw if x.trail.has_result else "(undefined)"
    if "result" in fields:
        decision = x.decision
        out["decision"] = {
            "allow": decision.allow,
            "status": decision.status,
            "code": decision.code,
            "reason": decision.reason,
            "reasons": raw.get("reasons", []) if isinstance(raw, dict) else [],
            "obligations": fields.get("obligations", [list(o) for o in decision.obligations]),
            "redact": list(decision.redact),
        }
    out["cache"] = {
        "enabled": x.match.route.cache.enabled,
        "layer": fields.get("cache"),
        "revision": x.revision or None,
        "key": x.cache_key,
    }


def _quiet(config: Config) -> Telemetry:
    """Metrics and timings as a live walk has them, but no span sent anywhere."""
    traces = config.telemetry.traces.model_copy(update={"exporter": "none"})
    return Telemetry(config.telemetry.model_copy(update={"traces": traces}))
