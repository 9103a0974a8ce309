"""The decision: OPA's answer interpreted, with every obligation it carries.

The decision starts as *denied*.  It becomes *allowed* only when the answer
strictly parses as allowed:

* ``true`` → allow; ``false`` → deny (403, ``policy.denied``).
* an object ``{allow, status?, code?, reason?, upstream_headers?,
  response_headers?, obligations?}`` whose ``allow`` is exactly ``true`` and
  whose every other field is well-formed → allow.
* anything else — undefined, ``null``, a string, ``allow: "true"``, a deny
  status outside 400–599, a header with CR/LF, an obligation this PEP cannot
  carry out — is a deny with a reason code saying why.

Obligations: the types registered in :mod:`.obligations` (``quarantine``, carried out by the
pipeline's obligations stage, and ``redact``, field names removed from the JSON answer by the
forwarder); any other type denies.  A refusal's body is :mod:`.problem`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config.models import HOP_BY_HOP
from ..errors import STATUS, Refusal
from .obligations import MAX_TTL_S as MAX_TTL_S
from .obligations import parse_all
from .obligations import parse_obligation as parse_obligation

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CODE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_MAX_REASON = 512
_RESERVED_UPSTREAM = HOP_BY_HOP | {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
_RESERVED_RESPONSE = HOP_BY_HOP | {"x-request-id", "content-type", "content-encoding"}


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    status: int
    code: str
    reason: str
    upstream_headers: tuple[tuple[str, str], ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    monitor_only: bool = False  # a deny the policy wants logged, not enforced (rule roll-out)
    obligations: tuple[tuple[str, float, str], ...] = ()  # quarantines to carry out: (scope, ttl_s, reason)
    redact: tuple[str, ...] = ()  # JSON field names to remove from the response
    raw: Any = field(default=None, compare=False, repr=False)  # the policy's answer as OPA gave it (decision logs)


def _deny(code: str, reason: str, status: int | None = None) -> Decision:
    return Decision(False, status if status is not None else STATUS[code][0], code, reason)


def interpret(result: Any, *, defined: bool) -> Decision:
    """Interpret OPA's ``result``; anything not strictly an allow is a deny."""
    if not defined:
        return _deny("pdp.undefined", "the policy gave no decision for this request")
    if result is True:
        return Decision(True, 200, "policy.allowed", "")
    if result is False:
        return _deny("policy.denied", "denied by policy")
    if not isinstance(result, dict):
        return _deny("pdp.malformed_decision", "the policy decision is not a boolean or an object")
    allow = result.get("allow")
    if not isinstance(allow, bool):
        return _deny("pdp.malformed_decision", "the policy decision has no boolean 'allow'")
    reason = result.get("reason", "")
    if not isinstance(reason, str):
        return _deny("pdp.malformed_decision", "'reason' is not a string")
    reason = reason[:_MAX_REASON]
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in reason):
        return _deny("pdp.malformed_decision", "'reason' has control characters")
    code = result.get("code")
    if code is not None and (not isinstance(code, str) or not _CODE.fullmatch(code) or len(code) > 64):
        return _deny("pdp.malformed_decision", "'code' is not a dotted lower-case code")
    upstream = _headers(result.get("upstream_headers"), _RESERVED_UPSTREAM)
    response = _headers(result.get("response_headers"), _RESERVED_RESPONSE)
    if upstream is None or response is None:
        return _deny("pdp.malformed_decision", "decision headers are malformed or reserved")
    carried = parse_all(result.get("obligations"))
    obligations = tuple(carried.quarantines) if carried is not None else None
    if not allow:
        status = result.get("status", 403)
        # bool is an int in Python: refuse it explicitly.
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            return _deny("pdp.malformed_decision", "a deny status must be an integer in 400-599")
        monitor_only = result.get("monitor_only", False)
        if not isinstance(monitor_only, bool):
            return _deny("pdp.malformed_decision", "'monitor_only' is not a boolean")
        return Decision(
            False,
            status,
            code or "policy.denied",
            reason or "denied by policy",
            (),
            response,
            {},
            monitor_only,
            obligations or (),
        )
    if obligations is None:
        # An obligation this PEP cannot carry out must not be silently dropped:
        # the policy allowed *on condition* of it.
        return _deny("enforce.unsupported_obligation", "the decision carries an obligation this PEP cannot fulfil")
    extras = {k: v for k, v in result.items() if k in ("cache",)}
    redact = tuple(carried.redact) if carried is not None else ()
    if "rate_limit" in result:
        limit = _rate_limit(result["rate_limit"])
        if limit is None:
            return _deny("pdp.malformed_decision", "'rate_limit' is not {per, rate_per_s, burst}")
        extras["rate_limit"] = limit
    return Decision(True, 200, code or "policy.allowed", reason, upstream, response, extras, False, obligations, redact)


def _rate_limit(raw: Any) -> Any:
    """A decision's own rate limit (same shape as a route's), or None if malformed."""
    from pydantic import ValidationError

    from ..config.models import RateLimit

    try:
        return RateLimit.model_validate(raw)
    except ValidationError:
        return None


def _headers(value: Any, reserved: frozenset[str] | set[str]) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return ()
    if not isinstance(value, dict):
        return None
    out: list[tuple[str, str]] = []
    for name, val in value.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name) or name.lower() in reserved:
            return None
        if not isinstance(val, str) or any(c in val for c in "\r\n\x00") or len(val) > 4096:
            return None
        out.append((name, val))
    return tuple(out)


def refusal_of(decision: Decision) -> Refusal:
    title = STATUS.get(decision.code, (decision.status, "Forbidden"))[1]
    if decision.code not in STATUS:
        title = "Forbidden" if decision.status == 403 else "Request denied"
    return Refusal(decision.code, decision.status, title, decision.reason)
