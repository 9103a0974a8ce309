"""sanitize: the canonical path and the header checks, as tables."""

from __future__ import annotations

import pytest

from vvault_pep.config import Limits, Sanitize
from vvault_pep.core.sanitize import canonical_target, check_headers
from vvault_pep.errors import PepError

RULES = Sanitize(reject_semicolon=False)  # the canonical form; refusing `;` is tested below
LIMITS = Limits()


@pytest.mark.parametrize(
    ("raw", "path", "segments"),
    [
        ("/", "/", ()),
        ("/a/b", "/a/b", ("a", "b")),
        ("/a/b/", "/a/b/", ("a", "b")),
        ("//a///b", "/a/b", ("a", "b")),
        ("/a/./b", "/a/b", ("a", "b")),
        ("/a/b/..", "/a/", ("a",)),
        ("/a/b/.", "/a/b/", ("a", "b")),
        ("/a/../b", "/b", ("b",)),
        ("/a/%2e%2E/b", "/b", ("b",)),
        ("/%61%62%7E", "/ab~", ("ab~",)),
        ("/a%20b", "/a%20b", ("a b",)),
        ("/a%3fb", "/a%3Fb", ("a?b",)),
        ("/caf%C3%A9", "/caf%C3%A9", ("café",)),
        ("/a;b", "/a;b", ("a;b",)),
        ("/x:y@z", "/x:y@z", ("x:y@z",)),
    ],
)
def test_canonical_paths(raw: str, path: str, segments: tuple[str, ...]) -> None:
    target = canonical_target(raw, RULES)
    assert target.path == path
    assert target.segments == segments


def test_canonical_form_is_a_fixed_point() -> None:
    for raw in ("/a/../b/%2e/c%20d/", "//x/./y/%7e", "/caf%c3%a9/../t"):
        once = canonical_target(raw, RULES).path
        assert canonical_target(once, RULES).path == once


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("http://evil/a", "sanitize.bad_request_target"),
        ("*", "sanitize.bad_request_target"),
        ("/a#frag", "sanitize.bad_request_target"),
        ("/a b", "sanitize.bad_request_target"),
        ("/a\x00b", "sanitize.bad_request_target"),
        ("/é", "sanitize.bad_request_target"),
        ("/a\\b", "sanitize.ambiguous_path"),
        ("/a%2fb", "sanitize.ambiguous_path"),
        ("/a%2Fb", "sanitize.ambiguous_path"),
        ("/a%5cb", "sanitize.ambiguous_path"),
        ("/a%00", "sanitize.ambiguous_path"),
        ("/a%0d%0aX", "sanitize.ambiguous_path"),
        ("/a%7f", "sanitize.ambiguous_path"),
        ("/a%", "sanitize.ambiguous_path"),
        ("/a%4", "sanitize.ambiguous_path"),
        ("/a%g0", "sanitize.ambiguous_path"),
        ("/a%252e", "sanitize.ambiguous_path"),
        ("/%c0%ae%c0%ae/x", "sanitize.ambiguous_path"),
        ("/%ff", "sanitize.ambiguous_path"),
        ("/..", "sanitize.path_escape"),
        ("/a/../..", "sanitize.path_escape"),
        ("/a/%2e%2e/%2e%2e/b", "sanitize.path_escape"),
    ],
)
def test_refused_paths(raw: str, code: str) -> None:
    with pytest.raises(PepError) as err:
        canonical_target(raw, RULES)
    assert err.value.code == code
    assert err.value.status == 400


@pytest.mark.parametrize("raw", ["/a;b", "/a%3bb", "/a/..;/admin"])
def test_semicolons_refused_when_configured(raw: str) -> None:
    with pytest.raises(PepError) as err:
        canonical_target(raw, Sanitize(reject_semicolon=True))
    assert err.value.code == "sanitize.ambiguous_path"


def test_encoded_percent_allowed_when_configured() -> None:
    assert canonical_target("/a%25b", Sanitize(reject_encoded_percent=False)).segments == ("a%b",)


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("a=1&a=2&b=", (("a", ("1", "2")), ("b", ("",)))),
        ("x=a+b%20c", (("x", ("a b c",)),)),
        ("flag", (("flag", ("",)),)),
        ("", ()),
    ],
)
def test_query_parsing(query: str, params: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    target = canonical_target(f"/p?{query}", RULES)
    assert target.query == query
    assert target.query_params == params


@pytest.mark.parametrize("query", ["a=%00", "a=%zz", "a=%ff", "a=b c", "a=\\"])
def test_bad_queries(query: str) -> None:
    with pytest.raises(PepError) as err:
        canonical_target(f"/p?{query}", RULES)
    assert err.value.code == "sanitize.bad_query"


def _h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_headers_split_and_stripped() -> None:
    headers = check_headers(
        _h(
            ("Host", "API.Example:8443"),
            ("Accept", "application/json"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-Client-Cert-Subject", "CN=admin"),
            ("X_Forwarded_For", "1.2.3.4"),
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eA=="),
            ("TE", "trailers"),
            ("X-Keep", "v"),
            ("Authorization", "Bearer t"),
        ),
        RULES,
        LIMITS,
    )
    assert headers.host == "api.example"
    assert headers.port == 8443
    assert headers.authorization == "Bearer t"
    assert dict(headers.forward) == {"Accept": "application/json", "X-Keep": "v", "Authorization": "Bearer t"}
    assert dict(headers.policy) == {"accept": ("application/json",)}


@pytest.mark.parametrize(
    ("pairs", "code"),
    [
        ((("Host", "a"), ("Host", "b")), "sanitize.duplicate_header"),
        ((("Accept", "x"),), "sanitize.duplicate_header"),
        ((("Host", "a"), ("Authorization", "x"), ("Authorization", "y")), "sanitize.duplicate_header"),
        ((("Host", "a"), ("Content-Length", "1"), ("Transfer-Encoding", "chunked")), "sanitize.framing"),
        ((("Host", "a"), ("Content-Length", "1"), ("Content-Length", "1")), "sanitize.framing"),
        ((("Host", "a"), ("Content-Length", "+1")), "sanitize.framing"),
        ((("Host", "a"), ("Content-Length", "١")), "sanitize.framing"),
        ((("Host", "a"), ("Transfer-Encoding", "gzip")), "sanitize.framing"),
        ((("Host", "a"), ("X-A", "a\rb")), "sanitize.bad_header"),
        ((("Host", "a"), ("X-A", "a\x00b")), "sanitize.bad_header"),
        ((("Host", "a b"),), "sanitize.bad_header"),
        ((("Host", "a@b"),), "sanitize.bad_header"),
        ((("Host", "a:99999"),), "sanitize.bad_header"),
        ((("Host", "a"), ("Bad Name", "x")), "sanitize.bad_header"),
        ((("Host", "a"), ("Expect", "nope")), "sanitize.expectation"),
    ],
)
def test_header_refusals(pairs: tuple[tuple[str, str], ...], code: str) -> None:
    with pytest.raises(PepError) as err:
        check_headers(_h(*pairs), RULES, LIMITS)
    assert err.value.code == code


def test_too_many_headers() -> None:
    pairs = [("Host", "a")] + [(f"X-{i}", "v") for i in range(200)]
    with pytest.raises(PepError) as err:
        check_headers(_h(*pairs), RULES, LIMITS)
    assert err.value.status == 431


def test_ipv6_host() -> None:
    headers = check_headers(_h(("Host", "[::1]:8443")), RULES, LIMITS)
    assert (headers.host, headers.port) == ("::1", 8443)
