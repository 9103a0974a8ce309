"""The reference for the benchmarks: a bare aiohttp reverse proxy doing nothing else.

Same TLS termination with client certificates, same keep-alive pool and streaming as the
PEP, no policy, no checks: the limit of this stack.  Never deploy it.

    python -m bench.passthrough --port 9443 --upstream http://127.0.0.1:8080 --pki DIR
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(args.pki / "server.pem"), str(args.pki / "server-key.pem"))
    ctx.load_verify_locations(cafile=str(args.pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    state: dict[str, aiohttp.ClientSession] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        session = state.get("s")
        if session is None:
            session = state["s"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = request.content.iter_chunked(65536) if request.can_read_body else None
        async with session.request(
            request.method, URL(args.upstream + request.raw_path, encoded=True), headers=headers, data=body
        ) as up:
            out = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    out.headers[k] = v
            await out.prepare(request)
            async for chunk in up.content.iter_chunked(65536):
                await out.write(chunk)
            await out.write_eof()
            return out

    async def run() -> None:
        server = web.Server(handler)
        runner = web.ServerRunner(server, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=ctx).start()
        print(f"passthrough on {args.port}", flush=True)
        import asyncio

        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        import asyncio

        asyncio.run(run())


if __name__ == "__main__":
    main()
