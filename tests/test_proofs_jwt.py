"""Bearer JWT checks, one refusal at a time, with the code, the detail and the challenge.

The verifier is called directly: ``precheck`` (everything that needs no key) and ``claims``
(signature and claims with the algorithm pinned).  Tokens are really signed — with an
issuer's shared secret (HS256), and with the test IdP's RSA, EC and Ed25519 keys fetched
from its real JWKS endpoint.  Shapes no library would produce are assembled by hand.
A client sees the code (its status) and the ``WWW-Authenticate`` challenge: both are checked.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from tests.idp import Issuer as Idp
from tests.idp import b64

from vvault_pep.config.models import Issuer
from vvault_pep.errors import STATUS, PepError
from vvault_pep.identity.jwt import NUMERIC_DATES, JwtVerifier, _fail, strict_problem

SECRET = "s" * 64
HS = Issuer(
    name="hs", issuer="https://hs.example", audiences=("vvault", "other"), algorithms=("HS256",), shared_secret=SECRET
)
UNTYPED = Issuer(
    name="untyped",
    issuer="https://untyped.example",
    audiences=("vvault",),
    algorithms=("HS256",),
    shared_secret=SECRET,
    typ=None,
)
REALM = "vvault-test"


def verifier(*issuers: Issuer, max_bytes: int = 8192) -> JwtVerifier:
    return JwtVerifier(issuers or (HS, UNTYPED), max_bytes=max_bytes, realm=REALM)


def hs_claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": HS.issuer, "sub": "alice", "aud": "vvault", "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(headers: dict[str, Any] | None = None, secret: str = SECRET, alg: str = "HS256", **over: Any) -> str:
    return pyjwt.encode(hs_claims(**over), secret, algorithm=alg, headers={"typ": "at+jwt", **(headers or {})})


def seg(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def by_hand(header: bytes | dict[str, Any], payload: bytes | dict[str, Any], signature: str = "c2ln") -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{seg(h)}.{seg(p)}.{signature}"


GOOD_HEADER = {"alg": "HS256", "typ": "at+jwt"}


def refused(exc: pytest.ExceptionInfo[PepError], code: str, detail: str | None = None) -> None:
    err = exc.value
    assert err.code == code
    assert err.status == STATUS[code][0]
    assert err.detail == (detail if detail is not None else STATUS[code][1])
    if err.status == 401:
        assert err.headers == (
            (
                "WWW-Authenticate",
                f'Bearer realm="{REALM}", error="invalid_token", error_description="{STATUS[code][1]}"',
            ),
        )


# -- the challenge -------------------------------------------------------------------------


def test_the_challenge_of_each_kind_of_refusal() -> None:
    required = _fail("authn.required", "r1")
    assert (required.status, required.detail) == (401, "Authentication required")
    assert required.headers == (("WWW-Authenticate", 'Bearer realm="r1"'),)
    bad_request = _fail("authn.token_in_query", "r2")
    assert bad_request.status == 400
    assert bad_request.headers == (("WWW-Authenticate", 'Bearer realm="r2", error="invalid_request"'),)
    invalid = _fail("authn.expired", "r3", "some detail")
    assert (invalid.status, invalid.detail) == (401, "some detail")
    assert invalid.headers == (
        ("WWW-Authenticate", 'Bearer realm="r3", error="invalid_token", error_description="Token expired"'),
    )
    assert _fail("authn.token_too_large", "r4").headers == ()  # 431: no challenge
    unavailable = _fail("authn.keys_unavailable", "r5")
    assert (unavailable.status, unavailable.headers, unavailable.detail) == (503, (), "Signing keys unavailable")


# -- precheck: size and shape ----------------------------------------------------------------


def test_the_size_limit_is_exact() -> None:
    token = hs_token()
    issuer, alg, kid = verifier(max_bytes=len(token)).precheck(token)
    assert (issuer, alg, kid) == (HS, "HS256", None)
    with pytest.raises(PepError) as exc:
        verifier(max_bytes=len(token) - 1).precheck(token)
    refused(exc, "authn.token_too_large")
    assert exc.value.headers == ()


def test_five_parts_is_an_encrypted_token() -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck("a.b.c.d.e")
    refused(exc, "authn.encrypted_token")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e.f",
        ".".join(["", seg(b'{"iss":"x"}'), "sig"]),
        ".".join([seg(b'{"alg":"HS256"}'), "", "sig"]),
        "!!!." + seg(b"{}") + ".sig",
        seg(b"not json") + "." + seg(b"{}") + ".sig",
        seg(b"[1]") + "." + seg(b"{}") + ".sig",
        seg(b'{"alg":"HS256"}') + "." + seg(b'"text"') + ".sig",
        seg(b'{"alg":"HS256","alg":"none"}') + "." + seg(b"{}") + ".sig",
        seg(b'{"alg":"HS256"}') + "." + seg(b'{"iss":"a","iss":"https://hs.example"}') + ".sig",
        seg(b'{"alg":"HS256"}') + "." + seg(b'{"sub":"\xff"}') + ".sig",
        seg(b'{"alg":"HS256"}') + ".a" + ".sig",  # one base64 character: no whole byte
    ],
)
def test_a_malformed_shape(token: str) -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck(token)
    refused(exc, "authn.malformed")


def test_padding_is_optional() -> None:
    header = seg(json.dumps(GOOD_HEADER).encode())
    payload = seg(json.dumps(hs_claims()).encode())
    assert len(payload) % 4 != 0 or len(header) % 4 != 0
    issuer, alg, _ = verifier().precheck(f"{header}.{payload}.")
    assert (issuer.name, alg) == ("hs", "HS256")


STRICT = "a value in the token is not valid JSON text (lone surrogate, huge number, NaN)"


def nest(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


@pytest.mark.parametrize(
    ("header", "payload", "detail"),
    [
        (b'{"alg":"HS256","x":"\\ud800"}', None, STRICT),
        (b'{"alg":"HS256","\\udc00":1}', None, STRICT),
        (None, b'{"iss":"https://hs.example","sub":"\\ud800"}', STRICT),
        (None, b'{"iss":"https://hs.example","n":18446744073709551616}', STRICT),
        (None, b'{"iss":"https://hs.example","n":-9223372036854775809}', STRICT),
        (None, b'{"iss":"https://hs.example","n":NaN}', STRICT),
        (None, b'{"iss":"https://hs.example","n":Infinity}', STRICT),
        (None, b'{"iss":"https://hs.example","n":-Infinity}', STRICT),
        (None, b'{"iss":"https://hs.example","n":{"deep":["\\ud800"]}}', STRICT),
        (None, f'{{"iss":"https://hs.example","n":{nest(33)}}}'.encode(), STRICT),
        (None, b'{"iss":"https://hs.example","n":{"k":{"\\ud800":1}}}', STRICT),
    ],
)
def test_values_json_text_cannot_carry(header: bytes | None, payload: bytes | None, detail: str) -> None:
    token = by_hand(header or json.dumps(GOOD_HEADER).encode(), payload or json.dumps(hs_claims()).encode())
    with pytest.raises(PepError) as exc:
        verifier().precheck(token)
    refused(exc, "authn.malformed", detail)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"iss":"https://hs.example","n":18446744073709551615}',
        b'{"iss":"https://hs.example","n":-9223372036854775808}',
        b'{"iss":"https://hs.example","n":1.5e300,"b":true,"f":false,"z":null}',
        b'{"iss":"https://hs.example","s":"\\u00e9\\ud83d\\ude00"}',
        f'{{"iss":"https://hs.example","n":{nest(32)}}}'.encode(),
        f'{{"iss":"https://hs.example","n":{{"a":{{"b":{nest(30)}}}}}}}'.encode(),
    ],
)
def test_values_json_text_can_carry_pass(payload: bytes) -> None:
    issuer, _, _ = verifier().precheck(by_hand(GOOD_HEADER, payload))
    assert issuer is HS


@pytest.mark.parametrize("name", NUMERIC_DATES)
@pytest.mark.parametrize("value", ["1700000000", True, False, None, [1], {"t": 1}])
def test_a_numeric_date_that_is_not_a_number(name: str, value: Any) -> None:
    token = by_hand(GOOD_HEADER, {**hs_claims(), name: value})
    with pytest.raises(PepError) as exc:
        verifier().precheck(token)
    refused(exc, "authn.malformed", f"'{name}' is not a NumericDate (a JSON number)")


def test_the_numeric_dates() -> None:
    assert NUMERIC_DATES == ("exp", "nbf", "iat", "auth_time")


@pytest.mark.parametrize("value", [0, 1700000000, 1700000000.5, -1])
def test_numeric_dates_as_numbers_pass(value: float) -> None:
    payload = {"iss": HS.issuer, **dict.fromkeys(NUMERIC_DATES, value)}
    assert strict_problem({"alg": "HS256"}, payload) is None
    issuer, _, _ = verifier().precheck(by_hand(GOOD_HEADER, payload))
    assert issuer is HS


def test_strict_problem_reads_the_header_too() -> None:
    assert strict_problem({"alg": "\ud800"}, {}) == STRICT
    assert strict_problem({"alg": "HS256"}, {"x": float("nan")}) == STRICT
    assert strict_problem({}, {"iat": "now"}) == "'iat' is not a NumericDate (a JSON number)"
    assert strict_problem({"x": object()}, {}) is None  # not something json.loads makes: not judged


# -- precheck: algorithm, issuer, type, crit, kid ---------------------------------------------


@pytest.mark.parametrize("alg", [None, 256, ["HS256"]])
def test_no_algorithm(alg: Any) -> None:
    header = {"typ": "at+jwt"} if alg is None else {"alg": alg, "typ": "at+jwt"}
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand(header, hs_claims()))
    refused(exc, "authn.malformed", "no algorithm")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", " none ", "none\t"])
def test_alg_none_is_refused_before_the_issuer_is_looked_up(alg: str) -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand({"alg": alg, "typ": "at+jwt"}, {"iss": "https://unknown.example"}))
    refused(exc, "authn.bad_algorithm")


@pytest.mark.parametrize(
    "iss", [None, "https://unknown.example", "https://hs.example/", "HTTPS://hs.example", ["x"], 1]
)
def test_an_unknown_issuer(iss: Any) -> None:
    payload = hs_claims(iss=iss) if iss is not None else {k: v for k, v in hs_claims().items() if k != "iss"}
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand({"alg": "HS256", "typ": "wrong"}, payload))
    refused(exc, "authn.unknown_issuer")


def test_the_issuer_is_chosen_by_exact_iss() -> None:
    v = verifier()
    assert v.precheck(by_hand(GOOD_HEADER, hs_claims()))[0] is HS
    assert v.precheck(by_hand(GOOD_HEADER, hs_claims(iss=UNTYPED.issuer)))[0] is UNTYPED


@pytest.mark.parametrize("alg", ["RS256", "HS384", "ES256", "hs256"])
def test_an_algorithm_the_issuer_does_not_allow(alg: str) -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand({"alg": alg, "typ": "nope", "crit": ["x"]}, hs_claims()))
    refused(exc, "authn.bad_algorithm")


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+Jwt"])
def test_the_access_token_type(typ: str) -> None:
    assert verifier().precheck(by_hand({"alg": "HS256", "typ": typ}, hs_claims()))[0] is HS


@pytest.mark.parametrize(
    "typ", [None, "JWT", "jwt", "at+jwt ", "application/jwt", "x-application/at+jwt", 1, ["at+jwt"]]
)
def test_a_wrong_type(typ: Any) -> None:
    header = {"alg": "HS256", "crit": ["exp"]} | ({} if typ is None else {"typ": typ})
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand(header, hs_claims()))
    refused(exc, "authn.wrong_type")


@pytest.mark.parametrize("typ", [None, "JWT", 1])
def test_an_issuer_without_a_type_takes_any(typ: Any) -> None:
    header = {"alg": "HS256"} | ({} if typ is None else {"typ": typ})
    assert verifier().precheck(by_hand(header, hs_claims(iss=UNTYPED.issuer)))[0] is UNTYPED


def test_a_custom_type_and_its_application_form() -> None:
    custom = HS.model_copy(update={"typ": "DPoP+JWT"})
    v = verifier(custom)
    for typ in ("dpop+jwt", "application/DPOP+jwt"):
        assert v.precheck(by_hand({"alg": "HS256", "typ": typ}, hs_claims()))[0] is custom
    with pytest.raises(PepError) as exc:
        v.precheck(by_hand({"alg": "HS256", "typ": "at+jwt"}, hs_claims()))
    refused(exc, "authn.wrong_type")


@pytest.mark.parametrize("crit", [[], ["exp"], "b64", None])
def test_any_crit_header_is_refused(crit: Any) -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand({**GOOD_HEADER, "crit": crit, "kid": 5}, hs_claims()))
    refused(exc, "authn.unsupported_crit")


@pytest.mark.parametrize("kid", [5, ["k"], {"k": 1}, True, "k" * 257])
def test_a_bad_key_id(kid: Any) -> None:
    with pytest.raises(PepError) as exc:
        verifier().precheck(by_hand({**GOOD_HEADER, "kid": kid}, hs_claims()))
    refused(exc, "authn.malformed", "bad key id")


@pytest.mark.parametrize("kid", ["", "k", "k" * 256])
def test_a_key_id_is_returned(kid: str) -> None:
    assert verifier().precheck(by_hand({**GOOD_HEADER, "kid": kid}, hs_claims())) == (HS, "HS256", kid)


def test_a_null_key_id_is_no_key_id() -> None:
    assert verifier().precheck(by_hand({**GOOD_HEADER, "kid": None}, hs_claims())) == (HS, "HS256", None)


# -- claims: signature, dates, audience, issuer, required claims -------------------------------


async def check(token: str, issuer: Issuer = HS, alg: str = "HS256", kid: str | None = None) -> dict[str, Any]:
    return await verifier().claims(token, issuer, alg, kid)


async def test_a_good_token_gives_its_claims() -> None:
    claims = hs_claims(tenant="acme", aud=["other", "x"])
    got = await check(pyjwt.encode(claims, SECRET, algorithm="HS256"))
    assert got == claims


async def test_a_wrong_secret_is_a_bad_signature() -> None:
    with pytest.raises(PepError) as exc:
        await check(hs_token(secret="t" * 64))
    refused(exc, "authn.bad_signature")


async def test_the_algorithm_is_pinned_to_the_one_prechecked() -> None:
    token = hs_token(alg="HS384")
    with pytest.raises(PepError) as exc:
        await check(token, alg="HS256")
    refused(exc, "authn.bad_algorithm")


async def test_a_signature_that_is_not_base64_is_malformed() -> None:
    head, body, _ = hs_token().split(".")
    with pytest.raises(PepError) as exc:
        await check(f"{head}.{body}.!!!")
    refused(exc, "authn.malformed")


@pytest.mark.parametrize(
    ("over", "code", "detail"),
    [
        ({"exp": -100}, "authn.expired", None),
        ({"exp": -31}, "authn.expired", None),
        ({"nbf": 100}, "authn.not_yet_valid", None),
        ({"nbf": 31}, "authn.not_yet_valid", None),
        ({"iat": 100}, "authn.not_yet_valid", None),
        ({"aud": "elsewhere"}, "authn.wrong_audience", None),
        ({"aud": ["elsewhere", "x"]}, "authn.wrong_audience", None),
        ({"iss": "https://other.example"}, "authn.wrong_issuer", None),
        ({"exp": None}, "authn.missing_claim", "the token has no 'exp' claim"),
        ({"sub": None}, "authn.missing_claim", "the token has no 'sub' claim"),
        ({"aud": None}, "authn.wrong_audience", "the token has no 'aud' claim"),
        ({"iss": None}, "authn.missing_claim", "the token has no 'iss' claim"),
    ],
)
async def test_claims_refused(over: dict[str, Any], code: str, detail: str | None) -> None:
    now = int(time.time())
    dated = {k: (now + v if k in ("exp", "nbf", "iat") and isinstance(v, int) else v) for k, v in over.items()}
    with pytest.raises(PepError) as exc:
        await check(pyjwt.encode(hs_claims(**dated), SECRET, algorithm="HS256"))
    refused(exc, code, detail)


async def test_an_iat_that_is_not_a_number_is_not_yet_valid() -> None:
    # precheck refuses it first; claims alone still does not take it
    with pytest.raises(PepError) as exc:
        await check(pyjwt.encode(hs_claims(iat="now"), SECRET, algorithm="HS256"))
    refused(exc, "authn.not_yet_valid")


@pytest.mark.parametrize("over", [{"exp": -10}, {"nbf": 10}, {"iat": 10}])
async def test_the_leeway_applies(over: dict[str, int]) -> None:
    now = int(time.time())
    claims = hs_claims(**{k: now + v for k, v in over.items()})
    assert await check(pyjwt.encode(claims, SECRET, algorithm="HS256")) == claims
    strict = HS.model_copy(update={"leeway_s": 0.0})
    with pytest.raises(PepError):
        await check(pyjwt.encode(claims, SECRET, algorithm="HS256"), issuer=strict)


async def test_an_issuer_s_required_claims() -> None:
    needs = HS.model_copy(update={"required_claims": ("sub", "tenant")})
    with pytest.raises(PepError) as exc:
        await check(hs_token(), issuer=needs)
    refused(exc, "authn.missing_claim", "the token has no 'tenant' claim")
    assert (await check(hs_token(tenant="acme"), issuer=needs))["tenant"] == "acme"
    no_sub = HS.model_copy(update={"required_claims": ()})
    assert "sub" not in await check(hs_token(sub=None), issuer=no_sub)


# -- keys from a real JWKS ---------------------------------------------------------------------


@pytest.fixture
async def idp_verifier(idp: Idp) -> AsyncIterator[tuple[JwtVerifier, Issuer]]:
    issuer = Issuer(name="corp", issuer=idp.url, audiences=("vvault",), allow_http=True)
    v = JwtVerifier((issuer, HS), max_bytes=8192, realm=REALM)
    await v.start()
    yield v, issuer
    await v.stop()


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
async def test_each_key_type_from_the_jwks(idp_verifier: tuple[JwtVerifier, Issuer], idp: Idp, kid: str) -> None:
    v, issuer = idp_verifier
    token = idp.token(kid=kid)
    got_issuer, alg, got_kid = v.precheck(token)
    assert (got_issuer, got_kid) == (issuer, kid)
    claims = await v.claims(token, got_issuer, alg, got_kid)
    assert claims["sub"] == "alice" and claims["iss"] == idp.url


async def test_a_key_the_issuer_does_not_publish(idp_verifier: tuple[JwtVerifier, Issuer], idp: Idp) -> None:
    v, issuer = idp_verifier
    token = idp.token(kid="rsa-1")
    with pytest.raises(PepError) as exc:
        await v.claims(token, issuer, "RS256", "nobody's-key")
    refused(exc, "authn.unknown_key")


async def test_another_key_s_signature(idp_verifier: tuple[JwtVerifier, Issuer], idp: Idp) -> None:
    v, issuer = idp_verifier
    head, body, _ = idp.token(kid="rsa-1").split(".")
    forged = f"{head}.{body}.{b64(b'x' * 256)}"
    with pytest.raises(PepError) as exc:
        await v.claims(forged, issuer, "RS256", "rsa-1")
    refused(exc, "authn.bad_signature")


async def test_keys_unavailable_is_a_503_without_a_challenge(idp: Idp) -> None:
    dead = Issuer(name="dead", issuer="http://127.0.0.1:9", audiences=("vvault",), allow_http=True)
    v = JwtVerifier((dead,), max_bytes=8192, realm=REALM)
    await v.start()
    try:
        assert v.ready() == {"dead": False}
        with pytest.raises(PepError) as exc:
            await v.claims(by_hand({"alg": "RS256"}, {"iss": dead.issuer}), dead, "RS256", None)
    finally:
        await v.stop()
    assert (exc.value.code, exc.value.status, exc.value.headers) == ("authn.keys_unavailable", 503, ())
    assert exc.value.detail == "Signing keys unavailable"


async def test_start_and_stop(idp: Idp) -> None:
    hs_only = verifier()
    await hs_only.start()
    assert (hs_only._session, hs_only.keysets, hs_only.ready()) == (None, {}, {})
    await hs_only.stop()
    corp = Issuer(name="corp", issuer=idp.url, audiences=("vvault",), allow_http=True)
    v = JwtVerifier((HS, corp), max_bytes=8192, realm=REALM)
    assert (v.issuers, v.max_bytes, v.realm) == ((HS, corp), 8192, REALM)
    await v.start()
    session = v._session
    try:
        assert list(v.keysets) == [idp.url] and v.keysets[idp.url].issuer is corp
        assert v.keysets[idp.url].kids  # fetched at start
        assert v.ready() == {"corp": True}
        assert isinstance(session, aiohttp.ClientSession)
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)  # nothing an IdP sets is sent back
        assert session.timeout.total is None  # each fetch has its own deadline
    finally:
        await v.stop()
    assert session is not None and session.closed
    assert all(k._task is not None and k._task.done() for k in v.keysets.values())
