"""JWKS: each issuer's verification keys, fetched, filtered, cached and refreshed.

Keys come from OIDC discovery (``{issuer}/.well-known/openid-configuration``
→ ``jwks_uri``, whose ``issuer`` must equal the configured one exactly), a
configured ``jwks_uri`` or a ``jwks_file``.  Only keys fit to verify survive
parsing: ``use: enc`` keys, symmetric (``oct``) keys, keys of a type no
allowed algorithm uses and keys that fail to load are dropped.

Lifetimes:

* refreshed in the background at 80 % of the document's lifetime
  (``Cache-Control: max-age`` clamped to ``[min_ttl_s, max_ttl_s]``, else
  ``default_ttl_s``);
* an unknown ``kid`` triggers at most one refetch per
  ``unknown_kid_cooldown_s``, shared by every request waiting on it — a flood
  of random ``kid`` values costs one fetch and evicts nothing;
* when fetches fail, the last good keys serve until ``max_staleness_s`` after
  they were fetched; then the issuer's tokens fail closed (503).

The PEP never fetches a URL that a token names (``jku``, ``x5u``) and never
takes a key from a token (``jwk``, ``x5c``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from ..config.models import Issuer
from ..errors import PepError
from ..net.bounded import TooLarge, read_bounded

log = logging.getLogger("vvault_pep.jwks")

# Which JWK key types (and curves) each algorithm family may use.
_ALG_KTY: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}  # fmt: skip
_STALE_RETRY_S = 1.0
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own alg, if it pins one
    jwk: PyJWK  # parsed once; verification reuses the key object

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        kty, crv = _ALG_KTY.get(alg, ("", None))
        if self.kty != kty:
            return False
        return crv is None or self.crv == crv


def parse_jwks(doc: Any, allowed_algs: tuple[str, ...]) -> list[Key]:
    """Keys fit to verify tokens signed with one of ``allowed_algs``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWK Set")
    kinds = {_ALG_KTY[a][0] for a in allowed_algs if a in _ALG_KTY}
    keys: list[Key] = []
    for raw in doc["keys"]:
        if not isinstance(raw, dict):
            continue
        kty = raw.get("kty")
        if kty not in kinds:  # includes "oct": a JWKS never supplies an HMAC secret
            continue
        if raw.get("use", "sig") != "sig":
            continue
        ops = raw.get("key_ops")
        if ops is not None and "verify" not in ops:
            continue
        if "d" in raw or "p" in raw:
            continue  # a private key published by mistake: refuse to use it at all
        kid = raw.get("kid")
        alg = raw.get("alg")
        if (kid is not None and not isinstance(kid, str)) or (alg is not None and alg not in allowed_algs):
            continue
        try:
            jwk = PyJWK(raw, algorithm=alg or _default_alg(kty, raw.get("crv"), allowed_algs))
        except (PyJWTError, ValueError, TypeError, KeyError):
            continue
        keys.append(Key(kid, str(kty), raw.get("crv"), alg, jwk))
    return keys


def _default_alg(kty: str, crv: str | None, allowed: tuple[str, ...]) -> str:
    for alg in allowed:
        want_kty, want_crv = _ALG_KTY.get(alg, ("", None))
        if want_kty == kty and (want_crv is None or want_crv == crv):
            return alg
    raise ValueError("no allowed algorithm for this key")


class KeySet:
    """One issuer's keys.  ``clock`` is injectable for tests of staleness."""

    def __init__(self, issuer: Issuer, session: aiohttp.ClientSession, clock: Callable[[], float] = time.monotonic):
        self.issuer = issuer
        self._session = session
        self.clock = clock
        self._keys: list[Key] = []
        self._fetched_at: float | None = None
        self._expires_at = 0.0
        self._last_kid_refetch = -1e18
        self._last_stale_attempt = -1e18
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0
        self.failures = 0

    @property
    def kids(self) -> list[str | None]:
        return [k.kid for k in self._keys]

    def fresh_enough(self) -> bool:
        return self._fetched_at is not None and self.clock() - self._fetched_at <= self.issuer.jwks.max_staleness_s

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresher(), name=f"jwks-refresh-{self.issuer.name}")

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _refresher(self) -> None:
        while True:
            ttl = max(self._expires_at - self.clock(), 0.0)
            # refresh at 80 % of the lifetime; after a failure, retry within the cooldown
            delay = ttl * 0.8 if self._fetched_at and ttl > 0 else min(5.0, self.issuer.jwks.min_ttl_s)
            await asyncio.sleep(max(delay, 0.05))
            await self.refresh()

    async def refresh(self) -> bool:
        """Fetch once, shared by concurrent callers.  True if keys were replaced."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch(), name=f"jwks-fetch-{self.issuer.name}")
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> bool:
        cfg = self.issuer
        self.fetches += 1
        try:
            async with asyncio.timeout(cfg.jwks.fetch_timeout_s):
                if cfg.jwks_file is not None:
                    doc, max_age = json.loads(cfg.jwks_file.read_text()), None
                else:
                    uri = cfg.jwks_uri or await self._discover()
                    doc, max_age = await self._get_json(uri)
            keys = parse_jwks(doc, cfg.algorithms)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError) as exc:
            # RecursionError: a document nested deeper than json's recursion allows
            self.failures += 1
            log.warning("JWKS refresh for issuer %s failed: %s", cfg.name, type(exc).__name__)
            return False
        ttl = cfg.jwks.default_ttl_s if max_age is None else max_age
        ttl = min(max(ttl, cfg.jwks.min_ttl_s), cfg.jwks.max_ttl_s)
        self._keys = keys
        self._fetched_at = self.clock()
        self._expires_at = self._fetched_at + ttl
        return True

    async def _discover(self) -> str:
        cfg = self.issuer
        doc, _ = await self._get_json(cfg.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(doc, dict) or doc.get("issuer") != cfg.issuer:
            # OpenID Connect Discovery 1.0 §4.3: the issuer in the document must match exactly.
            raise ValueError("discovery document names another issuer")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not (
            uri.startswith("https://") or (cfg.allow_http and uri.startswith("http://"))
        ):
            raise ValueError("discovery document has no usable jwks_uri")
        return uri

    async def _get_json(self, url: str) -> tuple[Any, float | None]:
        async with self._session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            try:
                body = await read_bounded(resp, self.issuer.jwks.max_document_bytes)
            except TooLarge as exc:
                raise ValueError("document too large") from exc
            m = _MAX_AGE.search(resp.headers.get("Cache-Control", ""))
            return json.loads(body), float(m.group(1)) if m else None

    async def key_for(self, kid: str | None, alg: str) -> Key:
        """The key to verify a token with this ``kid`` and ``alg``, or PepError."""
        if not self.fresh_enough() and self.clock() - self._last_stale_attempt >= _STALE_RETRY_S:
            # Stale past the limit (or never fetched): one attempt now — and at most one per
            # second, so a dead IdP does not cost every request a fetch timeout — then fail closed.
            self._last_stale_attempt = self.clock()
            await self.refresh()
        if not self.fresh_enough():
            raise PepError("authn.keys_unavailable", "the issuer's signing keys are unavailable")
        key = self._pick(kid, alg)
        if key is not None:
            return key
        now = self.clock()
        if now - self._last_kid_refetch >= self.issuer.jwks.unknown_kid_cooldown_s:
            self._last_kid_refetch = now
            await self.refresh()
            key = self._pick(kid, alg)
            if key is not None:
                return key
        raise PepError("authn.unknown_key", "the token's signing key is not known for its issuer")

    def _pick(self, kid: str | None, alg: str) -> Key | None:
        candidates = [k for k in self._keys if k.fits(alg)]
        if kid is None:
            # Without a kid only an unambiguous key set will do.
            return candidates[0] if len(candidates) == 1 else None
        for key in candidates:
            if key.kid == kid:
                return key
        return None
