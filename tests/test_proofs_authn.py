"""Who is calling, decided step by step: the bearer header, the binding, the route's needs, the cache.

The authenticator is called directly with really signed tokens (an issuer's shared secret,
and the test IdP's keys over its real JWKS endpoint) and the test PKI's real client
certificates.  Each refusal is checked by code, detail and challenge; each accepted token
by the identity it maps to.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.idp import Issuer as Idp

from vvault_pep.config.models import ClaimMapping, Issuer, RouteAuthn, Workload
from vvault_pep.config.models import Identity as IdentityConfig
from vvault_pep.core.principal import Identity, UserToken
from vvault_pep.core.principal import Workload as VerifiedWorkload
from vvault_pep.core.request import PeerCertificate, parse_peer
from vvault_pep.errors import STATUS, PepError
from vvault_pep.identity import authn as authn_module
from vvault_pep.identity.authn import (
    SOURCES,
    Authenticator,
    BearerSource,
    Credentials,
    Found,
    WorkloadSource,
    _bearer,
    _strings,
)

SECRET = "k" * 64
HS = Issuer(
    name="hs",
    issuer="https://hs.example",
    audiences=("vvault",),
    algorithms=("HS256",),
    shared_secret=SECRET,
    passthrough_claims=("email", "dept"),
)
REALM = "authn-test"


def config(**over: Any) -> IdentityConfig:
    base: dict[str, Any] = {
        "issuers": (HS,),
        "workload": Workload(trust_domains=("demo.vvault",)),
        "realm": REALM,
    }
    return IdentityConfig(**{**base, **over})


def token(issuer: Issuer = HS, **over: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": issuer.issuer, "sub": "alice", "aud": "vvault", "iat": now, "exp": now + 300}
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not None}
    return pyjwt.encode(claims, SECRET, algorithm="HS256", headers={"typ": "at+jwt"})


def peer_of(pki: Path, name: str) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate((pki / f"client-{name}.pem").read_bytes())
    return parse_peer(cert.public_bytes(Encoding.DER), trust_domains=("demo.vvault", "other.domain"))


def refused(exc: pytest.ExceptionInfo[PepError], code: str, detail: str | None = None) -> None:
    err = exc.value
    assert (err.code, err.status) == (code, STATUS[code][0])
    assert err.detail == (detail if detail is not None else STATUS[code][1])
    if code == "authn.required":
        assert err.headers == (("WWW-Authenticate", f'Bearer realm="{REALM}"'),)
    elif err.status == 400:
        assert err.headers == (("WWW-Authenticate", f'Bearer realm="{REALM}", error="invalid_request"'),)
    else:
        assert err.headers == (
            (
                "WWW-Authenticate",
                f'Bearer realm="{REALM}", error="invalid_token", error_description="{STATUS[code][1]}"',
            ),
        )


# -- small pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "split", "out"),
    [
        ("a b  c", False, ("a b  c",)),
        ("a b  c", True, ("a", "b", "c")),
        ("", True, ()),
        (["a", 1, "b c", None], False, ("a", "b c")),
        (["a b"], True, ("a b",)),
        (None, False, ()),
        (7, True, ()),
        ({"a": 1}, False, ()),
        (("a",), False, ()),
    ],
)
def test_strings(value: Any, split: bool, out: tuple[str, ...]) -> None:
    assert _strings(value, split=split) == out


def test_strings_does_not_split_by_default() -> None:
    assert _strings("a b") == ("a b",)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("Basic dXNlcjpwYXNz", None),
        ("Negotiate abc", None),
        ("Bearerx abc", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer  abc  ", "abc"),
        ("Bearer a-b.c_d~e+f/g==", "a-b.c_d~e+f/g=="),
        ("Bearer abc\t", "abc"),
    ],
)
def test_the_bearer_header(header: str | None, token: str | None) -> None:
    assert _bearer(header, REALM) == token


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Bearer    ", "Bearer a b", "Bearer =abc", "Bearer ab=c", "Bearer a,b", "Bearer é"]
)
def test_a_malformed_bearer_header(header: str) -> None:
    with pytest.raises(PepError) as exc:
        _bearer(header, REALM)
    refused(exc, "authn.malformed")


def test_the_sources_in_their_order() -> None:
    assert (BearerSource, WorkloadSource) == SOURCES
    a = Authenticator(config())
    assert [type(s) for s in a.sources] == [BearerSource, WorkloadSource]
    assert (BearerSource.name, WorkloadSource.name) == ("bearer", "workload")
    assert a.jwt.max_bytes == 8192 and a.jwt.realm == REALM and a.jwt.issuers == (HS,)
    assert Authenticator(config(max_token_bytes=600)).jwt.max_bytes == 600


# -- the bearer source --------------------------------------------------------------------------


async def bearer(
    authorization: str | None,
    *,
    query: tuple[tuple[str, tuple[str, ...]], ...] = (),
    peer: PeerCertificate | None = None,
    cfg: IdentityConfig | None = None,
) -> Found:
    found = Found()
    await BearerSource(Authenticator(cfg or config())).authenticate(Credentials(authorization, query, peer), found)
    return found


@pytest.mark.parametrize("authorization", [None, "Basic x"])
async def test_a_token_in_the_query_is_refused_whatever_the_header(authorization: str | None) -> None:
    with pytest.raises(PepError) as exc:
        await bearer(authorization, query=(("page", ("1",)), ("access_token", ("abc",))))
    refused(exc, "authn.token_in_query")


async def test_other_query_parameters_are_not_tokens() -> None:
    found = await bearer(None, query=(("Access_Token", ("abc",)), ("access_token_hint", ("x",))))
    assert found == Found()


async def test_no_issuer_configured_refuses_a_bearer_token() -> None:
    with pytest.raises(PepError) as exc:
        await bearer(f"Bearer {token()}", cfg=config(issuers=()))
    refused(exc, "authn.unknown_issuer", "this PEP accepts no bearer tokens")


async def test_no_issuer_configured_and_no_token() -> None:
    assert await bearer(None, cfg=config(issuers=())) == Found()
    assert await bearer("Basic x", cfg=config(issuers=())) == Found()


async def test_a_verified_token_names_the_user() -> None:
    found = await bearer(f"Bearer {token()}")
    assert found.user is not None and found.user.subject == "alice"
    assert (found.workload, found.bound) == (None, False)


async def test_a_bound_token_over_its_certificate(pki: Path) -> None:
    peer = peer_of(pki, "reader")
    found = await bearer(f"Bearer {token(cnf={'x5t#S256': peer.x5t_s256})}", peer=peer)
    assert found.bound is True and found.user is not None
    assert found.user.cnf_x5t_s256 == peer.x5t_s256


async def test_a_bound_token_over_another_certificate_or_none(pki: Path) -> None:
    bound_to = peer_of(pki, "reader").x5t_s256
    for peer in (peer_of(pki, "ops"), None):
        with pytest.raises(PepError) as exc:
            await bearer(f"Bearer {token(cnf={'x5t#S256': bound_to})}", peer=peer)
        refused(exc, "authn.cert_binding_mismatch")


async def test_an_unbound_token_over_a_certificate_is_not_bound(pki: Path) -> None:
    found = await bearer(f"Bearer {token()}", peer=peer_of(pki, "reader"))
    assert found.bound is False and found.user is not None


# -- the workload source -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spiffe_id"),
    [("reader", "spiffe://demo.vvault/client/reader"), ("foreign", None), ("cn-spoof", None)],
)
async def test_the_workload_source(pki: Path, name: str, spiffe_id: str | None) -> None:
    found = Found()
    source = WorkloadSource(Authenticator(config()))
    assert source.trust_domains == ("demo.vvault",)
    await source.authenticate(Credentials(None, (), peer_of(pki, name)), found)
    assert (found.workload.spiffe_id if found.workload else None) == spiffe_id
    assert found.user is None


# -- the route's requirements --------------------------------------------------------------------

NEEDS_USER = "a bearer token is required"
NEEDS_WORKLOAD = "a workload certificate from a trusted domain is required"
NEEDS_ANY = "a bearer token or workload certificate is required"


@pytest.mark.parametrize(
    ("require", "user", "workload", "code", "detail"),
    [
        ("none", False, False, None, None),
        ("none", True, True, None, None),
        ("user", True, False, None, None),
        ("user", False, True, "authn.required", NEEDS_USER),
        ("user", False, False, "authn.required", NEEDS_USER),
        ("workload", False, True, None, None),
        ("workload", True, False, "authn.untrusted_workload", NEEDS_WORKLOAD),
        ("user+workload", True, True, None, None),
        ("user+workload", False, True, "authn.required", NEEDS_USER),
        ("user+workload", True, False, "authn.untrusted_workload", NEEDS_WORKLOAD),
        ("any", True, False, None, None),
        ("any", False, True, None, None),
        ("any", False, False, "authn.required", NEEDS_ANY),
    ],
)
async def test_what_a_route_requires(
    pki: Path, require: str, user: bool, workload: bool, code: str | None, detail: str | None
) -> None:
    a = Authenticator(config())
    authorization = f"Bearer {token()}" if user else None
    peer = peer_of(pki, "reader" if workload else "foreign")
    rules = RouteAuthn(require=require)  # type: ignore[arg-type]
    if code is None:
        identity = await a.authenticate(authorization, (), peer, rules)
        assert isinstance(identity, Identity)
        assert (identity.user is not None, identity.workload is not None) == (user, workload)
        assert identity.cert_bound is False
    else:
        with pytest.raises(PepError) as exc:
            await a.authenticate(authorization, (), peer, rules)
        refused(exc, code, detail)


def test_a_route_requires_anyone_by_default() -> None:
    assert RouteAuthn().require == "any"


async def test_the_identity_carries_the_binding(pki: Path) -> None:
    peer = peer_of(pki, "reader")
    a = Authenticator(config())
    identity = await a.authenticate(
        f"Bearer {token(cnf={'x5t#S256': peer.x5t_s256})}", (), peer, RouteAuthn(require="user", bound_token=True)
    )
    assert identity.cert_bound is True and identity.user is not None
    assert identity.workload == VerifiedWorkload("spiffe://demo.vvault/client/reader", "demo.vvault", "/client/reader")


@pytest.mark.parametrize("require", ["user", "user+workload", "any", "none", "workload"])
async def test_a_bound_token_route_refuses_an_unbound_token(pki: Path, require: str) -> None:
    with pytest.raises(PepError) as exc:
        await Authenticator(config()).authenticate(
            f"Bearer {token()}",
            (),
            peer_of(pki, "reader"),
            RouteAuthn(require=require, bound_token=True),  # type: ignore[arg-type]
        )
    refused(exc, "authn.unbound_token")


@pytest.mark.parametrize("require", ["none", "workload", "any"])
async def test_a_bound_token_route_without_a_token_takes_the_workload(pki: Path, require: str) -> None:
    identity = await Authenticator(config()).authenticate(
        None,
        (),
        peer_of(pki, "reader"),
        RouteAuthn(require=require, bound_token=True),  # type: ignore[arg-type]
    )
    assert identity.user is None and identity.workload is not None


@pytest.mark.parametrize("require", ["user", "user+workload"])
async def test_a_bound_token_route_that_needs_a_user_without_a_token(pki: Path, require: str) -> None:
    with pytest.raises(PepError) as exc:
        await Authenticator(config()).authenticate(
            None,
            (),
            peer_of(pki, "reader"),
            RouteAuthn(require=require, bound_token=True),  # type: ignore[arg-type]
        )
    refused(exc, "authn.required", NEEDS_USER)


# -- mapping claims to the user ------------------------------------------------------------------


def mapped(claims: dict[str, Any], issuer: Issuer = HS) -> UserToken:
    base = {"iss": issuer.issuer, "exp": 2_000_000_000}
    return Authenticator(config(issuers=(issuer,)))._map(issuer, {**base, **claims}, None)


def test_every_field_of_the_user() -> None:
    user = mapped(
        {
            "sub": "alice",
            "tenant": "acme",
            "roles": ["reader", 1],
            "groups": ["g1"],
            "scope": "secrets:read  vectors:query",
            "amr": ["pwd", "mfa"],
            "acr": "loa2",
            "auth_time": 1_700_000_000,
            "client_id": "cli",
            "azp": "ignored",
            "jti": "t-1",
            "email": "a@example.com",
            "other": "not passed",
        }
    )
    assert user == UserToken(
        issuer="https://hs.example",
        subject="alice",
        tenant="acme",
        roles=("reader",),
        groups=("g1",),
        scopes=("secrets:read", "vectors:query"),
        amr=("pwd", "mfa"),
        acr="loa2",
        auth_time=1_700_000_000,
        client_id="cli",
        token_id="t-1",
        expires_at=2_000_000_000,
        cnf_x5t_s256=None,
        claims={"email": "a@example.com"},
    )


def test_absent_or_mistyped_claims_are_none() -> None:
    user = mapped({"sub": 5, "tenant": ["acme"], "acr": 2, "auth_time": True, "client_id": 3, "jti": 4, "roles": "r"})
    assert (user.subject, user.tenant, user.acr, user.auth_time, user.client_id, user.token_id) == (None,) * 6
    assert user.roles == ("r",) and user.groups == () and user.scopes == () and user.amr == ()
    assert user.claims == {}


def test_auth_time_as_a_float_is_not_taken() -> None:
    assert mapped({"auth_time": 1_700_000_000.5}).auth_time is None


def test_the_client_falls_back_to_azp() -> None:
    assert mapped({"azp": "party"}).client_id == "party"
    assert mapped({"client_id": 1, "azp": "party"}).client_id == "party"


def test_scopes_fall_back_to_scp() -> None:
    assert mapped({"scp": ["a", "b"]}).scopes == ("a", "b")
    assert mapped({"scp": "a b"}).scopes == ("a b",)  # scp is a list; a string is one entry
    assert mapped({"scope": "x", "scp": ["a"]}).scopes == ("x",)
    assert mapped({"scope": ["x", "y"]}).scopes == ("x", "y")


def test_a_custom_claim_mapping() -> None:
    custom = HS.model_copy(
        update={
            "claims": ClaimMapping(subject="uid", tenant="org", roles="r", groups="g", scopes="perms", client_id="app")
        }
    )
    user = mapped(
        {"uid": "u1", "org": "o1", "r": ["x"], "g": ["y"], "perms": "p q", "app": "a1", "sub": "no", "scp": ["no"]},
        custom,
    )
    assert (user.subject, user.tenant, user.roles, user.groups, user.scopes, user.client_id) == (
        "u1",
        "o1",
        ("x",),
        ("y",),
        ("p", "q"),
        "a1",
    )
    assert mapped({"scp": ["s"]}, custom).scopes == ()  # the scp fallback is for the standard claim only


def test_expiry_is_an_integer() -> None:
    user = mapped({"exp": 2_000_000_000.9})
    assert user.expires_at == 2_000_000_000 and type(user.expires_at) is int


@pytest.mark.parametrize("cnf", ["thumb", ["x"], {}, {"x5t#S256": 5}, {"jkt": "abc"}])
def test_an_unsupported_confirmation(cnf: Any) -> None:
    with pytest.raises(PepError) as exc:
        mapped({"cnf": cnf})
    refused(exc, "authn.malformed", "unsupported confirmation method")


def test_a_certificate_confirmation() -> None:
    assert mapped({"cnf": {"x5t#S256": "abc", "other": 1}}).cnf_x5t_s256 == "abc"


def test_auth_time_in_the_future() -> None:
    now = int(time.time())
    assert mapped({"auth_time": now + 20}).auth_time == now + 20  # within the 30 s leeway
    for late in (now + 100, now + 31 + 5):
        with pytest.raises(PepError) as exc:
            mapped({"auth_time": late})
        refused(exc, "authn.not_yet_valid", "auth_time is in the future")
    strict = HS.model_copy(update={"leeway_s": 0.0})
    with pytest.raises(PepError):
        mapped({"auth_time": now + 20}, strict)


# -- the verified-token cache ---------------------------------------------------------------------


async def test_a_repeated_token_is_served_from_the_cache() -> None:
    a = Authenticator(config())
    t = token()
    first = await a.verify(t)
    assert await a.verify(t) is first


async def test_no_cache_when_its_size_is_zero() -> None:
    a = Authenticator(config(verified_cache_entries=0))
    t = token()
    first = await a.verify(t)
    assert await a.verify(t) is not first
    assert len(a._verified) == 0


async def test_the_cache_keeps_the_most_recently_used() -> None:
    a = Authenticator(config(verified_cache_entries=2))
    ta, tb, tc = token(jti="a"), token(jti="b"), token(jti="c")
    ua = await a.verify(ta)
    ub = await a.verify(tb)
    assert await a.verify(ta) is ua  # a is now the most recent
    await a.verify(tc)  # evicts b, the least recent
    assert len(a._verified) == 2
    assert await a.verify(ta) is ua
    assert await a.verify(tb) is not ub


async def test_the_cache_holds_exactly_its_size() -> None:
    a = Authenticator(config(verified_cache_entries=3))
    users = [await a.verify(token(jti=str(i))) for i in range(3)]
    assert len(a._verified) == 3
    assert [await a.verify(token(jti=str(i))) for i in range(3)] == users
    assert all(x is y for x, y in zip([await a.verify(token(jti=str(i))) for i in range(3)], users, strict=True))


async def test_a_cached_token_is_never_used_at_or_past_its_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    a = Authenticator(config())
    t = token()
    user = await a.verify(t)
    [digest] = a._verified
    monkeypatch.setattr(authn_module.time, "time", lambda: float(user.expires_at) - 0.001)
    assert a._cached(digest) is user
    monkeypatch.setattr(authn_module.time, "time", lambda: float(user.expires_at))
    assert a._cached(digest) is None
    assert digest not in a._verified


async def test_a_hmac_issuer_has_no_key_set_to_withdraw() -> None:
    a = Authenticator(config())
    assert a.keysets == {}
    t = token()
    assert await a.verify(t) is await a.verify(t)


@pytest.fixture
async def rotating() -> AsyncIterator[Idp]:
    idp = Idp()
    await idp.start()
    yield idp
    await idp.stop()


async def test_a_cached_token_whose_key_was_withdrawn_or_went_stale(rotating: Idp) -> None:
    corp = Issuer(name="corp", issuer=rotating.url, audiences=("vvault",), allow_http=True)
    a = Authenticator(IdentityConfig(issuers=(corp,), realm=REALM))
    await a.start()
    try:
        assert a.ready() == {"corp": True}
        keyset = a.keysets[rotating.url]
        assert a.keysets is a.jwt.keysets
        t = rotating.token(kid="ec-1")
        first = await a.verify(t)
        assert first.subject == "alice" and await a.verify(t) is first
        # stale past max_staleness: the cached entry is dropped; verifying fetches again
        real_clock = keyset.clock
        keyset.clock = lambda: real_clock() + corp.jwks.max_staleness_s + 10
        second = await a.verify(t)
        assert second is not first and second == first
        # withdrawn: the next fetch no longer has the key
        rotating.published.discard("ec-1")
        assert await keyset.refresh()
        with pytest.raises(PepError) as exc:
            await a.verify(t)
        refused(exc, "authn.unknown_key")
    finally:
        await a.stop()
    assert keyset._task is not None and keyset._task.done()


async def test_a_cache_of_one_entry_keeps_the_last_token() -> None:
    a = Authenticator(config(verified_cache_entries=1))
    t1, t2 = token(jti="one"), token(jti="two")
    first = await a.verify(t1)
    assert await a.verify(t1) is first
    second = await a.verify(t2)
    assert len(a._verified) == 1
    assert await a.verify(t2) is second
    assert await a.verify(t1) is not first


def test_auth_time_exactly_at_the_leeway_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authn_module.time, "time", lambda: 1_700_000_000.0)
    assert mapped({"auth_time": 1_700_000_030}).auth_time == 1_700_000_030  # now + 30 s: not past it
    with pytest.raises(PepError):
        mapped({"auth_time": 1_700_000_031})
