"""Policy input v1: the one document the policy reads (``input``).

This is the contract with Rego authors; ``docs/policy-input.md`` documents
every field, ``docs/policy-input.v1.schema.json`` is its JSON Schema and
``examples/policy-input/`` holds example documents that the tests validate.
A change that removes or retypes a field is a new version.

Building the input is pure: frozen facts in, a plain dict out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .body import Inspected
from .principal import ANONYMOUS, Identity
from .request import Connection
from .routing import Match
from .sanitize import Headers, Target

SCHEMA = "vvault-pep/input/v1"
# The parts of an input that are new on every request, even on one connection repeating
# itself: the request id, the clock, the body, and the risk block the context stage adds.
# Everything else is fixed by what the connection's memo keys on (app/memo.py).
PER_REQUEST: tuple[tuple[str, ...], ...] = (
    ("request", "id"),
    ("request", "body"),
    ("request", "body_truncated"),
    ("time",),
    ("risk",),
)


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the stages before ``decide`` established about a request."""

    request_id: str
    method: str
    http_version: str
    target: Target
    headers: Headers
    source_ip: str | None
    source_port: int | None
    connection: Connection | None
    match: Match
    now: dt.datetime
    identity: Identity = ANONYMOUS
    device: dict[str, Any] | None = None
    risk: dict[str, Any] | None = None
    body: Inspected | None = None  # routes with body.inspect only


def build_input(facts: Facts, *, pep_version: str) -> dict[str, Any]:
    doc = _build(facts, pep_version)
    if facts.body is not None:
        doc["request"].update(facts.body.as_input())
    via = facts.connection.forwarded_by if facts.connection is not None else None
    if via is not None:
        doc["tls"]["forwarded_by"] = {"spiffe_id": via.spiffe_id, "sha256": via.sha256, "subject": via.subject}
    return doc


def _build(facts: Facts, pep_version: str) -> dict[str, Any]:
    conn = facts.connection
    peer = conn.peer if conn is not None else None
    return {
        "version": {"schema": SCHEMA, "pep": pep_version},
        "request": {
            "id": facts.request_id,
            "method": facts.method,
            "protocol": facts.http_version,
            "scheme": "https",
            "host": facts.headers.host,
            "port": facts.headers.port,
            "path": facts.target.path,
            "segments": list(facts.target.segments),
            "trailing_slash": facts.target.trailing_slash,
            "query": {k: list(v) for k, v in facts.target.query_params},
            "headers": {k: list(v) for k, v in facts.headers.policy},
            "content_length": facts.headers.content_length,
            "chunked": facts.headers.chunked,
        },
        "source": {"ip": facts.source_ip, "port": facts.source_port},
        "route": {
            "name": facts.match.route.name,
            "params": dict(facts.match.params),
            "mode": facts.match.route.mode,
        },
        "tls": {
            "version": conn.tls_version if conn else None,
            "cipher": conn.cipher if conn else None,
            "client_cert": peer.as_input() if peer else None,
        },
        "identity": facts.identity.as_input(),
        "device": facts.device if facts.device is not None else {"verified": False, "reason": "absent"},
        "risk": facts.risk
        if facts.risk is not None
        else {"available": False, "score": None, "band": "unknown", "signals": {}},
        "time": time_of(facts.now),
    }


def time_of(now: dt.datetime) -> dict[str, Any]:
    """``input.time`` for that moment."""
    return {
        "now": now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        "unix_ns": int(now.timestamp() * 1_000_000_000),
    }


def with_request_facts(draft: dict[str, Any], facts: Facts) -> dict[str, Any]:
    """``build_input(facts)`` from a ``draft`` built of the same facts but for the request id,
    the clock and the body (which the draft must lack): only those parts are new, the rest is
    shared with ``draft``, which must not change."""
    request = {**draft["request"], "id": facts.request_id}
    if facts.body is not None:
        request.update(facts.body.as_input())
    return {**draft, "request": request, "time": time_of(facts.now)}
