"""A real OIDC issuer for tests: discovery + JWKS over HTTP, keys from `cryptography`.

It counts every fetch so tests can prove what the PEP did (and did not) ask
for, can be told to fail, and can rotate keys.  ``Trap`` is a server that
records any request: tokens point ``jku``/``x5u`` at it to prove the PEP never
fetches a URL a token names.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

KeyType = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: KeyType, kid: str, alg: str, **extra: Any) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        doc = json.loads(RSAAlgorithm.to_jwk(pub))
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        doc = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        doc = json.loads(OKPAlgorithm.to_jwk(pub))
    return {**doc, "kid": kid, "alg": alg, "use": "sig", **extra}


class Issuer:
    def __init__(self) -> None:
        self.keys: dict[str, tuple[KeyType, str]] = {
            "rsa-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
            "ec-1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
            "ed-1": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        }
        self.published: set[str] = set(self.keys)
        self.extra_jwks: list[dict[str, Any]] = []
        self.fetches = {"discovery": 0, "jwks": 0}
        self.failing = False
        self.max_age: int | None = 300
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.fetches["discovery"] += 1
        if self.failing:
            return web.Response(status=503)
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches["jwks"] += 1
        if self.failing:
            return web.Response(status=503)
        keys = [public_jwk(k, kid, alg) for kid, (k, alg) in self.keys.items() if kid in self.published]
        headers = {"Cache-Control": f"max-age={self.max_age}"} if self.max_age is not None else {}
        return web.json_response({"keys": keys + self.extra_jwks}, headers=headers)

    def add_key(self, kid: str) -> None:
        self.keys[kid] = (ec.generate_private_key(ec.SECP256R1()), "ES256")
        self.published.add(kid)

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.url,
            "sub": "alice",
            "aud": "vvault",
            "iat": now,
            "exp": now + 300,
            "jti": f"t-{now}-{id(over)}",
            "tenant": "acme",
            "roles": ["reader"],
            "scope": "secrets:read vectors:query",
            "amr": ["pwd", "mfa"],
            "auth_time": now - 60,
        }
        base.update(over)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, kid: str = "rsa-1", headers: dict[str, Any] | None = None, **claims: Any) -> str:
        key, alg = self.keys[kid]
        hdr = {"kid": kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers=hdr)


def posture_assertion(devices: Issuer, *, sub: str = "alice", key: str = "ec-1", **over: Any) -> str:
    """A device trust service's signed posture assertion for ``sub`` (a compliant device unless overridden)."""
    now = int(time.time())
    claims = {
        "iss": devices.url, "aud": "vvault-pep", "sub": sub, "iat": now, "exp": now + 120,
        "device_id": "dev-7f3a", "managed": True, "platform": "macOS", "os_version": "15.4", "patch_age_days": 3,
        "disk_encryption": True, "screen_lock": True, "edr_running": True, "compliance_score": 92, **over,
    }  # fmt: skip
    signing_key, alg = devices.keys[key]
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None}, signing_key, algorithm=alg, headers={"kid": key}
    )


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (for shapes pyjwt would refuse to produce)."""
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)))


class Trap:
    """Records every request; nothing should ever reach it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handler(request: web.Request) -> web.Response:
            self.hits.append(request.path)
            return web.json_response({"keys": []})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
