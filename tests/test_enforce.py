"""enforce: only a strictly valid allow is an allow."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from vvault_pep.core.decision import interpret, refusal_of
from vvault_pep.core.problem import problem_body
from vvault_pep.errors import PepError


@pytest.mark.parametrize(
    ("result", "allow", "status", "code"),
    [
        (True, True, 200, "policy.allowed"),
        (False, False, 403, "policy.denied"),
        ({"allow": True}, True, 200, "policy.allowed"),
        ({"allow": False}, False, 403, "policy.denied"),
        ({"allow": False, "status": 401, "code": "policy.login"}, False, 401, "policy.login"),
        ({"allow": False, "status": 599}, False, 599, "policy.denied"),
        (None, False, 403, "pdp.malformed_decision"),
        ("true", False, 403, "pdp.malformed_decision"),
        (1, False, 403, "pdp.malformed_decision"),
        ([True], False, 403, "pdp.malformed_decision"),
        ({}, False, 403, "pdp.malformed_decision"),
        ({"allow": "true"}, False, 403, "pdp.malformed_decision"),
        ({"allow": 1}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "status": 200}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "status": 302}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "status": 600}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "status": "403"}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "status": True}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "reason": 5}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "reason": "x\r\nSet-Cookie: a=b"}, False, 403, "pdp.malformed_decision"),
        ({"allow": False, "code": "route.method_not_allowed", "reason": "GET"}, False, 403, "route.method_not_allowed"),
        ({"allow": True, "code": "Bad Code"}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": {"X-A": "a\r\nB: c"}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": {"X A": "a"}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": {"X-A": 1}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": ["X-A"]}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": {"Host": "evil"}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "upstream_headers": {"X-Forwarded-For": "1.1.1.1"}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "response_headers": {"Transfer-Encoding": "chunked"}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "obligations": [{"type": "x"}]}, False, 403, "enforce.unsupported_obligation"),
        ({"allow": True, "obligations": []}, True, 200, "policy.allowed"),
        ({"allow": True, "obligations": [{"type": "redact", "fields": ["value"]}]}, True, 200, "policy.allowed"),
        (
            {"allow": True, "obligations": [{"type": "redact", "fields": []}]},
            False,
            403,
            "enforce.unsupported_obligation",
        ),
        (
            {"allow": True, "obligations": [{"type": "redact", "fields": "value"}]},
            False,
            403,
            "enforce.unsupported_obligation",
        ),
        ({"allow": True, "rate_limit": {"rate_per_s": 1, "burst": 2}}, True, 200, "policy.allowed"),
        ({"allow": True, "rate_limit": {"rate_per_s": 0}}, False, 403, "pdp.malformed_decision"),
        ({"allow": True, "rate_limit": "fast"}, False, 403, "pdp.malformed_decision"),
    ],
)
def test_interpret(result: Any, allow: bool, status: int, code: str) -> None:
    decision = interpret(result, defined=True)
    assert (decision.allow, decision.status, decision.code) == (allow, status, code)


def test_undefined_is_a_deny() -> None:
    decision = interpret(None, defined=False)
    assert (decision.allow, decision.code) == (False, "pdp.undefined")


def test_headers_carried_on_allow() -> None:
    d = interpret(
        {"allow": True, "upstream_headers": {"X-Tenant": "acme"}, "response_headers": {"X-P": "1"}}, defined=True
    )
    assert d.upstream_headers == (("X-Tenant", "acme"),)
    assert d.response_headers == (("X-P", "1"),)


def test_problem_body_is_rfc9457() -> None:
    refusal = refusal_of(interpret({"allow": False, "code": "policy.tenant", "reason": "no"}, defined=True))
    doc = orjson.loads(problem_body(refusal, request_id="r1", decision_id="d1"))
    assert doc == {
        "type": "https://vvault-pep.dev/problems/policy.tenant",
        "title": "Forbidden",
        "status": 403,
        "detail": "no",
        "code": "policy.tenant",
        "request_id": "r1",
        "decision_id": "d1",
    }


def test_unknown_error_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        PepError("made.up")


def test_redact_fields_are_collected() -> None:
    d = interpret(
        {
            "allow": True,
            "obligations": [{"type": "redact", "fields": ["value", "owner"]}, {"type": "redact", "fields": ["value"]}],
        },
        defined=True,
    )
    assert d.redact == ("value", "owner")
