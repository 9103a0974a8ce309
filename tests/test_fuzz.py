"""Property-based tests: hostile input never gets anything but the PEP's own refusal.

Each property has a bounded example budget (``FAST``) so ``make test`` stays quick;
no example database is written.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvault_pep.config import Config, Issuer, Limits, Sanitize, parse_config
from vvault_pep.core import sanitize
from vvault_pep.errors import STATUS, ConfigError, PepError
from vvault_pep.identity.jwt import JwtVerifier, strict_problem
from vvault_pep.observe.sinks import encode


def _refused(call: Callable[[], Any]) -> tuple[Any, PepError | None]:
    """(result, None), or (None, the PepError it raised): anything else propagates."""
    try:
        return call(), None
    except PepError as err:
        return None, err


FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
CONFIGS = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))}
WHERE = re.compile(r"^x\.yaml:\d+: \S")


# --- the config loader ---------------------------------------------------------------

YAML_BITS = st.sampled_from(
    [
        "!custom x", "!!int 'abc'", "!!timestamp 'x'", "!!binary aGk=", "!!python/name:os.system ''",
        "? [a, b]\n: 1", "{a: 1", "[1, 2", "&a x", "*nope", "'unterminated", "\t", "${UNSET_VAR_FOR_FUZZ}",
        "${file:/nonexistent/secret}", "null", "~", "-1", "1e999", "0x10", "yes", "2026-01-01", "{}", "[]",
        "- a\n- b", "a: b: c", "x" * 5000, "/" + "a" * 5000, "\x00", "\ud800", "GET", "get", "0.0.0.0:8443",
        "h@st", "unix://", "http://[::1", "spiffe://Demo/x", "*", "%",
    ]
)  # fmt: skip


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    lines = CONFIGS[draw(st.sampled_from(sorted(CONFIGS)))].splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        kind = draw(st.sampled_from(["replace_value", "insert", "delete", "indent", "char", "key"]))
        line = lines[i] if lines else ""
        if kind == "replace_value" and ":" in line:
            lines[i] = line.split(":", 1)[0] + ": " + draw(YAML_BITS | st.text(max_size=20))
        elif kind == "insert":
            indent = " " * (len(line) - len(line.lstrip()))
            lines.insert(i, indent + draw(st.text(max_size=10)) + ": " + draw(YAML_BITS))
        elif kind == "delete" and lines:
            del lines[i]
        elif kind == "indent":
            lines[i] = " " * draw(st.integers(0, 7)) + line.lstrip()
        elif kind == "char" and line:
            j = draw(st.integers(0, len(line) - 1))
            lines[i] = line[:j] + draw(st.characters()) + line[j + 1 :]
        elif kind == "key" and ":" in line:
            key, rest = line.split(":", 1)
            lines[i] = key[:-1] + draw(st.sampled_from(["s", "_", "x", ""])) + ":" + rest
    return "\n".join(lines) + "\n"


@FAST
@given(mutated_config())
def test_a_mutated_example_config_loads_or_names_file_and_line(text: str) -> None:
    try:
        config = parse_config(text, filename="x.yaml", base_dir=EXAMPLES)
    except ConfigError as exc:
        message = str(exc)
        if message not in ("x.yaml: config file is empty",):
            for line in message.splitlines():
                assert WHERE.match(line), message
        return
    assert isinstance(config, Config)


def test_every_example_config_loads_unmutated() -> None:
    for name, text in CONFIGS.items():
        parse_config(text, filename=name, base_dir=EXAMPLES, offline=True)


# --- sanitize ------------------------------------------------------------------------

TARGET_CHARS = st.sampled_from(
    [*"/.%;?#&=+\\:@!$'()*,~-_aAzZ09 \x00\x7f\u00e9\ud800", "%2F", "%2e", "%25", "%00", "%C0%AF", "%ZZ", ".."]
)


@FAST
@given(st.lists(TARGET_CHARS, max_size=40).map("".join) | st.text(max_size=60))
def test_canonical_target_returns_a_target_or_refuses(raw: str) -> None:
    target, err = _refused(lambda: sanitize.canonical_target(raw, Sanitize(), max_params=8))
    if err is not None:
        assert err.code.startswith("sanitize.") and err.status == 400
        return
    assert target.path.startswith("/")
    assert "//" not in target.path and "/../" not in target.path + "/"
    # the canonical form is a fixed point: sanitising it again changes nothing
    again = sanitize.canonical_target(target.path + ("?" + target.query if target.query else ""), Sanitize())
    assert again.path == target.path


HEADER_NAMES = st.sampled_from(
    [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Authorization", b"Connection", b"X_Forwarded_For",
     b"X-Forwarded-For", b"Expect", b"Cookie", b"bad name", b"", b"\xff", b"TE"]
) | st.binary(max_size=12)  # fmt: skip
HEADER_VALUES = st.sampled_from(
    [b"localhost", b"a.test:8443", b"10", b"-1", b"chunked", b"gzip, chunked", b"Bearer x", b"close, X-Foo",
     b"100-continue", b"\xc3\x28", b"a\x00b", b"[::1]:1", b"LOCALHOST.", b""]
) | st.binary(max_size=20)  # fmt: skip


@FAST
@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12))
def test_check_headers_returns_headers_or_refuses(raw: list[tuple[bytes, bytes]]) -> None:
    headers, err = _refused(lambda: sanitize.check_headers(raw, Sanitize(), Limits()))
    if err is not None:
        assert err.code.startswith("sanitize.") and 400 <= err.status < 500
        return
    assert headers.host


@FAST
@given(st.text(max_size=12))
def test_check_method_accepts_only_upper_case_tokens(method: str) -> None:
    _, err = _refused(lambda: sanitize.check_method(method))
    if err is not None:
        assert err.code == "sanitize.malformed"
        return
    assert method and method == method.upper() and method.isascii()


# --- tokens and posture assertions -----------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "9999999999"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
CLAIMS = st.fixed_dictionaries(
    {"iss": st.just("https://idp.test")},
    optional={
        "exp": JSON, "nbf": JSON, "iat": JSON, "auth_time": JSON, "sub": JSON, "aud": JSON, "cnf": JSON,
        "roles": JSON, "device_id": JSON,
    },
)  # fmt: skip
HEADER = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "none", "HS256"])}, optional={"kid": JSON, "typ": JSON, "crit": JSON}
)


def _segment(doc: Any) -> str:
    raw = json.dumps(doc).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


VERIFIER = JwtVerifier(
    (Issuer(name="idp", issuer="https://idp.test", audiences=("vvault",)),),
    max_bytes=8192,
    realm="vvault-pep",
)


@FAST
@given(HEADER, CLAIMS)
def test_token_precheck_returns_an_issuer_or_refuses(header: dict[str, Any], claims: dict[str, Any]) -> None:
    token = f"{_segment(header)}.{_segment(claims)}.c2ln"
    checked, err = _refused(lambda: VERIFIER.precheck(token))
    if err is not None:
        assert err.code.startswith("authn.") and STATUS[err.code][0] in (401, 431)
        return
    issuer, alg, _ = checked
    assert issuer.issuer == "https://idp.test" and alg in issuer.algorithms
    # whatever got through is strictly typed: dates are numbers, every string writable
    for name in ("exp", "nbf", "iat", "auth_time"):
        if name in claims:
            assert isinstance(claims[name], int | float) and not isinstance(claims[name], bool)
    orjson.dumps(claims)


@FAST
@given(
    st.text(max_size=80)
    | st.lists(st.sampled_from(["eyJ", ".", "=", "%", "\ud800", "AAAA", "e30"]), max_size=12).map("".join)
)
def test_token_precheck_of_any_text_refuses_with_a_code(token: str) -> None:
    _, err = _refused(lambda: VERIFIER.precheck(token))
    assert err is not None, "a token without a known issuer was accepted"
    assert err.code in STATUS


@FAST
@given(st.dictionaries(st.text(max_size=6), JSON, max_size=6), st.dictionaries(st.text(max_size=6), JSON, max_size=6))
def test_strict_problem_never_raises(header: dict[str, Any], payload: dict[str, Any]) -> None:
    problem = strict_problem(header, payload)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        orjson.dumps(payload)  # what passes can be written


@FAST
@given(st.dictionaries(st.text(max_size=6) | st.integers(), JSON, max_size=8), st.integers(2048, 8192))
def test_an_audit_record_is_always_written_within_its_cap(record: dict[Any, Any], cap: int) -> None:
    line, _, _ = encode({"request_id": "r", **record}, cap)
    assert len(line) <= cap
    assert json.loads(line)["request_id"] == "r"
