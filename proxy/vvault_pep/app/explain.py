"""``vvault-pep explain``: why would this request be allowed or denied?

Runs the walk for one described request — method, path, host, bearer token
file, client certificate, posture assertion file — up to the decision, with
the real OPA (with ``opa.managed``, a managed OPA of its own) and the
configured issuers, and prints the policy input, the decision and its
reasons, the cache key the PEP would use, and the answer the client would
get.  Nothing is forwarded; Redis is not touched (risk shows as unavailable).

The client certificate given here is parsed, not verified against the CA
bundle: this is a diagnostic tool for people who already hold the request.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .. import __version__
from ..config.models import Config
from ..core import decision as enforce
from ..core import sanitize
from ..core.policy_input import Facts, build_input
from ..core.request import Connection, parse_peer
from ..core.routing import RouteTable
from ..decide.cache import digest, project, whole_input
from ..decide.pdp import PdpClient
from ..edge.opa_supervisor import OpaSupervisor
from ..errors import PepError
from ..identity.authn import Authenticator
from ..identity.posture import PostureVerifier
from ..shared.risk import unavailable


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
    supervisor: OpaSupervisor | None = None
    if config.opa.managed:
        # Its own managed OPA on a private socket, as `serve` would: never whatever answers on opa.url.
        supervisor = OpaSupervisor(config.opa)
        pdp = PdpClient(config.opa, url=supervisor.url)
        supervisor.client = pdp
    else:
        pdp = PdpClient(config.opa)
    await authn.start()
    await devices.start()
    try:
        if supervisor is not None:
            try:
                await supervisor.start()
            except (OSError, RuntimeError) as exc:
                out["answer"] = {"status": 503, "code": "pdp.unavailable", "detail": str(exc), "stage": "pdp"}
                return out
        try:
            target = sanitize.canonical_target(path, config.sanitize)
            headers = sanitize.check_headers(
                raw_headers, config.sanitize, config.limits, frozenset({config.posture.header})
            )
            match = RouteTable(config.routes).match(headers.host, method, target.segments, target.trailing_slash)
            identity = await authn.authenticate(headers.authorization, target.query_params, peer, match.route.authn)
        except PepError as err:
            out["answer"] = {"status": err.status, "code": err.code, "detail": err.detail, "stage": "before the policy"}
            return out
        device = await devices.assess(
            [v.decode() for k, v in raw_headers if k.lower() == config.posture.header.encode()], identity, peer
        )
        facts = Facts(
            request_id=uuid.uuid4().hex, method=method, http_version="HTTP/1.1", target=target, headers=headers,
            source_ip="127.0.0.1", source_port=None,
            connection=Connection("TLSv1.3", None, "http/1.1", peer), match=match, identity=identity,
            device=device, risk=unavailable(), now=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        policy_input = build_input(facts, pep_version=__version__)
        out["route"] = {"name": match.route.name, "policy": match.route.policy, "upstream": match.route.upstream}
        out["input"] = policy_input
        try:
            revision = await pdp.revision()
            answer = await pdp.decide(match.route.policy, policy_input, deadline_s=5.0)
        except PepError as err:
            out["answer"] = {"status": err.status, "code": err.code, "detail": err.detail, "stage": "pdp"}
            return out
        decision = enforce.interpret(answer.result, defined=answer.defined)
        out["opa_result"] = answer.result if answer.defined else "(undefined)"
        out["decision"] = {
            "allow": decision.allow,
            "status": decision.status,
            "code": decision.code,
            "reason": decision.reason,
            "reasons": answer.result.get("reasons", []) if isinstance(answer.result, dict) else [],
            "obligations": [list(o) for o in decision.obligations],
            "redact": list(decision.redact),
        }
        out["cache"] = {
            "enabled": match.route.cache.enabled,
            "revision": revision,
            "key": digest("entry", match.route.policy, f"{revision}#?#0", "(epochs from Redis)",
                          whole_input(policy_input) if match.route.cache.key is None
                          else project(policy_input, match.route.cache.key)),
            "note": "the live key also covers the shared revision counter and scope epochs held in Redis",
        }  # fmt: skip
        enforced = match.route.mode == "enforce" and not decision.monitor_only
        if decision.allow or not enforced:
            out["answer"] = {"status": "forwarded", "to": match.route.upstream, "enforced": enforced}
        else:
            out["answer"] = {"status": decision.status, "code": decision.code, "detail": decision.reason}
        return out
    finally:
        await authn.stop()
        await devices.stop()
        await pdp.close()
        if supervisor is not None:
            await supervisor.stop()
