"""The benchmark's token issuer: one ES256 key, a JWKS file, signed tokens, OIDC discovery.

The PEP reads the key from a ``jwks_file``; the peer (oauth2-proxy) insists on OIDC
discovery, so :meth:`BenchIssuer.serve` answers ``/.well-known/openid-configuration`` and
the JWKS from a thread on loopback.  Both verify the very same tokens.

Claims are those the repo's policy allows for ``GET /v1/tenants/acme/secrets/db-password``:
a user of tenant ``acme`` with the ``reader`` role (a ``config``-class read), plus an
``email`` (oauth2-proxy builds its session from it).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import free_port

AUDIENCE = "vvault-api"
KID = "bench-es256"
SUBJECT = "bench-user"
TENANT = "acme"
LIFETIME_S = 4 * 3600


class BenchIssuer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._serial = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        # One expiry for every token: a token's exp is part of the PEP's decision-cache key,
        # as is its jti — only the jti tells two tokens apart.
        self._exp = int(time.time()) + LIFETIME_S

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": KID, "alg": "ES256", "use": "sig"}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, jti: str | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": SUBJECT,
            "tenant": TENANT,
            "roles": ["reader"],
            "email": "bench-user@example.com",
            "email_verified": True,
            "iat": now - 5,
            "exp": self._exp,
            "jti": jti or f"bench-{next(self._serial)}",
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": KID, "typ": "at+jwt"})

    def fresh_tokens(self, n: int) -> list[str]:
        """``n`` tokens never handed out before (distinct ``jti``)."""
        return [self.token() for _ in range(n)]

    def serve(self) -> None:
        """OIDC discovery and the JWKS on loopback, from a daemon thread."""
        discovery = json.dumps(
            {
                "issuer": self.url,
                "jwks_uri": f"{self.url}/jwks.json",
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "userinfo_endpoint": f"{self.url}/userinfo",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
            }
        ).encode()
        documents = {"/.well-known/openid-configuration": discovery, "/jwks.json": json.dumps(self.jwks()).encode()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = documents.get(self.path.split("?", 1)[0])
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="bench-issuer", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
