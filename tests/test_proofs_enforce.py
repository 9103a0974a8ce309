"""enforce, pinned whole: every field of the decision, every reason and title a client reads.

tests/test_enforce.py checks (allow, status, code); these tables compare the
entire Decision, so a deny that silently turns monitored, an obligation that
is dropped or a header limit moved by one shows up.
"""

from __future__ import annotations

from typing import Any

import pytest

from vvault_pep.config import RateLimit
from vvault_pep.core.decision import Decision, interpret, refusal_of

MALFORMED = "pdp.malformed_decision"
QUARANTINE = {"type": "quarantine", "scope": "subject", "ttl_s": 60, "reason": "trip-wire"}


def deny(code: str, reason: str, status: int = 403, **kw: Any) -> Decision:
    return Decision(False, status, code, reason, **kw)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (True, Decision(True, 200, "policy.allowed", "")),
        (False, deny("policy.denied", "denied by policy")),
        ("yes", deny(MALFORMED, "the policy decision is not a boolean or an object")),
        ({"allow": 1}, deny(MALFORMED, "the policy decision has no boolean 'allow'")),
        ({"allow": True, "reason": 5}, deny(MALFORMED, "'reason' is not a string")),
        ({"allow": False, "reason": "a\x7fb"}, deny(MALFORMED, "'reason' has control characters")),
        ({"allow": False, "reason": "a\x1fb"}, deny(MALFORMED, "'reason' has control characters")),
        # a space (0x20) and anything above DEL are ordinary text
        ({"allow": False, "reason": "slow down \x80"}, deny("policy.denied", "slow down \x80")),
        ({"allow": True, "code": "A"}, deny(MALFORMED, "'code' is not a dotted lower-case code")),
        ({"allow": True, "code": "a" * 65}, deny(MALFORMED, "'code' is not a dotted lower-case code")),
        ({"allow": True, "code": "a" * 64}, Decision(True, 200, "a" * 64, "")),
        (
            {"allow": True, "upstream_headers": {"X-A": "a\x00"}},
            deny(MALFORMED, "decision headers are malformed or reserved"),
        ),
        (
            {"allow": True, "response_headers": {"X-A": "a\n"}},
            deny(MALFORMED, "decision headers are malformed or reserved"),
        ),
        (
            {"allow": True, "upstream_headers": {"X-A": "v" * 4097}},
            deny(MALFORMED, "decision headers are malformed or reserved"),
        ),
        (
            {"allow": True, "upstream_headers": {"X-A": "X" * 4096}},
            Decision(True, 200, "policy.allowed", "", upstream_headers=(("X-A", "X" * 4096),)),
        ),
        ({"allow": False, "status": 399}, deny(MALFORMED, "a deny status must be an integer in 400-599")),
        ({"allow": False, "status": 400}, deny("policy.denied", "denied by policy", 400)),
        ({"allow": False, "monitor_only": "false"}, deny(MALFORMED, "'monitor_only' is not a boolean")),
        ({"allow": False}, deny("policy.denied", "denied by policy")),
        (
            {"allow": False, "monitor_only": True, "reason": "new rule", "response_headers": {"X-R": "1"}},
            deny("policy.denied", "new rule", monitor_only=True, response_headers=(("X-R", "1"),)),
        ),
        (
            {"allow": False, "code": "policy.compromised", "obligations": [QUARANTINE]},
            deny("policy.compromised", "denied by policy", obligations=(("subject", 60.0, "trip-wire"),)),
        ),
        (
            {"allow": True, "obligations": [{"type": "redact", "fields": ["value"]}, QUARANTINE]},
            Decision(True, 200, "policy.allowed", "", obligations=(("subject", 60.0, "trip-wire"),), redact=("value",)),
        ),
        (
            # a stray "fields" on a quarantine is not a redaction
            {"allow": True, "obligations": [{**QUARANTINE, "fields": ["value"]}]},
            Decision(True, 200, "policy.allowed", "", obligations=(("subject", 60.0, "trip-wire"),)),
        ),
        (
            {"allow": True, "obligations": [5]},
            deny("enforce.unsupported_obligation", "the decision carries an obligation this PEP cannot fulfil"),
        ),
        (
            {"allow": True, "obligations": [{"type": "redact", "fields": [1]}]},
            deny("enforce.unsupported_obligation", "the decision carries an obligation this PEP cannot fulfil"),
        ),
        (
            {"allow": True, "obligations": [{"type": "redact", "fields": [""]}]},
            deny("enforce.unsupported_obligation", "the decision carries an obligation this PEP cannot fulfil"),
        ),
        (
            {"allow": True, "reason": "ok", "cache": {"ttl_s": 5}, "other": 1},
            Decision(True, 200, "policy.allowed", "ok", extras={"cache": {"ttl_s": 5}}),
        ),
        (
            {"allow": True, "rate_limit": {"rate_per_s": 2, "burst": 3}},
            Decision(True, 200, "policy.allowed", "", extras={"rate_limit": RateLimit(rate_per_s=2, burst=3)}),
        ),
        ({"allow": True, "rate_limit": {}}, deny(MALFORMED, "'rate_limit' is not {per, rate_per_s, burst}")),
    ],
)
def test_the_whole_decision(result: Any, expected: Decision) -> None:
    assert interpret(result, defined=True) == expected


def test_undefined_says_so() -> None:
    assert interpret(True, defined=False) == deny("pdp.undefined", "the policy gave no decision for this request")


@pytest.mark.parametrize(
    ("result", "status", "title", "detail"),
    [
        ({"allow": False}, 403, "Forbidden", "denied by policy"),
        ({"allow": False, "code": "policy.tenant"}, 403, "Forbidden", "denied by policy"),
        ({"allow": False, "code": "policy.slow", "status": 429, "reason": "wait"}, 429, "Request denied", "wait"),
        (
            {"allow": False, "code": "route.method_not_allowed", "status": 403},
            403,
            "Method not allowed",
            "denied by policy",
        ),
    ],
)
def test_refusal_titles(result: Any, status: int, title: str, detail: str) -> None:
    refusal = refusal_of(interpret(result, defined=True))
    assert (refusal.status, refusal.title, refusal.detail) == (status, title, detail)
