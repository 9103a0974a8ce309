"""check_headers, as tables: every refusal with its code, status and detail; every stripped class; exact limits.

The detail is shown to the client in the problem+json body, so it is asserted
too.  Limits are probed at the exact byte and count on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from vvault_pep.config import Limits, Sanitize
from vvault_pep.config.models import DEFAULT_STRIP_HEADERS, DEFAULT_STRIP_PREFIXES, HOP_BY_HOP
from vvault_pep.core.sanitize import Headers, block_of, check_headers, check_more_headers
from vvault_pep.errors import PepError

RULES = Sanitize()
LIMITS = Limits()


def _h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def _ok(*pairs: tuple[str, str], rules: Sanitize = RULES, limits: Limits = LIMITS) -> Headers:
    return check_headers(_h(("Host", "a"), *pairs), rules, limits)


def _refused(raw: list[tuple[bytes, bytes]], rules: Sanitize = RULES, limits: Limits = LIMITS) -> tuple[str, int, str]:
    with pytest.raises(PepError) as err:
        check_headers(raw, rules, limits)
    return err.value.code, err.value.status, err.value.detail


@pytest.mark.parametrize(
    ("pairs", "code", "status", "detail"),
    [
        ((), "sanitize.duplicate_header", 400, "exactly one Host header is required"),
        ((("Host", "a"), ("Host", "a")), "sanitize.duplicate_header", 400, "exactly one Host header is required"),
        ((("Accept", "x"),), "sanitize.duplicate_header", 400, "exactly one Host header is required"),
        (
            (("Host", "a"), ("Authorization", "x"), ("Authorization", "x")),
            "sanitize.duplicate_header",
            400,
            "more than one Authorization header",
        ),
        (
            (("Host", "a"), ("Content-Length", "1"), ("Transfer-Encoding", "chunked")),
            "sanitize.framing",
            400,
            "Content-Length together with Transfer-Encoding",
        ),
        (
            (("Host", "a"), ("Content-Length", "1"), ("Content-Length", "1")),
            "sanitize.framing",
            400,
            "repeated framing header",
        ),
        (
            (("Host", "a"), ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")),
            "sanitize.framing",
            400,
            "repeated framing header",
        ),
        ((("Host", "a"), ("Content-Length", "-1")), "sanitize.framing", 400, "Content-Length is not a number"),
        ((("Host", "a"), ("Content-Length", "1 2")), "sanitize.framing", 400, "Content-Length is not a number"),
        ((("Host", "a"), ("Content-Length", "")), "sanitize.framing", 400, "Content-Length is not a number"),
        ((("Host", "a"), ("Content-Length", "١")), "sanitize.framing", 400, "Content-Length is not a number"),
        ((("Host", "a"), ("Content-Length", "²")), "sanitize.framing", 400, "Content-Length is not a number"),
        (
            (("Host", "a"), ("Transfer-Encoding", "gzip, chunked")),
            "sanitize.framing",
            400,
            "only Transfer-Encoding: chunked is accepted",
        ),
        (
            (("Host", "a"), ("Expect", "100-continue"), ("Expect", "100-continue")),
            "sanitize.expectation",
            417,
            "only Expect: 100-continue is understood",
        ),
        ((("Host", "a"), ("Expect", "200-ok")), "sanitize.expectation", 417, "only Expect: 100-continue is understood"),
        ((("Host", "a"), ("X-A", "a\rb")), "sanitize.bad_header", 400, "NUL, CR or LF in the value of X-A"),
        ((("Host", "a"), ("X-A", "a\nb")), "sanitize.bad_header", 400, "NUL, CR or LF in the value of X-A"),
        ((("Host", "a"), ("X-A", "a\x00b")), "sanitize.bad_header", 400, "NUL, CR or LF in the value of X-A"),
        ((("Host", "a"), ("Bad Name", "x")), "sanitize.bad_header", 400, "invalid header name"),
        ((("Host", "a"), ("", "x")), "sanitize.bad_header", 400, "invalid header name"),
        ((("Host", "a"), ("X:A", "x")), "sanitize.bad_header", 400, "invalid header name"),
        ((("Host", "a b"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a@b"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", ""),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a:"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a:123456"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a:65536"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "[::1]:65536"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "-a"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a-"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a..b"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "[::1"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "[::1]x"),), "sanitize.bad_header", 400, "malformed Host header"),
        ((("Host", "a_b"),), "sanitize.bad_header", 400, "malformed Host header"),
    ],
)
def test_refusals(pairs: tuple[tuple[str, str], ...], code: str, status: int, detail: str) -> None:
    assert _refused(_h(*pairs)) == (code, status, detail)


def test_undecodable_names_and_values_are_refused() -> None:
    detail = ("sanitize.bad_header", 400, "header is not ASCII/UTF-8")
    assert _refused([(b"Host", b"a"), (b"X-\xc3\xa9", b"v")]) == detail
    assert _refused([(b"Host", b"a"), (b"X-A", b"\xff")]) == detail
    # A UTF-8 value is data, not an error.
    assert _ok(("X-Name", "café")).forward == (("X-Name", "café"),)


def test_every_token_character_is_a_valid_name() -> None:
    name = "!#$%&'*+.^`|~09AZaz-"
    assert _ok((name, "v")).forward == ((name, "v"),)


def test_total_header_bytes_exact() -> None:
    limits = Limits(max_total_header_bytes=1024)
    # Each header costs name + value + 4 (": " and CRLF): Host: a is 9, X-Pad is 9 + the value.
    assert _ok(("X-Pad", "v" * 1006), limits=limits).forward == (("X-Pad", "v" * 1006),)
    too_many = _h(("Host", "a"), ("X-Pad", "v" * 1007))
    assert _refused(too_many, limits=limits) == (
        "sanitize.headers_too_large",
        431,
        "request headers too large in total",
    )


def test_total_header_bytes_accumulate() -> None:
    limits = Limits(max_total_header_bytes=1024)
    pairs = [("Host", "a")] + [(f"X-{i}", "v" * 200) for i in range(5)]
    code, _, detail = _refused(_h(*pairs), limits=limits)
    assert (code, detail) == ("sanitize.headers_too_large", "request headers too large in total")


def test_total_is_checked_before_decoding() -> None:
    # An oversized undecodable header is answered as too large: the size is counted first.
    limits = Limits(max_total_header_bytes=1024)
    assert _refused([(b"Host", b"a"), (b"X-A", b"\xff" * 2000)], limits=limits)[0] == "sanitize.headers_too_large"


def test_one_header_bytes_exact() -> None:
    limits = Limits(max_header_bytes=256)
    assert _ok(("X-A", "v" * 253), limits=limits).forward == (("X-A", "v" * 253),)
    assert _refused(_h(("Host", "a"), ("X-A", "v" * 254)), limits=limits) == (
        "sanitize.headers_too_large",
        431,
        "header X-A is too large",
    )


def test_header_count_exact() -> None:
    limits = Limits(max_headers=8)
    seven = [(f"X-{i}", "v") for i in range(7)]
    assert len(_ok(*seven, limits=limits).forward) == 7
    assert _refused(_h(("Host", "a"), *seven, ("X-7", "v")), limits=limits) == (
        "sanitize.headers_too_large",
        431,
        "too many headers",
    )


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("a", "a", None),
        ("API.Example", "api.example", None),
        ("api.example.", "api.example", None),
        ("api.example.:8443", "api.example", 8443),
        ("a-b.c9:1", "a-b.c9", 1),
        ("a:0", "a", 0),
        ("a:65535", "a", 65535),
        ("a:00443", "a", 443),
        ("10.0.0.1:80", "10.0.0.1", 80),
        ("[::1]", "::1", None),
        ("[::1]:8443", "::1", 8443),
        ("[2001:DB8::1]:65535", "2001:db8::1", 65535),
        ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1", None),
    ],
)
def test_host_and_port(value: str, host: str, port: int | None) -> None:
    headers = check_headers(_h(("Host", value)), RULES, LIMITS)
    assert (headers.host, headers.port) == (host, port)


def test_host_value_is_trimmed() -> None:
    assert check_headers(_h(("Host", " a:1\t")), RULES, LIMITS).port == 1


def test_framing_defaults() -> None:
    headers = _ok()
    assert (headers.content_length, headers.chunked, headers.expect_continue, headers.authorization) == (
        None,
        False,
        False,
        None,
    )
    assert (headers.forward, headers.policy) == ((), ())


@pytest.mark.parametrize(("value", "length"), [("0", 0), ("12", 12), ("007", 7), (" 5 ", 5)])
def test_content_length(value: str, length: int) -> None:
    headers = _ok(("Content-Length", value))
    assert (headers.content_length, headers.chunked) == (length, False)
    # Hop-by-hop: never forwarded as sent, but the policy sees the number.
    assert headers.forward == ()
    assert headers.policy == (("content-length", (str(length),)),)


def test_content_length_not_in_policy_unless_listed() -> None:
    headers = _ok(("Content-Length", "3"), rules=Sanitize(policy_headers=("accept",)))
    assert (headers.content_length, headers.policy) == (3, ())


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED"])
def test_chunked(value: str) -> None:
    headers = _ok(("Transfer-Encoding", value))
    assert (headers.chunked, headers.content_length, headers.forward) == (True, None, ())


@pytest.mark.parametrize("value", ["100-continue", "100-Continue"])
def test_expect_continue(value: str) -> None:
    headers = _ok(("Expect", value))
    assert (headers.expect_continue, headers.forward) == (True, ())


def test_authorization_is_kept_and_forwarded() -> None:
    headers = _ok(("Authorization", "Bearer t"))
    assert headers.authorization == "Bearer t"
    assert headers.forward == (("Authorization", "Bearer t"),)


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_every_hop_by_hop_header_is_dropped(name: str) -> None:
    value = {"content-length": "1", "transfer-encoding": "chunked", "expect": "100-continue"}.get(name, "x")
    pairs = (("X-Keep", "v"),) if name == "host" else ((name.title(), value), ("X-Keep", "v"))
    headers = _ok(*pairs)
    assert headers.forward == (("X-Keep", "v"),)


def test_headers_named_in_connection_are_dropped() -> None:
    headers = _ok(
        ("Connection", " X-Drop-One ,, x-drop-two, ,"),
        ("Connection", "X-DROP-THREE"),
        ("X-Drop-One", "1"),
        ("X-Drop-Two", "2"),
        ("x-drop-three", "3"),
        ("X-Keep", "v"),
    )
    assert headers.forward == (("X-Keep", "v"),)


def test_connection_naming_nothing_drops_nothing() -> None:
    assert _ok(("Connection", ", ,"), ("X-Keep", "v")).forward == (("X-Keep", "v"),)


@pytest.mark.parametrize("name", DEFAULT_STRIP_HEADERS)
def test_every_pep_owned_header_is_dropped(name: str) -> None:
    assert _ok((name.upper(), "spoof"), ("X-Keep", "v")).forward == (("X-Keep", "v"),)


@pytest.mark.parametrize("prefix", DEFAULT_STRIP_PREFIXES)
def test_every_owned_prefix_is_dropped(prefix: str) -> None:
    name = prefix.rstrip("-") + "-Anything"
    assert _ok((name, "spoof"), ("X-Keep", "v")).forward == (("X-Keep", "v"),)


@pytest.mark.parametrize(
    "name", ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Real-IP", "X-Device-Posture"]
)
def test_spoofable_forwarding_and_posture_headers_never_reach_the_policy(name: str) -> None:
    rules = Sanitize(policy_headers=(name.lower(), "accept"))
    headers = _ok((name, "spoof"), ("Accept", "a"), rules=rules)
    assert (headers.forward, headers.policy) == ((("Accept", "a"),), (("accept", ("a",)),))


def test_also_owned_names_are_dropped() -> None:
    raw = _h(("Host", "a"), ("X-Tenant", "t"), ("X-Keep", "v"))
    headers = check_headers(raw, RULES, LIMITS, also_owned=frozenset({"x-tenant"}))
    assert headers.forward == (("X-Keep", "v"),)
    assert check_headers(raw, RULES, LIMITS).forward == (("X-Tenant", "t"), ("X-Keep", "v"))


def test_configured_strip_lists_replace_the_defaults() -> None:
    rules = Sanitize(strip_headers=("x-secret",), strip_header_prefixes=("x-internal-",))
    headers = _ok(("X-Secret", "1"), ("X-Internal-Id", "2"), ("X-Real-IP", "3"), rules=rules)
    assert headers.forward == (("X-Real-IP", "3"),)


def test_underscore_names_dropped_unless_allowed() -> None:
    assert _ok(("X_Forwarded_Thing", "1"), ("X_Keep", "2"), ("X-Keep", "v")).forward == (("X-Keep", "v"),)
    allowed = _ok(("X_Keep", "2"), ("X-Keep", "v"), rules=Sanitize(allow_underscore_headers=True))
    assert allowed.forward == (("X_Keep", "2"), ("X-Keep", "v"))
    # An owned header is dropped whatever the underscore setting.
    assert _ok(("X-Pep-Thing", "1"), rules=Sanitize(allow_underscore_headers=True)).forward == ()


def test_forward_keeps_names_order_repeats_and_trims_values() -> None:
    headers = _ok(("Accept", " a\t"), ("X-B", "1"), ("accept", "b"), ("User-Agent", "ua"))
    assert headers.forward == (("Accept", "a"), ("X-B", "1"), ("accept", "b"), ("User-Agent", "ua"))
    assert headers.policy == (("accept", ("a", "b")), ("user-agent", ("ua",)))


def test_only_spaces_and_tabs_are_trimmed() -> None:
    # Other whitespace (a no-break space, a vertical tab) is part of the value, as RFC 9110 says.
    headers = _ok(("X-A", " \tXv\u00a0 "), ("X-B", "\x0bv"))
    assert headers.forward == (("X-A", "Xv\u00a0"), ("X-B", "\x0bv"))


# --- a block checked in two parts (the memo's volatile headers) -----------------------------

_VOLATILE = ("x-seq", "traceparent", "x_seq", "x-request-id", "x-vvault-seq")  # forwarded, stripped, dropped …
_PART_NAMES = st.sampled_from(
    ["Host", "Accept", "X-Note", "Connection", "Authorization", "Content-Length", "X-Forwarded-For",
     "X-Seq", "x-seq", "Traceparent", "X_Seq", "X-Request-Id", "X-Vvault-Seq"]
)  # fmt: skip
_PART_VALUES = st.one_of(
    st.sampled_from(["a", "x-seq", "X-Seq, close", "keep-alive", "traceparent", "x_seq", "1", " v "]),
    st.text(alphabet="ab\x00\r \t", max_size=4),
    st.integers(200, 700).map(lambda n: "v" * n),  # over the tight limits below, alone or together
)


@settings(max_examples=400, deadline=None)
@given(
    pairs=st.lists(st.tuples(_PART_NAMES, _PART_VALUES), max_size=9),
    limits=st.sampled_from([LIMITS, Limits(max_header_bytes=256, max_total_header_bytes=1024, max_headers=8)]),
    underscores=st.booleans(),
    owned=st.sampled_from([frozenset(), frozenset({"x-seq"})]),
)
def test_a_block_checked_in_two_parts_is_judged_as_the_whole(
    pairs: list[tuple[str, str]], limits: Limits, underscores: bool, owned: frozenset[str]
) -> None:
    """Once the stable part passed check_headers (the memo holds only such parts), the
    volatile part through check_more_headers is refused exactly when check_headers refuses
    the whole block, and otherwise forwards what the whole block forwards, the volatile
    headers (in their order) after the others.  The codes may differ when one block breaks
    two rules (the parts are counted in another order); a refused second part makes the memo
    walk the request whole, so the client always gets the whole block's refusal."""
    rules = Sanitize(allow_underscore_headers=underscores)
    raw = _h(("Host", "a"), *pairs)
    stable = tuple(h for h in raw if h[0].decode().lower() not in _VOLATILE)
    loose = [h for h in raw if h[0].decode().lower() in _VOLATILE]
    first = _outcome(lambda: check_headers(stable, rules, limits, owned).forward)
    if isinstance(first, str):
        return  # never an entry of the memo
    whole = _outcome(lambda: check_headers(raw, rules, limits, owned).forward)
    parts = _outcome(lambda: (*first, *check_more_headers(loose, rules, limits, block_of(stable), owned)))
    event("refused" if isinstance(whole, str) else "forwarded")
    if isinstance(whole, str):
        assert isinstance(parts, str)
    else:
        kept = [h for h in whole if h[0].lower() not in _VOLATILE]
        assert parts == (*kept, *(h for h in whole if h[0].lower() in _VOLATILE))


def _outcome(check: Callable[[], tuple[tuple[str, str], ...]]) -> tuple[tuple[str, str], ...] | str:
    try:
        return check()
    except PepError as err:
        return err.code


def test_the_second_part_counts_the_first_parts_limits() -> None:
    limits = Limits(max_total_header_bytes=1024, max_headers=8)
    stable = tuple(_h(("Host", "a"), ("X-Pad", "p" * 999)))  # 4+1+4 + 5+999+4 = 1017 bytes
    block = block_of(stable)
    assert block == (1017, 2, frozenset())
    assert check_more_headers(_h(("X-S", "")), RULES, limits, block) == (("X-S", ""),)  # 1017 + 3 + 4 = 1024
    with pytest.raises(PepError) as err:
        check_more_headers(_h(("X-S", "1")), RULES, limits, block)  # 1025
    assert err.value.detail == "request headers too large in total"  # shown to the client: exactly check_headers
    many = tuple(_h(("Host", "a"), *[(f"X-{i}", "v") for i in range(6)]))
    assert len(check_more_headers(_h(("X-S", "1")), RULES, limits, block_of(many))) == 1  # 8 headers
    with pytest.raises(PepError) as err:
        check_more_headers(_h(("X-S", "1"), ("X-T", "2")), RULES, limits, block_of(many))  # 9
    assert err.value.detail == "too many headers"
    named = block_of(tuple(_h(("Host", "a"), ("Connection", "X-S, close"))))
    assert named[2] == frozenset({"x-s", "close"})
    assert check_more_headers(_h(("X-S", "1"), ("X-T", "2")), RULES, LIMITS, named) == (("X-T", "2"),)
