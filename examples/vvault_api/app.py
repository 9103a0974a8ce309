"""The example vvault API: what sits behind the PEP in the demo and the tests.

A small, in-memory stand-in for vvault — tenants, secrets (read, write,
delete, rotate), vector collections with a cosine-similarity query, blobs
(streamed, for big uploads) and an admin area.  It trusts whatever reaches it:
that is the point of putting the PEP in front.

Every request it receives is recorded in ``app[SEEN]`` (method, raw path,
headers, body size and SHA-256) so tests can check what the PEP forwarded.

Run it alone: ``python -m examples.vvault_api.app --port 8080``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Store:
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    collections: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    blobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    tenants: set[str] = field(default_factory=lambda: {"acme", "globex"})

    def __post_init__(self) -> None:
        now = time.time()
        for tenant in ("acme", "globex"):
            self.secrets[(tenant, "db-password")] = {"value": f"{tenant}-s3cr3t", "version": 1, "updated": now}


SEEN: web.AppKey[deque[dict[str, Any]]] = web.AppKey("seen", deque)
STORE: web.AppKey[Store] = web.AppKey("store", Store)


@web.middleware
async def record(request: web.Request, handler: Any) -> web.StreamResponse:
    entry: dict[str, Any] = {
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": [(k, v) for k, v in request.headers.items()],
    }
    request[_ENTRY] = entry
    request.app[SEEN].append(entry)
    return await handler(request)


_ENTRY: web.RequestKey[dict[str, Any]] = web.RequestKey("entry", dict)


async def _read_counted(request: web.Request) -> bytes:
    body = await request.read()
    request[_ENTRY].update(body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    return body


def _store(request: web.Request) -> Store:
    return request.app[STORE]


async def get_secret(request: web.Request) -> web.Response:
    key = (request.match_info["tenant"], request.match_info["path"])
    item = _store(request).secrets.get(key)
    if item is None:
        return web.json_response({"error": "not found"}, status=404)
    return web.json_response({"tenant": key[0], "path": key[1], **item})


async def put_secret(request: web.Request) -> web.Response:
    key = (request.match_info["tenant"], request.match_info["path"])
    body = await _read_counted(request)
    import json

    value = json.loads(body or b"{}").get("value", "")
    old = _store(request).secrets.get(key, {"version": 0})
    _store(request).secrets[key] = {"value": value, "version": old["version"] + 1, "updated": time.time()}
    return web.json_response({"tenant": key[0], "path": key[1], "version": old["version"] + 1}, status=201)


async def delete_secret(request: web.Request) -> web.Response:
    key = (request.match_info["tenant"], request.match_info["path"])
    _store(request).secrets.pop(key, None)
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    key = (request.match_info["tenant"], request.match_info["path"])
    old = _store(request).secrets.get(key, {"version": 0})
    _store(request).secrets[key] = {
        "value": secrets.token_urlsafe(24),
        "version": old["version"] + 1,
        "updated": time.time(),
    }
    return web.json_response({"tenant": key[0], "path": key[1], "version": old["version"] + 1})


async def list_collections(request: web.Request) -> web.Response:
    tenant = request.match_info["tenant"]
    names = sorted(c for (t, c) in _store(request).collections if t == tenant)
    return web.json_response({"tenant": tenant, "collections": names})


async def put_vectors(request: web.Request) -> web.Response:
    import json

    key = (request.match_info["tenant"], request.match_info["collection"])
    doc = json.loads(await _read_counted(request) or b"{}")
    coll = _store(request).collections.setdefault(key, {"vectors": {}})
    for item in doc.get("vectors", []):
        coll["vectors"][str(item["id"])] = {
            "vector": [float(x) for x in item["vector"]],
            "metadata": item.get("metadata", {}),
        }
    return web.json_response({"collection": key[1], "count": len(coll["vectors"])})


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


async def query_collection(request: web.Request) -> web.Response:
    import json

    key = (request.match_info["tenant"], request.match_info["collection"])
    doc = json.loads(await _read_counted(request) or b"{}")
    coll = _store(request).collections.get(key, {"vectors": {}})
    query = [float(x) for x in doc.get("vector", [])]
    scored = sorted(
        (
            {"id": vid, "score": _cosine(query, v["vector"]), "metadata": v["metadata"]}
            for vid, v in coll["vectors"].items()
        ),
        key=lambda r: -float(r["score"]),
    )
    return web.json_response({"collection": key[1], "matches": scored[: int(doc.get("top_k", 5))]})


async def put_blob(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        digest.update(chunk)
        size += len(chunk)
    key = (request.match_info["tenant"], request.match_info["name"])
    _store(request).blobs[key] = {"bytes": size, "sha256": digest.hexdigest()}
    request[_ENTRY].update(body_len=size, body_sha256=digest.hexdigest())
    return web.json_response({"name": key[1], "bytes": size, "sha256": digest.hexdigest()}, status=201)


async def get_blob_info(request: web.Request) -> web.Response:
    key = (request.match_info["tenant"], request.match_info["name"])
    info = _store(request).blobs.get(key)
    return web.json_response(info or {"error": "not found"}, status=200 if info else 404)


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    """GET /v1/tenants/{t}/stream/{n}: n bytes of zeros, streamed (for response tests)."""
    n = int(request.match_info["n"])
    resp = web.StreamResponse()
    resp.content_length = n
    await resp.prepare(request)
    chunk = b"\0" * 65536
    while n > 0:
        await resp.write(chunk[: min(n, len(chunk))])
        n -= min(n, len(chunk))
    return resp


async def admin_tenants(request: web.Request) -> web.Response:
    if request.method == "POST":
        import json

        name = json.loads(await _read_counted(request) or b"{}").get("name", "")
        _store(request).tenants.add(name)
    return web.json_response({"tenants": sorted(_store(request).tenants)})


def make_app() -> web.Application:
    app = web.Application(middlewares=[record], client_max_size=16 * 1024 * 1024)
    app[SEEN] = deque(maxlen=2000)
    app[STORE] = Store()
    t = "/v1/tenants/{tenant}"
    app.router.add_get(t + "/secrets/{path:.+}", get_secret)
    app.router.add_put(t + "/secrets/{path:.+}", put_secret)
    app.router.add_delete(t + "/secrets/{path:.+}", delete_secret)
    app.router.add_post(t + "/rotations/{path:.+}", rotate_secret)
    app.router.add_get(t + "/collections", list_collections)
    app.router.add_post(t + "/collections/{collection}/vectors", put_vectors)
    app.router.add_post(t + "/collections/{collection}/query", query_collection)
    app.router.add_put(t + "/blobs/{name}", put_blob)
    app.router.add_get(t + "/blobs/{name}", get_blob_info)
    app.router.add_get(t + "/stream/{n:[0-9]+}", stream_bytes)
    app.router.add_route("*", "/v1/admin/tenants", admin_tenants)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="example vvault API (trusts everything: keep it behind the PEP)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    # One line once the port is bound: `make demo` waits for it (it proves this process holds the port).
    banner = f"vvault example API: listening on {args.host}:{args.port}"
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=lambda _: print(banner, flush=True))


if __name__ == "__main__":
    main()
