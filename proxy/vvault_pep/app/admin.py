"""Admin API on the admin listener: cache invalidation and OPA data pushes.

Who may call it: with ``admin.tls`` and ``admin.policy``, a client certificate
from the admin CA bundle, authorised per action by OPA at ``admin.policy``
(input: ``admin.action``, ``admin.method``, ``admin.path``,
``tls.client_cert``); otherwise ``Authorization: Bearer <admin.token>``
(compared in constant time), which may not push OPA data or policies (403
``admin.push_needs_certificate``) unless ``admin.token_may_push``.  With
neither configured the API is off (404).
Every call, allowed or refused, is audited with who made it.

Order per call: who is calling (certificate or token) before a byte of the body
is read — no body is parsed for a caller who could not act at all; then the
body (JSON, at most 4 MiB); then the admin policy, which sees the body.  A
certificate the listener would refuse (a malformed SVID, expired) is a 403;
no certificate a 401.  Every refusal is ``application/problem+json`` with a
``code``; a malformed body from an authorised caller is a 400 naming the field.

* ``POST /admin/cache/invalidate`` ``{"scope": …, "value": "…"}`` (a scope of
  :data:`~vvault_pep.core.principal.SCOPES`) bumps the scope's epoch: its cached decisions die on every replica.
* ``PUT /admin/opa/data/{path}`` with a JSON body writes OPA's data document
  and bumps the shared revision: every cached decision is re-asked.
* ``PUT /admin/opa/policies/{id}`` with Rego text: the same for a policy module.
* ``GET /admin/cache`` — counters per layer.

The OPA pushes can rewrite every rule and grant, so they are authorised with
their bodies (the policy sees ``admin.body`` and ``admin.data_path``; the
shipped one wants the ``policy-admin`` role and a recent MFA sign-in, sent as
the admin's own bearer token bound to the admin certificate by RFC 8705
``cnf.x5t#S256``, so a stolen certificate and the thief's own MFA token are not
enough), the limits of ``/admin/grants`` hold on a data
push that writes a grant (in this module too, whichever way the caller is
authenticated), and the audit record carries the SHA-256 of what was written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import uuid
from contextvars import ContextVar
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import PayloadAccessError, RequestHandler, RequestPayloadError

from ..core.decision import interpret
from ..core.principal import Identity
from ..core.request import PeerCertificate, parse_peer
from ..edge.listener import GuardedHandler
from ..errors import PepError
from ..net.bounded import read_upto
from ..observe.sinks import now_rfc3339
from .services import Services, quarantine

_DATA_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z0-9_-]+)*$")
MAX_BODY = 4 << 20
_PUSHES = frozenset({"opa.data.put", "opa.policy.put"})


# The admin call being served (each request runs in its own task): what was asked, by whom,
# and whether its one audit record was written.
_CALL: ContextVar[dict[str, Any] | None] = ContextVar("admin_call", default=None)


class _NoPeer(Exception):
    def __init__(self, code: str) -> None:
        self.code = code


def _peer(request: web.Request, trust_domains: tuple[str, ...] = ()) -> PeerCertificate:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise _NoPeer("admin.no_certificate")
    try:
        peer = parse_peer(der, trust_domains=trust_domains)
    except ValueError as exc:  # CertificateRefused too: no usable admin identity
        raise _NoPeer("admin.certificate_refused") from exc
    if not peer.valid_at(dt.datetime.now(dt.UTC)):
        raise _NoPeer("admin.certificate_refused")
    return peer


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
    405: web.HTTPMethodNotAllowed, 408: web.HTTPRequestTimeout, 502: web.HTTPBadGateway,
    503: web.HTTPServiceUnavailable,
}  # fmt: skip


def _problem_body(status: int, code: str, detail: str) -> str:
    doc = {"type": "about:blank", "title": code, "status": status, "code": code, "detail": detail}
    return orjson.dumps(doc).decode()


def _problem(status: int, code: str, detail: str = "") -> web.HTTPException:
    """An admin refusal as RFC 9457 problem+json."""
    body = _problem_body(status, code, detail)
    if status == 413:
        return web.HTTPRequestEntityTooLarge(MAX_BODY, MAX_BODY + 1, text=body, content_type="application/problem+json")
    if status == 405:
        return web.HTTPMethodNotAllowed("", [], text=body, content_type="application/problem+json")
    return _ERRORS.get(status, web.HTTPInternalServerError)(text=body, content_type="application/problem+json")


_CODES = {
    400: "admin.bad_request", 401: "admin.unauthenticated", 403: "admin.forbidden", 404: "admin.not_found",
    405: "admin.method_not_allowed", 413: "admin.body_too_large",
}  # fmt: skip


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every admin error as problem+json (the handlers' plain-text 4xx/5xx included)."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/problem+json":
            raise
        code = _CODES.get(exc.status, "admin.error")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else ""
        problem = _problem(exc.status, code, detail or "")
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                problem.headers[name] = exc.headers[name]
        raise problem from None


def _field(doc: Any, name: str, kind: type, default: Any = None, *, empty: bool = False) -> Any:
    """``doc[name]`` of ``kind`` (str: non-empty unless ``empty``; float: a JSON number), or a 400 naming it."""
    if not isinstance(doc, dict):
        raise web.HTTPBadRequest(text="body: a JSON object is required")
    value = doc.get(name, default)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise web.HTTPBadRequest(text=f"{name}: a number is required")
        return float(value)
    if not isinstance(value, kind) or (kind is str and not value and not empty):
        raise web.HTTPBadRequest(text=f"{name}: a {'non-empty ' if kind is str else ''}{kind.__name__} is required")
    return value


class AdminApi:
    def __init__(self, runtime: Services) -> None:
        self.runtime = runtime
        self.token = runtime.config.admin.token

    def install(self, app: web.Application) -> None:
        app.middlewares.append(problems)
        app.middlewares.append(self._audited)
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

    def refused_by_parser(self, code: str, source_ip: str | None) -> None:
        """A request aiohttp's parser refused never reaches a handler: it still goes on record."""
        self._emit("unparsed request", False, {"admin": None, "code": code, "source_ip": source_ip})

    @web.middleware
    async def _audited(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Exactly one audit record per admin call: the handlers write theirs; any call that
        ended without one (a read, a 400 after authorisation, an unexpected error) gets it here."""
        if not request.path.startswith("/admin/"):
            return await handler(request)  # type: ignore[no-any-return]
        call: dict[str, Any] = {"action": None, "admin": None, "recorded": False}
        token = _CALL.set(call)
        status, code = 500, "admin.error"
        try:
            response: web.StreamResponse = await handler(request)
            status, code = response.status, ""
            return response
        except web.HTTPException as exc:
            status = exc.status
            code = _CODES.get(exc.status, "admin.error")
            if exc.content_type == "application/problem+json" and exc.text:
                code = orjson.loads(exc.text).get("code", code)
            raise
        finally:
            _CALL.reset(token)
            if not call["recorded"]:
                fields: dict[str, Any] = {"admin": call["admin"]}
                if status >= 400:
                    fields["code"] = code
                if call["admin"] is None:
                    fields["source_ip"] = request.remote
                self._emit(call["action"] or f"{request.method} {request.path}", status < 400, fields)

    async def _authorise(
        self, request: web.Request, action: str, *, read: str = "none", extra: dict[str, Any] | None = None
    ) -> tuple[str, Any]:
        """Who may do ``action``: an admin certificate the admin policy allows, or the token.

        The caller is identified before the body is read (``read``: ``none``, ``json``,
        or ``text`` for a Rego module); the policy then sees the body, so it can limit
        *what* an admin may grant, push or quarantine, not only whether they may.
        Returns (who, body): the parsed JSON, or the raw bytes for ``text``."""
        cfg = self.runtime.config.admin
        call = _CALL.get()
        if call is not None:
            call["action"] = action
        if cfg.policy is not None:
            try:
                peer = _peer(request, self.runtime.config.identity.workload.trust_domains)
            except _NoPeer as no:
                self._record(action, False, admin=None, code=no.code, source_ip=request.remote)
                status = 401 if no.code == "admin.no_certificate" else 403
                raise _problem(status, no.code, "a valid admin client certificate is required") from None
            who = _admin_name(peer)
            if call is not None:
                call["admin"] = who
            body, seen = await self._body(request, action, who, read)
            extra = {**(extra or {}), **({"sha256": _sha256(body)} if read == "text" else {})}
            now = dt.datetime.now(dt.UTC)
            doc = {
                "version": {"schema": "vvault-pep/admin-input/v1"},
                "admin": {
                    "action": action,
                    "method": request.method,
                    "path": request.path,
                    "body": seen,
                    **(extra or {}),
                },
                "tls": {"client_cert": peer.as_input()},
                "identity": await self._admin_identity(request, action, peer),
                "time": {"unix_ns": int(now.timestamp() * 1_000_000_000)},
            }
            assert self.runtime.pdp is not None
            try:
                answer = await self.runtime.pdp.decide(cfg.policy.strip("/"), doc)
            except PepError as err:
                self._record(action, False, admin=who, code=err.code)
                raise _problem(503, err.code) from err
            decision = interpret(answer.result, defined=answer.defined)
            if not decision.allow:
                self._record(action, False, admin=who, code=decision.code)
                raise _problem(403, decision.code)
            return who, body
        if self.token is None:
            raise web.HTTPNotFound()
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._record(action, False, admin=None, code="admin.bad_token", source_ip=request.remote)
            exc = _problem(401, "admin.bad_token")
            exc.headers["WWW-Authenticate"] = 'Bearer realm="vvault-pep-admin"'
            raise exc
        if call is not None:
            call["admin"] = "token"
        if action in _PUSHES and not cfg.token_may_push:
            # A push rewrites every rule: not on a shared secret that names nobody and has no MFA.
            self._record(action, False, admin="token", code="admin.push_needs_certificate")
            raise _problem(
                403, "admin.push_needs_certificate", "OPA pushes need an admin certificate (admin.tls, admin.policy)"
            )
        body, _ = await self._body(request, action, "token", read)
        return "token", body

    async def _admin_identity(self, request: web.Request, action: str, peer: PeerCertificate) -> dict[str, Any]:
        """The admin's own bearer token, verified like any other (for MFA and recency); else anonymous.

        ``cert_bound`` is true only for a token bound to this admin certificate (RFC 8705
        ``cnf.x5t#S256``); a token bound to another certificate is refused, as on a route."""
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
            raise _problem(401, err.code, "the admin's bearer token was refused") from err
        bound = user.cnf_x5t_s256 is not None and hmac.compare_digest(
            peer.x5t_s256.encode(), user.cnf_x5t_s256.encode()
        )
        if user.cnf_x5t_s256 is not None and not bound:
            self._record(action, False, admin=_admin_name(peer), code="authn.cert_binding_mismatch")
            raise _problem(401, "authn.cert_binding_mismatch", "the admin's token is bound to another certificate")
        return Identity(user, None, bound).as_input()

    def _record(self, action: str, ok: bool, **fields: Any) -> None:
        call = _CALL.get()
        if call is not None:
            if call["recorded"]:
                return  # one record per call: the first says what happened
            call["recorded"] = True
            if "admin" not in fields:
                fields["admin"] = call["admin"]  # who was authorised, on every record after that
        self._emit(action, ok, fields)

    def _emit(self, action: str, ok: bool, fields: dict[str, Any]) -> None:
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

    async def _whole(self, request: web.Request, action: str, who: str) -> bytes:
        """The whole body, at most MAX_BODY bytes, within the body deadline; else a refusal on record.

        A declared length past the limit is refused before a byte is read; a body cut short,
        badly framed or badly chunked is a 400, one that stalls past the deadline a 408.
        """
        declared = request.content_length
        raw = b""
        if declared is None or declared <= MAX_BODY:
            deadline = self.runtime.config.limits.body_deadline_s
            try:
                async with asyncio.timeout(deadline):
                    raw = await read_upto(request.content, MAX_BODY)
            except TimeoutError:
                self._record(action, False, admin=who, code="admin.body_timeout")
                raise _problem(408, "admin.body_timeout", f"the body took longer than {deadline:g} s") from None
            except (RequestPayloadError, PayloadAccessError, HttpProcessingError, ConnectionError, ValueError) as exc:
                self._record(action, False, admin=who, code="admin.bad_body")
                raise _problem(400, "admin.bad_body", "body: not received whole") from exc
        if (declared is not None and declared > MAX_BODY) or len(raw) > MAX_BODY:
            self._record(action, False, admin=who, code="admin.body_too_large")
            refused = _problem(413, "admin.body_too_large", f"at most {MAX_BODY} bytes")
            refused.force_close()  # the unread body is not waited for on this connection
            raise refused
        return raw

    async def _body(self, request: web.Request, action: str, who: str, read: str) -> tuple[Any, Any]:
        """(what the handler gets, what the admin policy sees) for ``read``: none, json or text."""
        if read == "none":
            return None, None
        if read == "json":
            doc = await self._json(request, action, who)
            return doc, doc
        raw = await self._whole(request, action, who)
        return raw, raw.decode("utf-8", "replace")

    async def _json(self, request: web.Request, action: str, who: str) -> Any:
        body = await self._whole(request, action, who)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self._record(action, False, admin=who, code="admin.bad_body")
            raise _problem(400, "admin.bad_body", "body: not JSON") from exc

    async def _invalidate(self, request: web.Request) -> web.Response:
        admin, doc = await self._authorise(request, "cache.invalidate", read="json")
        scope = _field(doc, "scope", str)
        value = _field(doc, "value", str)
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
            raise _problem(400, "admin.bad_body", "path: not a data path such as vvault/risk")
        admin, doc = await self._authorise(request, "opa.data.put", read="json", extra={"data_path": path})
        problem = grant_push_problem(path, doc, dt.datetime.now(dt.UTC))
        if problem is not None:
            self._record("opa.data.put", False, admin=admin, path=path, code="admin.grant_limits")
            raise _problem(400, "admin.grant_limits", problem)
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
            raise _problem(400, "admin.bad_body", "id: not a policy id such as vvault/extra")
        admin, body = await self._authorise(request, "opa.policy.put", read="text", extra={"policy_id": policy_id})
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
        admin, doc = await self._authorise(request, "quarantine.add", read="json")
        from ..core.decision import MAX_TTL_S

        scope, value = _field(doc, "scope", str), _field(doc, "value", str)
        ttl = _field(doc, "ttl_s", float, 900)
        reason = _field(doc, "reason", str, "", empty=True)
        if not 0 < ttl <= MAX_TTL_S:
            raise web.HTTPBadRequest(text=f"ttl_s: between 0 and {MAX_TTL_S} seconds")
        assert self.runtime.containment is not None
        assert self.runtime.cache is not None
        try:
            q, shared = await quarantine(
                self.runtime.containment, self.runtime.cache, str(scope), value, float(ttl), reason[:256], by="admin"
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        self._record(
            "quarantine.add", True, admin=admin, scope=q.scope, value=q.value, reason=q.reason, ttl_s=ttl, shared=shared
        )
        return web.json_response({**q.doc(), "shared": shared}, status=201)

    async def _lift_quarantine(self, request: web.Request) -> web.Response:
        admin, _ = await self._authorise(request, "quarantine.lift")
        scope, value = request.match_info["scope"], request.match_info["value"]
        from ..core.principal import SCOPES

        if scope not in SCOPES:
            raise web.HTTPBadRequest(text=f"scope must be one of {', '.join(SCOPES)}")
        assert self.runtime.containment is not None
        shared = await self.runtime.containment.lift(scope, value)
        self._record("quarantine.lift", True, admin=admin, scope=scope, value=value, shared=shared)
        return web.json_response({"scope": scope, "value": value, "lifted": True, "shared": shared})

    async def _revoke_token(self, request: web.Request) -> web.Response:
        admin, doc = await self._authorise(request, "token.revoke", read="json")
        jti, exp = _field(doc, "jti", str), _field(doc, "exp", float)
        import time

        ttl = max(1.0, float(exp) - time.time() + 60)  # kept until the token could no longer be used
        assert self.runtime.containment is not None
        assert self.runtime.cache is not None
        q, shared = await quarantine(
            self.runtime.containment, self.runtime.cache, "token", jti, min(ttl, 30 * 86_400), "revoked", by="admin"
        )
        self._record("token.revoke", True, admin=admin, jti=jti, shared=shared)
        return web.json_response({**q.doc(), "shared": shared}, status=201)

    async def _add_grant(self, request: web.Request) -> web.Response:
        """JIT elevation: a role for a subject in a tenant until not_after (data.vvault.grants)."""
        admin, doc = await self._authorise(request, "grant.add", read="json")
        ticket = doc.get("ticket") if isinstance(doc, dict) else None
        problem = grant_problem(doc, ticket if isinstance(ticket, str) else "", dt.datetime.now(dt.UTC))
        if problem is not None:
            raise _problem(400, "admin.bad_body", problem)
        grant = {f: doc[f] for f in GRANT_FIELDS}
        body = orjson.dumps(grant)
        await self._write_data(
            f"vvault/grants/{doc['ticket']}", body, "grant.add", admin, {**grant, "sha256": _sha256(body)}
        )
        return web.json_response(grant, status=201)

    async def _remove_grant(self, request: web.Request) -> web.Response:
        admin, _ = await self._authorise(request, "grant.revoke")
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


class AdminRunner(web.AppRunner):
    """aiohttp's AppRunner for the admin app, its connections handled by :class:`_AdminHandler`."""

    def __init__(self, app: web.Application, api: AdminApi, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._api = api

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _AdminServer(
            self._api,
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )


class _AdminServer(web.Server):
    def __init__(self, api: AdminApi, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api = api

    def __call__(self) -> RequestHandler:
        return _AdminHandler(self, loop=self._loop, **self._kwargs)


class _AdminHandler(GuardedHandler):
    """The admin listener's connection handler: a request its parser refuses (bad framing,
    bad chunking, oversized lines) is answered as problem+json and goes on record."""

    def refusal(self, status: int, exc: BaseException | None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            # Not the parser's: a handler that raised (500) or ran past aiohttp's timeout
            # (504). The call is on record already (the _audited middleware's own record).
            status = 504 if status == 504 else 500
            return self._answer(status, "admin.error", "the admin call failed")
        code = {400: "admin.bad_request", 413: "admin.body_too_large", 431: "admin.headers_too_large"}.get(status)
        if code is None:
            status, code = 400, "admin.bad_request"
        manager = self._manager
        if isinstance(manager, _AdminServer):
            manager.api.refused_by_parser(code, self.peer_ip())
        return self._answer(status, code, "the HTTP parser refused the request")

    @staticmethod
    def _answer(status: int, code: str, detail: str) -> web.StreamResponse:
        resp = web.Response(
            status=status, text=_problem_body(status, code, detail), content_type="application/problem+json"
        )
        resp.force_close()
        return resp
