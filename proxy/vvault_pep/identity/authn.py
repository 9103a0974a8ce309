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

Each kind of credential is an :class:`IdentitySource` (a name and an ``authenticate`` step
that adds what it verified to the :class:`Found` identity, or raises ``authn.*``), registered
in :data:`SOURCES` and run in that order — the bearer token, then the workload certificate —
before the route's requirements are checked.  Device posture is separate (:mod:`.posture`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar

from ..config.models import Identity as IdentityConfig
from ..config.models import Issuer, RouteAuthn
from ..core.principal import Identity, UserToken, Workload
from ..core.request import PeerCertificate
from ..errors import PepError
from .jwks import KeySet
from .jwt import JwtVerifier, _fail
from .workload import workload_of

_T = TypeVar("_T")
# Distinct claim values (tenants, role and scope lists, key ids) shared between cached tokens.
_SHARED_MAX = 4096
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})  # one read-only copy for every token that passes none

_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def _strings(value: Any, *, split: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presents: its ``Authorization`` header, its query, its client certificate."""

    authorization: str | None
    query: tuple[tuple[str, tuple[str, ...]], ...]
    peer: PeerCertificate | None


@dataclass(slots=True)
class Found:
    """The identity the sources verified so far."""

    user: UserToken | None = None
    workload: Workload | None = None
    bound: bool = False  # the user's token is bound to the connection's certificate (RFC 8705)


class IdentitySource(Protocol):
    name: ClassVar[str]

    async def authenticate(self, creds: Credentials, found: Found) -> None:
        """Add what this source verifies to ``found``; raise PepError(authn.*) on a bad credential."""
        ...


class BearerSource:
    """A user's bearer JWT from the ``Authorization`` header (RFC 6750), bound if it says so."""

    name: ClassVar[str] = "bearer"

    def __init__(self, authn: Authenticator) -> None:
        self.authn = authn

    async def authenticate(self, creds: Credentials, found: Found) -> None:
        cfg, authorization, peer = self.authn.cfg, creds.authorization, creds.peer
        realm = cfg.realm
        if any(name == "access_token" for name, _ in creds.query):
            # RFC 6750 §2.3 tokens end up in logs and Referers: one source only, the header.
            raise _fail("authn.token_in_query", realm)
        # With no issuer configured the PEP can verify no token: a bearer token is
        # refused, never passed on unverified for the upstream to believe.
        token = _bearer(authorization, realm)
        if token is not None and not cfg.issuers:
            raise _fail("authn.unknown_issuer", realm, "this PEP accepts no bearer tokens")
        if token is not None:
            user = await self.authn.verify(token)
            if user.cnf_x5t_s256 is not None:
                if peer is None or not hmac.compare_digest(peer.x5t_s256.encode(), user.cnf_x5t_s256.encode()):
                    raise _fail("authn.cert_binding_mismatch", realm)
                found.bound = True
            found.user = user


class WorkloadSource:
    """A workload's client certificate: one SPIFFE ID in a trusted domain (never raises)."""

    name: ClassVar[str] = "workload"

    def __init__(self, authn: Authenticator) -> None:
        self.trust_domains = authn.cfg.workload.trust_domains

    async def authenticate(self, creds: Credentials, found: Found) -> None:
        found.workload = workload_of(creds.peer, self.trust_domains)


# The identity sources, in the order they run: adding one is a class and a line here.
SOURCES: tuple[Callable[[Authenticator], IdentitySource], ...] = (BearerSource, WorkloadSource)


class Authenticator:
    def __init__(self, cfg: IdentityConfig) -> None:
        self.cfg = cfg
        self.jwt = JwtVerifier(cfg.issuers, max_bytes=cfg.max_token_bytes, realm=cfg.realm)
        self._verified: OrderedDict[bytes, UserToken] = OrderedDict()
        # One object per distinct value: the many tokens of one tenant or role set that sit
        # in the verified cache hold one copy of it, not one each.
        self._shared: dict[Any, Any] = {}
        self.sources: tuple[IdentitySource, ...] = tuple(make(self) for make in SOURCES)

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
        creds, found = Credentials(authorization, query, peer), Found()
        for source in self.sources:
            await source.authenticate(creds, found)
        user, workload, bound = found.user, found.workload, found.bound
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
        user = self._map(issuer, await self.jwt.claims(token, issuer, alg, kid), kid)
        self._remember(digest, user)
        return user

    def verified_key(self, authorization: str | None) -> bytes | None:
        """The verified-token cache's key for this header's bearer token (None: no well-formed one)."""
        try:
            token = _bearer(authorization, self.cfg.realm)
        except PepError:
            return None
        return hashlib.sha256(token.encode()).digest() if token is not None else None

    def still_verified(self, key: bytes) -> UserToken | None:
        """The verified token cached under ``key`` while it holds (before ``exp``, its signing
        key still published and fresh); None once it does not, or was never cached."""
        return self._cached(key)

    def _map(self, issuer: Issuer, claims: dict[str, Any], kid: str | None) -> UserToken:
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
        share = self._share
        return UserToken(
            issuer=issuer.issuer,
            subject=share(opt_str(m.subject)),
            tenant=share(opt_str(m.tenant)),
            roles=share(_strings(claims.get(m.roles))),
            groups=share(_strings(claims.get(m.groups))),
            scopes=share(scopes),
            amr=share(_strings(claims.get("amr"))),
            acr=share(opt_str("acr")),
            auth_time=auth_time,
            client_id=share(opt_str(m.client_id) or opt_str("azp")),
            token_id=opt_str("jti"),
            expires_at=int(exp),
            cnf_x5t_s256=thumb,
            claims={k: claims[k] for k in issuer.passthrough_claims if k in claims} or _NO_CLAIMS,
            key_id=share(kid),
        )

    def _share(self, value: _T) -> _T:
        """The one object kept for this value (a string or a tuple of strings)."""
        if value is None:
            return value
        known: _T | None = self._shared.get(value)
        if known is not None:
            return known
        if len(self._shared) >= _SHARED_MAX:
            self._shared.pop(next(iter(self._shared)))
        self._shared[value] = value
        return value

    def _cached(self, digest: bytes) -> UserToken | None:
        user = self._verified.get(digest)
        if user is None:
            return None
        keyset = self.keysets.get(user.issuer)
        # Never past exp, and never once the signing key was withdrawn.
        if time.time() >= user.expires_at or (
            keyset is not None and (user.key_id not in keyset.kids or not keyset.fresh_enough())
        ):
            del self._verified[digest]
            return None
        self._verified.move_to_end(digest)
        return user

    def _remember(self, digest: bytes, user: UserToken) -> None:
        if self.cfg.verified_cache_entries == 0:
            return
        self._verified[digest] = user
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
