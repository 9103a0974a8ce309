"""Bearer JWTs, checked secure-by-default: size, shape, algorithm, issuer, key, claims.

Each failure has its own code (see :mod:`.authn` for the order of the checks); the issuer is
chosen by exact ``iss`` and its key set is the only one tried.  ``jku``/``x5u``/``jwk``/``x5c``
are never used.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import aiohttp
import jwt
from jwt import exceptions as jwt_errors

from ..config.models import HMAC_ALGORITHMS, Issuer
from ..errors import STATUS, PepError
from .jwks import KeySet

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
