"""PDP client: ask OPA over its REST API, with a hard deadline, never retrying.

``POST /v1/data/<decision path>`` with ``{"input": …}`` over TCP or a Unix
socket (``unix:///run/opa/opa.sock``), through one keep-alive pool.  Every
call runs under the configured deadline (default 250 ms).  Faults map to
stable codes at this one boundary:

* refused / reset / DNS → ``pdp.unavailable`` (503)
* past the deadline → ``pdp.timeout`` (503)
* an answered error (non-200, unparsable body) → ``pdp.error`` (503); an
  answered error is not retried — OPA said no, asking again changes nothing
  and would spend the request's deadline.

The decision POST, the one call on the request path, goes over the lean
keep-alive client of the upstream forward (``net/http1.py``: the
answer parsed by llhttp), at most ``opa.max_connections`` at once; aiohttp's
client costs about three times its CPU per call.  A reused connection that
proves dead before any byte of the answer is replaced once (a decision
changes nothing in OPA); nothing else is retried.  The control-plane calls
(revision, data, policies, health) keep aiohttp's client.

opa-python-client was weighed and not used: its async client has no Unix
socket transport, retries 502/503/504 with sleeps inside the caller's time,
and parses with the stdlib ``json``.  The PEP needs one POST; this is it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..config.models import Opa
from ..errors import PepError
from ..net.bounded import TooLarge, read_bounded, read_upto
from ..net.http1 import Pool, UpstreamError, UpstreamTimeout

log = logging.getLogger("vvault_pep.pdp")
_WAITING = {
    "slot": "waiting for a free connection (opa.max_connections in flight)",
    "connecting": "connecting to OPA",
    "sent": "waiting for OPA's answer to the decision request",
    "body": "reading OPA's answer",
}

# A decision document larger than this is not a decision: refused, never buffered further.
# The same bound holds for every control-plane answer but one: whatever answers on OPA's
# socket or port (OPA, or a process that took its place) is never read past a limit.
ANSWER_LIMIT = 16 * 1024 * 1024
# The module listing carries every module's AST (475 of the shipped library's 483 KB); past
# this, neither the module revision nor readiness's policy check can be had from it.
LISTING_LIMIT = 64 * 1024 * 1024
# Of the answer to a write (PUT, DELETE) only the status is used; no more of its body is read.
_WRITE_ANSWER_READ = 64 * 1024
_WRITE_ANSWER_WAIT_S = 0.5
# The lean pool's own connect and read guards; the call's deadline rules well before them.
_GUARD_S = 60.0


@dataclass(frozen=True, slots=True)
class Answer:
    defined: bool
    result: Any
    opa_decision_id: str | None
    bundles: str | None = None  # canonical JSON of {bundle: revision}, when asked for provenance


@contextlib.asynccontextmanager
async def _asked(timeout_s: float) -> AsyncIterator[None]:
    """A control-plane call to OPA under its deadline; every failure is a PepError(pdp.*)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        raise PepError("pdp.timeout", "OPA did not answer in time") from exc
    except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
        raise PepError("pdp.unavailable", f"OPA unreachable: {type(exc).__name__}") from exc


async def _body(resp: aiohttp.ClientResponse, what: str, limit: int = ANSWER_LIMIT) -> bytes:
    """The whole answer, or PepError(pdp.error) once it is past ``limit`` bytes."""
    try:
        return await read_bounded(resp, limit)
    except TooLarge as exc:
        raise PepError("pdp.error", f"{what}: {exc}") from exc


class PdpClient:
    def __init__(self, opa: Opa, *, url: str | None = None) -> None:
        self._opa = opa
        self._deadline = opa.timeout_ms / 1000
        self.revision_checks = 0
        self.module_downloads = 0  # GET /v1/policies made for the revision (every module's source)
        self.url = url or opa.url  # a managed OPA's own socket overrides opa.url
        parts = urlsplit(self.url)
        connector: aiohttp.BaseConnector
        self._unix: str | None = None
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "unix":
            connector = aiohttp.UnixConnector(path=parts.path, limit=opa.max_connections, keepalive_timeout=30)
            self._base = "http://opa"
            self._unix = parts.path
        else:
            tls: ssl.SSLContext | bool = True
            if parts.scheme == "https":
                tls = self._tls = ssl.create_default_context(cafile=str(opa.ca_file) if opa.ca_file else None)
            connector = aiohttp.TCPConnector(limit=opa.max_connections, keepalive_timeout=30, ttl_dns_cache=60, ssl=tls)
            self._base = self.url
        # OPA's --authentication=token: the token on every call, never in a log line.
        auth = {"Authorization": f"Bearer {opa.token}"} if opa.token else None
        self._decide_headers = [("Content-Type", "application/json"), *(auth or {}).items()]
        self._lean: Pool | None = None  # made on the first decision, inside the running loop
        self._slots = asyncio.Semaphore(opa.max_connections)
        self.timeouts: dict[str, int] = {}  # decisions past their deadline, by where they waited
        self._timeout_logged = float("-inf")
        self._timeouts_unlogged = 0
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),  # the deadline below rules
            auto_decompress=False,
            # Nothing compressed is asked for: OPA gzips a /v1/data answer over 1 KiB when the
            # request accepts it, and the body is read as it arrives.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            headers=auth,
        )

    @property
    def deadline_s(self) -> float:
        return self._deadline

    async def decide(
        self,
        path: str,
        policy_input: dict[str, Any],
        *,
        deadline_s: float | None = None,
        provenance: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Ask OPA for ``path`` with this input; ``headers`` (a trace's) go with the POST."""
        body = orjson.dumps({"input": policy_input})
        target = f"/v1/data/{path}" + ("?provenance=true" if provenance else "")
        sent = self._decide_headers if not headers else [*self._decide_headers, *headers.items()]
        # Where a decision past its deadline was waiting, for the log line (_WAITING).
        phase = ["slot"]
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(deadline_s if deadline_s is not None else self._deadline):
                async with self._slots:
                    phase[0] = "connecting"
                    resp = await self._pool().request(
                        "POST", target, sent, body, replay=True, note=lambda now: phase.__setitem__(0, now)
                    )
                    phase[0] = "body"
                    try:
                        raw = await resp.read(ANSWER_LIMIT)
                    finally:
                        resp.release()
                    status = resp.status
        except (TimeoutError, UpstreamTimeout) as exc:
            self._timed_out(phase[0], asyncio.get_running_loop().time() - started)
            raise PepError("pdp.timeout", "the policy decision point did not answer in time") from exc
        except (UpstreamError, OSError) as exc:
            log.warning("OPA unreachable: %s (%s)", type(exc).__name__, exc)
            raise PepError("pdp.unavailable", "the policy decision point is unreachable") from exc
        if status != 200:
            log.warning("OPA answered %s: %s", status, _opa_error_code(raw))
            raise PepError("pdp.error", "the policy decision point answered with an error")
        if len(raw) > ANSWER_LIMIT:
            log.warning("OPA answered more than %d bytes", ANSWER_LIMIT)
            raise PepError("pdp.error", "the policy decision point answered garbage")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PepError("pdp.error", "the policy decision point answered garbage") from exc
        if not isinstance(doc, dict):
            raise PepError("pdp.error", "the policy decision point answered garbage")
        decision_id = doc.get("decision_id")
        return Answer(
            "result" in doc,
            doc.get("result"),
            decision_id if isinstance(decision_id, str) else None,
            _bundle_revisions(doc) if provenance else None,
        )

    def _timed_out(self, phase: str, waited_s: float) -> None:
        """One log line per second at most for decisions past their deadline, saying where
        they were waiting (a full pool of connections, a connect, OPA's answer)."""
        self.timeouts[phase] = self.timeouts.get(phase, 0) + 1
        now = asyncio.get_running_loop().time()
        if now - self._timeout_logged < 1.0:
            self._timeouts_unlogged += 1
            return
        more = f" ({self._timeouts_unlogged} more since the last line)" if self._timeouts_unlogged else ""
        self._timeout_logged, self._timeouts_unlogged = now, 0
        log.warning("OPA did not answer in time: %.0f ms %s%s", waited_s * 1000, _WAITING[phase], more)

    def _pool(self) -> Pool:
        if self._lean is None:
            self._lean = Pool(
                self._base,
                ssl_context=self._tls,
                server_hostname=None,
                connect_timeout=_GUARD_S,
                read_timeout=_GUARD_S,
                unix_path=self._unix,
            )
        return self._lean

    async def revision(self, timeout_s: float = 2.0, *, modules: bool = True) -> str | None:
        """What identifies the policy OPA runs: bundle revisions, else a hash of its modules.

        The bundle revisions come with a one-line probe.  The module hash needs every
        module's source (``GET /v1/policies``): with ``modules=False`` it is not fetched and
        None means "no bundles; modules not checked".  Raises PepError(pdp.*) when OPA
        cannot be asked.
        """
        self.revision_checks += 1
        async with _asked(timeout_s):
            async with self._session.post(
                f"{self._base}/v1/data/vvault_pep/revision_probe?provenance=true", data=b"{}"
            ) as resp:
                bundles = _bundle_revisions(orjson.loads(await _body(resp, "the revision probe")))
            if bundles != "{}":
                return "b:" + bundles
            if not modules:
                return None
            self.module_downloads += 1
            async with self._session.get(f"{self._base}/v1/policies") as resp:
                if resp.status != 200:
                    raise PepError("pdp.error", f"GET /v1/policies answered {resp.status}")
                listing = await _body(resp, "GET /v1/policies", LISTING_LIMIT)
        from .modules import sources  # only here: with bundles the modules are never listed

        return "p:" + hashlib.sha256(orjson.dumps(sources(listing))).hexdigest()[:32]

    async def version(self, timeout_s: float = 1.0) -> str | None:
        """OPA's version, as its provenance reports it; None when OPA cannot be asked."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.post(
                    f"{self._base}/v1/data/vvault_pep/revision_probe?provenance=true", data=b"{}"
                ) as resp:
                    doc = orjson.loads(await _body(resp, "the revision probe"))
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError, PepError):
            return None
        prov = doc.get("provenance") if isinstance(doc, dict) else None
        version = prov.get("version") if isinstance(prov, dict) else None
        return version if isinstance(version, str) else None

    async def put_policy(self, policy_id: str, rego: bytes) -> int:
        """PUT a Rego module into OPA; returns OPA's HTTP status (400 on a compile error)."""
        return await self._put(f"/v1/policies/{policy_id}", rego, "text/plain")

    async def put_data(self, path: str, body: bytes) -> int:
        """PUT a JSON document into OPA's data; returns OPA's HTTP status."""
        return await self._put(f"/v1/data/{path}", body, "application/json")

    async def instance_id(self) -> str | None:
        """A name for the OPA process behind this client, shared by every PEP that uses it.

        Stored in OPA's own data (``data.vvault_pep.instance``) on first use, so PEPs sharing
        one OPA agree on it and PEPs with their own sidecars do not.  None when OPA cannot be
        written to (bundle mode: every document is the bundle's).
        """
        import uuid

        path = "/v1/data/vvault_pep/instance"
        try:
            async with asyncio.timeout(2.0):
                for attempt in range(2):
                    async with self._session.get(self._base + path) as resp:
                        doc = orjson.loads(await _body(resp, f"GET {path}"))
                    if isinstance(doc, dict) and isinstance(doc.get("result"), str):
                        return str(doc["result"])
                    if attempt == 0:
                        status = await self._put(path, orjson.dumps(uuid.uuid4().hex), "application/json")
                        if status not in (200, 204):
                            return None
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError, PepError):
            return None
        return None

    async def get_data(self, path: str, timeout_s: float = 2.0) -> Any:
        """A document of OPA's data (None when undefined); PepError(pdp.*) when OPA cannot be asked."""
        async with _asked(timeout_s):
            async with self._session.get(f"{self._base}/v1/data/{path}") as resp:
                doc = orjson.loads(await _body(resp, f"GET /v1/data/{path}"))
        return doc.get("result") if isinstance(doc, dict) else None

    async def delete_data(self, path: str) -> int:
        """DELETE a document from OPA's data; returns OPA's HTTP status (404 if absent)."""
        return await self._put(f"/v1/data/{path}", b"", "application/json", method="DELETE")

    async def _put(self, path: str, body: bytes, content_type: str, timeout_s: float = 5.0, method: str = "PUT") -> int:
        async with _asked(timeout_s):
            async with self._session.request(
                method, self._base + path, data=body or None, headers={"Content-Type": content_type}
            ) as resp:
                # Only the status matters, and OPA may have applied the write already: the
                # answer's body is never a reason to report it failed.
                declared = resp.content_length
                if declared is None or declared <= _WRITE_ANSWER_READ:
                    # a little, briefly: an answer cut short or slow is the connection's
                    # loss (not reused), never the write's
                    with contextlib.suppress(aiohttp.ClientPayloadError, TimeoutError):
                        async with asyncio.timeout(_WRITE_ANSWER_WAIT_S):
                            await read_upto(resp.content, _WRITE_ANSWER_READ)
                return resp.status

    async def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.get(f"{self._base}/health") as resp:
                    await _body(resp, "GET /health")
                    return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError, PepError):
            return False

    async def defined_paths(self, paths: list[str], timeout_s: float = 2.0) -> dict[str, bool]:
        """Which decision paths name a rule, a package or a data document in OPA.

        Raises PepError(pdp.*) when OPA cannot be asked.
        """
        async with _asked(timeout_s):
            async with self._session.get(f"{self._base}/v1/policies") as resp:
                if resp.status != 200:
                    raise PepError("pdp.error", f"GET /v1/policies answered {resp.status}")
                raw = await _body(resp, "GET /v1/policies", LISTING_LIMIT)
            heads = _rule_paths(orjson.loads(raw))
            out: dict[str, bool] = {}
            for path in paths:
                want = tuple(path.split("/"))
                found = any(head[: len(want)] == want for head in heads)
                if not found:
                    # Could be a plain data document rather than a rule.
                    async with self._session.get(f"{self._base}/v1/data/{path}") as resp:
                        doc = orjson.loads(await _body(resp, f"GET /v1/data/{path}"))
                        found = resp.status == 200 and isinstance(doc, dict) and "result" in doc
                out[path] = found
            return out

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self._session.close()


def _bundle_revisions(doc: Any) -> str:
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    bundles = prov.get("bundles") if isinstance(prov, dict) else None
    revs = {}
    if isinstance(bundles, dict):
        for name, info in bundles.items():
            revs[str(name)] = str(info.get("revision", "")) if isinstance(info, dict) else ""
    return orjson.dumps(revs, option=orjson.OPT_SORT_KEYS).decode()


def _rule_paths(doc: Any) -> set[tuple[str, ...]]:
    """Full paths (package + rule head ref) of every rule OPA has loaded."""
    heads: set[tuple[str, ...]] = set()
    for module in doc.get("result", []) if isinstance(doc, dict) else []:
        ast = module.get("ast", {})
        package = tuple(
            str(term.get("value"))
            for term in ast.get("package", {}).get("path", [])[1:]  # drop "data"
        )
        for rule in ast.get("rules", []):
            head = rule.get("head", {})
            ref = head.get("ref") or ([{"type": "var", "value": head["name"]}] if "name" in head else [])
            parts: list[str] = []
            for i, term in enumerate(ref):
                if term.get("type") != ("var" if i == 0 else "string"):
                    break  # a variable key (partial set/object): stop at the fixed prefix
                parts.append(str(term.get("value")))
            heads.add(package + tuple(parts))
    return heads


def _opa_error_code(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "unparsable body"
    return str(doc.get("code", "no code")) if isinstance(doc, dict) else "unexpected body"
