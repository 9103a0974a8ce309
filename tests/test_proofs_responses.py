"""The response-header and whole-answer rules, function by function: what each lets through, exactly.

The integration tests in test_responses.py drive these through a real
upstream; these tables pin the corners one function at a time (a policy
built from the config, cookies read as a browser reads them, the reason a
withheld answer gives in its audit record, the header a refusal names).
"""

from __future__ import annotations

import pytest

from vvault_pep.config import Responses, RouteResponses
from vvault_pep.core import responses
from vvault_pep.errors import PepError


def test_a_route_policy_is_the_global_list_plus_the_routes_rules() -> None:
    common = Responses(drop=("server",), set_cookie="drop")
    plain = responses.policy_for(common, RouteResponses())
    assert plain.drop == frozenset({"server"})
    assert plain.allow is None  # deny-list mode
    assert plain.set_cookie == "drop"  # the global cookie rule when the route names none
    route = responses.policy_for(common, RouteResponses(drop=("x-debug",), allow=("x-app",), set_cookie="pass"))
    assert route.drop == frozenset({"server", "x-debug"})
    assert route.allow == frozenset({"x-app"})
    assert route.set_cookie == "pass"
    # and what they do to an answer
    answer = [("Server", "nginx"), ("X-App", "1"), ("X-Other", "2"), ("Content-Type", "text/plain")]
    assert responses.pass_headers(answer, route) == [("X-App", "1"), ("Content-Type", "text/plain")]
    assert responses.pass_headers(answer, plain) == answer[1:]


@pytest.mark.parametrize(
    ("cookie", "passes"),
    [
        ("s=1; Secure", True),
        ("=x=y; Secure", False),  # no name: the '=' that counts is the first one
        ("s=1; Secure; Domain=a=b.example", False),  # a Domain whose value holds '=' is still a Domain
        ("s=1; Secure; Path=/a=b", True),
    ],
)
def test_cookie_names_and_attributes_split_at_the_first_equals_sign(cookie: str, passes: bool) -> None:
    assert responses.cookie_passes(cookie, "host_only_secure") is passes


def test_headers_named_by_connection_go_whatever_the_spacing() -> None:
    policy = responses.DEFAULT_POLICY
    answer = [("Connection", "x-a,x-b , X-C"), ("X-A", "1"), ("X-B", "2"), ("X-C", "3"), ("X-D", "4")]
    assert responses.pass_headers(answer, policy) == [("X-D", "4")]


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [
        (206, [], "the upstream answered 206 Partial Content"),
        (304, [], "the upstream answered 304 Not Modified to an unconditional request"),
        (200, [("Content-Range", "bytes 0-9/10")], "the upstream answer carries Content-Range"),
        (200, [("Content-Type", "multipart/byteranges; boundary=x")], "the upstream answered multipart/byteranges"),
        (200, [("Content-Type", "")], None),
        (200, [("Content-Type", "text/plain; x=multipart/byteranges")], None),
    ],
)
def test_a_withheld_answer_says_why(status: int, headers: list[tuple[str, str]], reason: str | None) -> None:
    assert responses.partial_reason(status, headers) == reason


def test_a_refused_precondition_names_its_header() -> None:
    with pytest.raises(PepError) as refused:
        responses.whole_answer_request([("Accept", "*/*"), ("If-Match", '"v1"')])
    assert (refused.value.code, refused.value.detail) == (
        "enforce.conditional_refused",
        "If-Match is not accepted where the answer is redacted",
    )
