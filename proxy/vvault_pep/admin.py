"""Admin API on the admin listener: cache invalidation and OPA data pushes.

Who may call it: with ``admin.tls`` and ``admin.policy``, a client certificate
from the admin CA bundle, authorised per action by OPA at ``admin.policy``
(input: ``admin.action``, ``admin.method``, ``admin.path``,
``tls.client_cert``); otherwise ``Authorization: Bearer <admin.token>``
(compared in constant time).  With neither configured the API is off (404).
Every call, allowed or refused, is audited with who made it.

* ``POST /admin/cache/invalidate`` ``{"scope": "subject"|"tenant"|"token"|"device", "value": "…"}``
  bumps the scope's epoch: its cached decisions die on every replica.
* ``PUT /admin/opa/data/{path}`` with a JSON body writes OPA's data document
  and bumps the shared revision: every cached decision is re-asked.
* ``PUT /admin/opa/policies/{id}`` with Rego text: the same for a policy module.
* ``GET /admin/cache`` — counters per layer.

The OPA pushes can rewrite every rule and grant, so they are authorised with
their bodies (the policy sees ``admin.body`` and ``admin.data_path``; the
shipped one wants the ``policy-admin`` role and a recent MFA sign-in, sent as
the admin's own bearer token), the limits of ``/admin/grants`` hold on a data
push that writes a grant (in this module too, whichever way the caller is
authenticated), and the audit record carries the SHA-256 of what was written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .audit import now_rfc3339
from .authn import Identity
from .enforce import interpret
from .errors import PepError
from .listener import PeerCertificate, parse_peer

if TYPE_CHECKING:
    from .runtime import PepRuntime

_DATA_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z0-9_-]+)*$")
MAX_BODY = 4 << 20


def _peer(request: web.Request) -> PeerCertificate | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        return parse_peer(der)
    except ValueError:
        return None


class AdminApi:
    def __init__(self, runtime: PepRuntime) -> None:
        self.runtime = runtime
        self.token = runtime.config.admin.token

    def install(self, app: web.Application) -> None:
        app.router.add_post("/admin/cache/invalidate", self._invalidate)
        app.router.add_put("/admin/opa/data/{path:.+}", self._put_data)
        app.router.add_put("/admin/opa/policies/{id:.+}", self._put_policy)
        app.router.add_get("/admin/cache", self._stats)
        app.router.add_get("/admin/quarantines", self._list_quarantines)
        app.router.add_post("/admin/quarantines", self._add_quarantine)
        app.router.add_delete("/admin/quarantines/{scope}/{value:.+}", self._lift_quarantine)
        app.router.add_post("/admin/revocations", self._revoke_token)
        app.router.add_post("/admin/grants", self._add_grant)
        app.router.add_delete("/admin/grants/{ticket}", self._remove_grant)

    async def _authorise(
        self, request: web.Request, action: str, body: Any = None, extra: dict[str, Any] | None = None
    ) -> str:
        """Who may do ``action`` (with this ``body``): an admin certificate the admin policy
        allows, or the token.  The policy sees the body, so it can limit *what* an admin may
        grant or quarantine, not only whether they may."""
        cfg = self.runtime.config.admin
        if cfg.policy is not None:
            peer = _peer(request)
            if peer is None or not peer.valid_at(dt.datetime.now(dt.UTC)):
                self._record(action, False, admin=None, code="admin.no_certificate")
                raise web.HTTPUnauthorized(text="a valid admin client certificate is required")
            now = dt.datetime.now(dt.UTC)
            doc = {
                "version": {"schema": "vvault-pep/admin-input/v1"},
                "admin": {
                    "action": action,
                    "method": request.method,
                    "path": request.path,
                    "body": body,
                    **(extra or {}),
                },
                "tls": {"client_cert": peer.as_input()},
                "identity": await self._admin_identity(request, action),
                "time": {"unix_ns": int(now.timestamp() * 1_000_000_000)},
            }
            assert self.runtime.pdp is not None
            try:
                answer = await self.runtime.pdp.decide(cfg.policy.strip("/"), doc)
            except PepError as err:
                self._record(action, False, admin=_admin_name(peer), code=err.code)
                raise web.HTTPServiceUnavailable(text=err.code) from err
            decision = interpret(answer.result, defined=answer.defined)
            who = _admin_name(peer)
            if not decision.allow:
                self._record(action, False, admin=who, code=decision.code)
                raise web.HTTPForbidden(text=decision.code)
            return who
        if self.token is None:
            raise web.HTTPNotFound()
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._record(action, False, admin=None, code="admin.bad_token", source_ip=request.remote)
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="vvault-pep-admin"'})
        return "token"

    async def _admin_identity(self, request: web.Request, action: str) -> dict[str, Any]:
        """The admin's own bearer token, verified like any other (for MFA and recency); else anonymous."""
        authn = self.runtime.authn
        header = request.headers.get("Authorization")
        if authn is None or header is None or not authn.cfg.issuers:
            return {"authenticated": False, "kind": "anonymous"}
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return {"authenticated": False, "kind": "anonymous"}
        try:
            user = await authn.verify(token.strip())
        except PepError as err:
            self._record(action, False, admin=None, code=err.code)
            raise web.HTTPUnauthorized(text=err.code) from err
        return Identity(user, None).as_input()

    def _record(self, action: str, ok: bool, **fields: Any) -> None:
        assert self.runtime.audit is not None
        self.runtime.audit.emit(
            {
                "timestamp": now_rfc3339(),
                "decision_id": str(uuid.uuid4()),
                "admin_action": action,
                "result": {"allow": ok},
                **fields,
            }
        )

    async def _json(self, request: web.Request) -> Any:
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise web.HTTPBadRequest(text="body is not JSON") from exc

    async def _invalidate(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        admin = await self._authorise(request, "cache.invalidate", doc)
        scope = doc.get("scope") if isinstance(doc, dict) else None
        value = doc.get("value") if isinstance(doc, dict) else None
        if not isinstance(scope, str) or not isinstance(value, str) or not value:
            raise web.HTTPBadRequest(text='expected {"scope": …, "value": …}')
        cache = self.runtime.cache
        assert cache is not None
        try:
            shared = await cache.invalidate(scope, value)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        self._record("cache.invalidate", True, admin=admin, scope=scope, value=value, shared=shared)
        # 200 with shared=false: done on this replica, Redis could not spread it.
        return web.json_response({"scope": scope, "value": value, "shared": shared})

    async def _put_data(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        if not _DATA_PATH.fullmatch(path):
            raise web.HTTPBadRequest(text="bad data path")
        doc = await self._json(request)
        admin = await self._authorise(request, "opa.data.put", doc, {"data_path": path})
        problem = grant_push_problem(path, doc, dt.datetime.now(dt.UTC))
        if problem is not None:
            self._record("opa.data.put", False, admin=admin, path=path, code="admin.grant_limits")
            raise web.HTTPBadRequest(text=problem)
        body = orjson.dumps(doc)
        pdp, cache = self.runtime.pdp, self.runtime.cache
        assert pdp is not None
        assert cache is not None
        try:
            status = await pdp.put_data(path, body)
        except PepError as err:
            self._record("opa.data.put", False, path=path, code=err.code)
            raise web.HTTPServiceUnavailable(text=err.code) from err
        if status not in (200, 204):
            self._record("opa.data.put", False, path=path, opa_status=status)
            raise web.HTTPBadGateway(text=f"OPA answered {status}")
        shared = await cache.bump_revision()
        self._record("opa.data.put", True, admin=admin, path=path, shared=shared, sha256=_sha256(body))
        return web.json_response({"path": path, "revision_shared": shared})

    async def _put_policy(self, request: web.Request) -> web.Response:
        policy_id = request.match_info["id"].strip("/")
        if not _DATA_PATH.fullmatch(policy_id):
            raise web.HTTPBadRequest(text="bad policy id")
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
        text = body.decode("utf-8", "replace")
        admin = await self._authorise(
            request, "opa.policy.put", text, {"policy_id": policy_id, "sha256": _sha256(body)}
        )
        pdp, cache = self.runtime.pdp, self.runtime.cache
        assert pdp is not None
        assert cache is not None
        try:
            status = await pdp.put_policy(policy_id, body)
        except PepError as err:
            self._record("opa.policy.put", False, policy_id=policy_id, code=err.code)
            raise web.HTTPServiceUnavailable(text=err.code) from err
        if status == 200:
            cache.forget_policy_paths()  # nobody analysed what the pushed module reads
        else:
            self._record("opa.policy.put", False, policy_id=policy_id, opa_status=status)
            # OPA's compile errors are the caller's to read; they carry no secrets.
            raise web.HTTPBadRequest(text=f"OPA refused the policy ({status})")
        shared = await cache.bump_revision()
        self._record("opa.policy.put", True, admin=admin, policy_id=policy_id, shared=shared, sha256=_sha256(body))
        return web.json_response({"id": policy_id, "revision_shared": shared})

    async def _list_quarantines(self, request: web.Request) -> web.Response:
        await self._authorise(request, "quarantine.list")
        assert self.runtime.containment is not None
        return web.json_response({"quarantines": await self.runtime.containment.list()})

    async def _add_quarantine(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        admin = await self._authorise(request, "quarantine.add", doc)
        from .containment import MAX_TTL_S

        if not isinstance(doc, dict):
            raise web.HTTPBadRequest(text='expected {"scope", "value", "ttl_s", "reason"}')
        scope, value = doc.get("scope"), doc.get("value")
        ttl, reason = doc.get("ttl_s", 900), doc.get("reason", "")
        if (
            not isinstance(value, str)
            or not value
            or not isinstance(reason, str)
            or isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not 0 < ttl <= MAX_TTL_S
        ):
            raise web.HTTPBadRequest(text='expected {"scope", "value", "ttl_s", "reason"}')
        assert self.runtime.containment is not None
        assert self.runtime.cache is not None
        try:
            q, shared = await self.runtime.containment.add(str(scope), value, float(ttl), reason[:256], by="admin")
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        await self.runtime.cache.invalidate(q.scope, q.value)
        self._record(
            "quarantine.add", True, admin=admin, scope=q.scope, value=q.value, reason=q.reason, ttl_s=ttl, shared=shared
        )
        return web.json_response({**q.doc(), "shared": shared}, status=201)

    async def _lift_quarantine(self, request: web.Request) -> web.Response:
        admin = await self._authorise(request, "quarantine.lift")
        scope, value = request.match_info["scope"], request.match_info["value"]
        from .containment import SCOPES

        if scope not in SCOPES:
            raise web.HTTPBadRequest(text=f"scope must be one of {', '.join(SCOPES)}")
        assert self.runtime.containment is not None
        shared = await self.runtime.containment.lift(scope, value)
        self._record("quarantine.lift", True, admin=admin, scope=scope, value=value, shared=shared)
        return web.json_response({"scope": scope, "value": value, "lifted": True, "shared": shared})

    async def _revoke_token(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        admin = await self._authorise(request, "token.revoke", doc)
        jti, exp = (doc.get("jti"), doc.get("exp")) if isinstance(doc, dict) else (None, None)
        if not isinstance(jti, str) or not jti or isinstance(exp, bool) or not isinstance(exp, int | float):
            raise web.HTTPBadRequest(text='expected {"jti": "...", "exp": <unix time>}')
        import time

        ttl = max(1.0, float(exp) - time.time() + 60)  # kept until the token could no longer be used
        assert self.runtime.containment is not None
        assert self.runtime.cache is not None
        q, shared = await self.runtime.containment.add("token", jti, min(ttl, 30 * 86_400), "revoked", by="admin")
        await self.runtime.cache.invalidate("token", jti)
        self._record("token.revoke", True, admin=admin, jti=jti, shared=shared)
        return web.json_response({**q.doc(), "shared": shared}, status=201)

    async def _add_grant(self, request: web.Request) -> web.Response:
        """JIT elevation: a role for a subject in a tenant until not_after (data.vvault.grants)."""
        doc = await self._json(request)
        admin = await self._authorise(request, "grant.add", doc)
        ticket = doc.get("ticket") if isinstance(doc, dict) else None
        problem = grant_problem(doc, ticket if isinstance(ticket, str) else "", dt.datetime.now(dt.UTC))
        if problem is not None:
            raise web.HTTPBadRequest(text=problem)
        grant = {f: doc[f] for f in GRANT_FIELDS}
        body = orjson.dumps(grant)
        await self._write_data(
            f"vvault/grants/{doc['ticket']}", body, "grant.add", admin, {**grant, "sha256": _sha256(body)}
        )
        return web.json_response(grant, status=201)

    async def _remove_grant(self, request: web.Request) -> web.Response:
        admin = await self._authorise(request, "grant.revoke")
        ticket = request.match_info["ticket"]
        if not _DATA_PATH.fullmatch(f"g/{ticket}"):
            raise web.HTTPBadRequest(text="bad ticket")
        await self._write_data(f"vvault/grants/{ticket}", b"", "grant.revoke", admin, {"ticket": ticket})
        return web.json_response({"ticket": ticket, "revoked": True})

    async def _write_data(self, path: str, body: bytes, action: str, admin: str, what: dict[str, Any]) -> None:
        pdp, cache = self.runtime.pdp, self.runtime.cache
        assert pdp is not None
        assert cache is not None
        try:
            status = await (pdp.put_data(path, body) if body else pdp.delete_data(path))
        except PepError as err:
            self._record(action, False, admin=admin, code=err.code, **what)
            raise web.HTTPServiceUnavailable(text=err.code) from err
        if status not in (200, 204, 404):
            self._record(action, False, admin=admin, opa_status=status, **what)
            raise web.HTTPBadGateway(text=f"OPA answered {status}")
        shared = await cache.bump_revision()  # decisions made without (or with) the grant are re-asked
        self._record(action, True, admin=admin, shared=shared, **what)

    async def _stats(self, request: web.Request) -> web.Response:
        await self._authorise(request, "cache.read")
        cache = self.runtime.cache
        assert cache is not None
        return web.json_response({"cache": cache.stats, "opa_revision": cache.opa_revision})


GRANT_FIELDS = ("subject", "issuer", "role", "tenant", "not_after", "ticket")
MAX_GRANT = dt.timedelta(hours=24)


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def grant_problem(doc: Any, ticket: str, now: dt.datetime) -> str | None:
    """Why ``doc`` is not a grant ``/admin/grants`` would write under ``ticket``; None if it is.

    The same limits hold on every channel that writes ``data.vvault.grants``: the grant
    endpoint and a data push to ``vvault/grants/<ticket>``.  Which roles may be granted is
    the admin policy's to say (it sees the body).
    """
    if not isinstance(doc, dict) or not all(isinstance(doc.get(f), str) and doc.get(f) for f in GRANT_FIELDS):
        return f"expected strings {', '.join(GRANT_FIELDS)}"
    if set(doc) - set(GRANT_FIELDS):
        return f"a grant holds only {', '.join(GRANT_FIELDS)}"
    if doc["ticket"] != ticket or not _DATA_PATH.fullmatch(f"g/{ticket}"):
        return "ticket may hold letters, digits, '-' and '_' only, and names the grant's path"
    try:
        until = dt.datetime.fromisoformat(doc["not_after"].replace("Z", "+00:00"))
    except ValueError:
        return "not_after must be RFC 3339, e.g. 2026-11-25T18:00:00Z"
    if until.tzinfo is None or not now < until <= now + MAX_GRANT:
        return "not_after must be in the future and at most 24 hours away"
    return None


def grant_push_problem(path: str, doc: Any, now: dt.datetime) -> str | None:
    """A data push that writes grants: one grant under its ticket, within the limits; never wholesale."""
    parts = path.split("/")
    if parts[:2] == ["vvault", "grants"] and len(parts) == 3:
        return grant_problem(doc, parts[2], now)
    if ["vvault", "grants"][: len(parts)] == parts or (parts[:2] == ["vvault", "grants"] and len(parts) > 3):
        return "grants are written one at a time, through /admin/grants or vvault/grants/<ticket>"
    return None


def _admin_name(peer: PeerCertificate) -> str:
    """The admin's name in the audit record: its SPIFFE ID, else its DN in its own namespace."""
    return peer.spiffe_id or f"x509:{peer.subject}"
