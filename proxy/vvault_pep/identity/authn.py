"""Authenticate: who is calling — a user's bearer token, a workload's certificate, or both.

Bearer tokens (RFC 6750, ``Authorization: Bearer`` only) are JWTs checked
secure-by-default, in this order, each failure with its own code:

1. size (``identity.max_token_bytes``, before any parsing) → 431;
2. shape: three base64url parts (five is a JWE → refused), JSON objects with
   no duplicate keys in header or payload, no string that UTF-8 cannot encode
   (a lone surrogate such as ``"\ud800"``), and ``exp``/``nbf``/``iat``/
   ``auth_time`` JSON numbers when present (RFC 7519 NumericDate: pyjwt would
   read ``"exp": "9999999999"`` as a number);
3. ``alg``: never ``none``; must be in the *issuer's* configured list;
4. issuer chosen by exact string match of ``iss``; its key set only;
5. ``typ`` when the issuer names one (``at+jwt`` refuses ID tokens);
   any ``crit`` header → refused (no extension is understood);
6. key by ``kid`` from that issuer's JWKS (``jku``/``x5u``/``jwk``/``x5c`` are
   never used); signature, ``exp`` (required), ``nbf``, ``iat``, ``aud`` and
   required claims via pyjwt with the algorithm pinned;
7. RFC 8705: a token with ``cnf.x5t#S256`` is accepted only over a connection
   whose client certificate has that thumbprint — checked on every request.

Verified tokens are cached by SHA-256 until ``exp`` (and only while the key
that signed them is still published), so a repeated token skips the
signature, never the binding check.

A workload identity is a client certificate whose single URI SAN is a valid
SPIFFE ID in an allowed trust domain.  Routes say what they require.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
from jwt import exceptions as jwt_errors

from ..config.models import HMAC_ALGORITHMS, Issuer, RouteAuthn
from ..config.models import Identity as IdentityConfig
from ..core.principal import Identity, UserToken, Workload
from ..core.request import PeerCertificate
from ..core.spiffe import InvalidSpiffeId, parse_spiffe_id
from ..errors import STATUS, PepError
from .jwks import KeySet

_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_MAX_KID = 256


def _fail(code: str, realm: str, detail: str = "") -> PepError:
    status = STATUS[code][0]
    if code == "authn.required":
        challenge = f'Bearer realm="{realm}"'
    elif status == 400:
        challenge = f'Bearer realm="{realm}", error="invalid_request"'
    else:
        challenge = f'Bearer realm="{realm}", error="invalid_token", error_description="{STATUS[code][1]}"'
    headers = (("WWW-Authenticate", challenge),) if status in (400, 401) else ()
    return PepError(code, detail or STATUS[code][1], headers=headers)


NUMERIC_DATES = ("exp", "nbf", "iat", "auth_time")


def _encodable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)  # JSON writers (orjson, OPA's input) stop at 64 bits
    if isinstance(value, float):
        return math.isfinite(value)  # json.loads reads NaN and Infinity, which JSON has not
    if depth > 32:
        return False  # nesting this deep is not a credential
    if isinstance(value, dict):
        return all(_encodable(k, depth + 1) and _encodable(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v, depth + 1) for v in value)
    return True


def strict_problem(header: dict[str, Any], payload: dict[str, Any]) -> str | None:
    """Why a decoded JOSE header and payload are not strictly typed, or None."""
    if not _encodable(header) or not _encodable(payload):
        # A lone surrogate (or a 100-digit integer) survives json.loads, but nothing
        # downstream can write it: refuse it here, with a reason, not later with a 500.
        return "a value in the token is not valid JSON text (lone surrogate, huge number, NaN)"
    for name in NUMERIC_DATES:
        value = payload.get(name)
        if name in payload and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"'{name}' is not a NumericDate (a JSON number)"
    return None


def _b64json(segment: str) -> dict[str, Any]:
    """Decode one JOSE segment to a JSON object, refusing duplicate keys."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError("duplicate key")
            out[key] = value
        return out

    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    doc = json.loads(raw, object_pairs_hook=no_duplicates)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


def _strings(value: Any, *, split: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def workload_of(peer: PeerCertificate | None, trust_domains: tuple[str, ...]) -> Workload | None:
    """The SPIFFE workload identity of a verified certificate, if it is one we trust."""
    if peer is None or peer.spiffe_id is None or not trust_domains:
        return None
    if len(peer.uri_sans) != 1:
        return None  # an X.509-SVID carries exactly one URI SAN
    try:
        sid = parse_spiffe_id(peer.spiffe_id)
    except InvalidSpiffeId:
        return None
    if sid.trust_domain not in trust_domains:
        return None
    return Workload(str(sid), sid.trust_domain, sid.path)


class JwtVerifier:
    """Signature and claim checks for JWTs from a set of configured issuers.

    Shared by bearer tokens and device-posture assertions: the order of checks
    and their codes are the ones in this module's docstring.
    """

    def __init__(self, issuers: tuple[Issuer, ...], *, max_bytes: int, realm: str) -> None:
        self.issuers = issuers
        self.max_bytes = max_bytes
        self.realm = realm
        self._by_issuer: dict[str, Issuer] = {i.issuer: i for i in issuers}
        self._session: aiohttp.ClientSession | None = None
        self.keysets: dict[str, KeySet] = {}

    async def start(self) -> None:
        if not any(i.uses_jwks for i in self.issuers):
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar()
        )
        for issuer in self.issuers:
            if issuer.uses_jwks:
                keyset = KeySet(issuer, self._session)
                self.keysets[issuer.issuer] = keyset
                await keyset.start()  # a failure here is not fatal: /readyz reports it

    async def stop(self) -> None:
        for keyset in self.keysets.values():
            await keyset.stop()
        if self._session is not None:
            await self._session.close()

    def ready(self) -> dict[str, bool]:
        return {k.issuer.name: k.fresh_enough() for k in self.keysets.values()}

    def precheck(self, token: str) -> tuple[Issuer, str, str | None]:
        """Everything that needs no key: size, shape, alg, issuer, typ, crit, kid."""
        realm = self.realm
        if len(token) > self.max_bytes:
            raise _fail("authn.token_too_large", realm)
        parts = token.split(".")
        if len(parts) == 5:
            raise _fail("authn.encrypted_token", realm)
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _fail("authn.malformed", realm)
        try:
            header, payload = _b64json(parts[0]), _b64json(parts[1])
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise _fail("authn.malformed", realm) from exc
        problem = strict_problem(header, payload)
        if problem is not None:
            raise _fail("authn.malformed", realm, problem)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise _fail("authn.malformed", realm, "no algorithm")
        if alg.strip().lower() == "none":
            raise _fail("authn.bad_algorithm", realm)
        iss = payload.get("iss")
        issuer = self._by_issuer.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _fail("authn.unknown_issuer", realm)
        if alg not in issuer.algorithms:
            raise _fail("authn.bad_algorithm", realm)
        if issuer.typ is not None:
            typ = header.get("typ")
            wanted = issuer.typ.lower()
            if not isinstance(typ, str) or typ.lower() not in (wanted, "application/" + wanted):
                raise _fail("authn.wrong_type", realm)
        if "crit" in header:
            raise _fail("authn.unsupported_crit", realm)
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID):
            raise _fail("authn.malformed", realm, "bad key id")
        return issuer, alg, kid

    async def claims(self, token: str, issuer: Issuer, alg: str, kid: str | None) -> dict[str, Any]:
        """Signature, exp/nbf/iat, iss and aud, with the algorithm pinned; the claims."""
        realm = self.realm
        key: Any
        if alg in HMAC_ALGORITHMS:
            assert issuer.shared_secret is not None  # config validation guarantees it
            key = issuer.shared_secret.encode()
        else:
            try:
                key = (await self.keysets[issuer.issuer].key_for(kid, alg)).jwk.key
            except PepError as exc:
                raise _fail(exc.code, realm) from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                leeway=issuer.leeway_s,
                options={"require": ["exp", "iss", "aud", *issuer.required_claims], "verify_signature": True},
            )
        except jwt_errors.ExpiredSignatureError as exc:
            raise _fail("authn.expired", realm) from exc
        except (jwt_errors.ImmatureSignatureError, jwt_errors.InvalidIssuedAtError) as exc:
            raise _fail("authn.not_yet_valid", realm) from exc
        except jwt_errors.InvalidAudienceError as exc:
            raise _fail("authn.wrong_audience", realm) from exc
        except jwt_errors.InvalidIssuerError as exc:
            raise _fail("authn.wrong_issuer", realm) from exc
        except jwt_errors.MissingRequiredClaimError as exc:
            code = "authn.wrong_audience" if exc.claim == "aud" else "authn.missing_claim"
            raise _fail(code, realm, f"the token has no '{exc.claim}' claim") from exc
        except jwt_errors.InvalidSignatureError as exc:
            raise _fail("authn.bad_signature", realm) from exc
        except jwt_errors.InvalidAlgorithmError as exc:
            raise _fail("authn.bad_algorithm", realm) from exc
        except jwt_errors.PyJWTError as exc:
            raise _fail("authn.malformed", realm) from exc
        return claims


class Authenticator:
    def __init__(self, cfg: IdentityConfig) -> None:
        self.cfg = cfg
        self.jwt = JwtVerifier(cfg.issuers, max_bytes=cfg.max_token_bytes, realm=cfg.realm)
        self._verified: OrderedDict[bytes, tuple[UserToken, str, str | None]] = OrderedDict()

    @property
    def keysets(self) -> dict[str, KeySet]:
        return self.jwt.keysets

    async def start(self) -> None:
        await self.jwt.start()

    async def stop(self) -> None:
        await self.jwt.stop()

    def ready(self) -> dict[str, bool]:
        return self.jwt.ready()

    async def authenticate(
        self,
        authorization: str | None,
        query: tuple[tuple[str, tuple[str, ...]], ...],
        peer: PeerCertificate | None,
        rules: RouteAuthn,
    ) -> Identity:
        realm = self.cfg.realm
        if any(name == "access_token" for name, _ in query):
            # RFC 6750 §2.3 tokens end up in logs and Referers: one source only, the header.
            raise _fail("authn.token_in_query", realm)
        # With no issuer configured the PEP can verify no token: a bearer token is
        # refused, never passed on unverified for the upstream to believe.
        token = _bearer(authorization, realm)
        if token is not None and not self.cfg.issuers:
            raise _fail("authn.unknown_issuer", realm, "this PEP accepts no bearer tokens")
        workload = workload_of(peer, self.cfg.workload.trust_domains)
        user: UserToken | None = None
        bound = False
        if token is not None:
            user = await self.verify(token)
            if user.cnf_x5t_s256 is not None:
                if peer is None or not hmac.compare_digest(peer.x5t_s256.encode(), user.cnf_x5t_s256.encode()):
                    raise _fail("authn.cert_binding_mismatch", realm)
                bound = True
        need = rules.require
        if need in ("user", "user+workload") and user is None:
            raise _fail("authn.required", realm, "a bearer token is required")
        if need in ("workload", "user+workload") and workload is None:
            raise _fail("authn.untrusted_workload", realm, "a workload certificate from a trusted domain is required")
        if need == "any" and user is None and workload is None:
            raise _fail("authn.required", realm, "a bearer token or workload certificate is required")
        if rules.bound_token and user is not None and not bound:
            raise _fail("authn.unbound_token", realm)
        if rules.bound_token and user is None and need in ("user", "user+workload"):
            raise _fail("authn.required", realm)
        return Identity(user, workload, bound)

    async def verify(self, token: str) -> UserToken:
        """Verify a bearer JWT; return the mapped claims or raise PepError(authn.*)."""
        # A token in the verified cache passed every check below (the config is fixed for
        # the process's life); the cache re-checks exp and the signing key on each hit.
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        issuer, alg, kid = self.jwt.precheck(token)
        user = self._map(issuer, await self.jwt.claims(token, issuer, alg, kid))
        self._remember(digest, user, issuer.issuer, kid)
        return user

    def _map(self, issuer: Issuer, claims: dict[str, Any]) -> UserToken:
        m = issuer.claims
        cnf = claims.get("cnf")
        thumb = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if cnf is not None and not isinstance(thumb, str):
            raise _fail("authn.malformed", self.cfg.realm, "unsupported confirmation method")

        def opt_str(name: str) -> str | None:
            v = claims.get(name)
            return v if isinstance(v, str) else None

        def opt_int(name: str) -> int | None:
            v = claims.get(name)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        auth_time = opt_int("auth_time")
        if auth_time is not None and auth_time > time.time() + issuer.leeway_s:
            # A sign-in in the future is a forged or broken token, never a "recent" one.
            raise _fail("authn.not_yet_valid", self.cfg.realm, "auth_time is in the future")
        scopes = _strings(claims.get(m.scopes), split=True)
        if not scopes and m.scopes == "scope":
            scopes = _strings(claims.get("scp"))
        exp = claims["exp"]
        return UserToken(
            issuer=issuer.issuer,
            subject=opt_str(m.subject),
            tenant=opt_str(m.tenant),
            roles=_strings(claims.get(m.roles)),
            groups=_strings(claims.get(m.groups)),
            scopes=scopes,
            amr=_strings(claims.get("amr")),
            acr=opt_str("acr"),
            auth_time=auth_time,
            client_id=opt_str(m.client_id) or opt_str("azp"),
            token_id=opt_str("jti"),
            expires_at=int(exp),
            cnf_x5t_s256=thumb,
            claims={k: claims[k] for k in issuer.passthrough_claims if k in claims},
        )

    def _cached(self, digest: bytes) -> UserToken | None:
        entry = self._verified.get(digest)
        if entry is None:
            return None
        user, issuer, kid = entry
        keyset = self.keysets.get(issuer)
        # Never past exp, and never once the signing key was withdrawn.
        if time.time() >= user.expires_at or (
            keyset is not None and (kid not in keyset.kids or not keyset.fresh_enough())
        ):
            del self._verified[digest]
            return None
        self._verified.move_to_end(digest)
        return user

    def _remember(self, digest: bytes, user: UserToken, issuer: str, kid: str | None) -> None:
        if self.cfg.verified_cache_entries == 0:
            return
        self._verified[digest] = (user, issuer, kid)
        while len(self._verified) > self.cfg.verified_cache_entries:
            self._verified.popitem(last=False)


def _bearer(authorization: str | None, realm: str) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme is the upstream's business, not an identity here
    token = token.strip()
    if not token or not _B64TOKEN.fullmatch(token):
        raise _fail("authn.malformed", realm)
    return token
