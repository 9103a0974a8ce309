"""``vvault-pep serve | check | explain | probe`` — the four commands.

``serve`` loads the config (exit 2 on a bad one, before listening), starts the
runtime and runs until SIGINT/SIGTERM (``--workers N``: N processes sharing the
listener).  ``check`` loads the config and reports, one line per dependency,
whether OPA answers, each route's decision path is defined and each upstream
accepts connections; exit 1 on any problem (``--offline``: the config alone;
``--strict``: also fail on a departure from the secure defaults).  ``explain``
runs the pipeline's own stages for one described request and prints the input,
the decision, the cache key and the answer (:mod:`.explain`).  ``probe`` exits 0
when a loopback URL answers 200, for container health checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sys
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from .. import __version__
from ..config.loader import load_config
from ..config.models import Config
from ..decide.pdp import PdpClient
from ..edge.opa_supervisor import OpaSupervisor
from ..errors import ConfigError, PepError
from ..observe.audit import configure_logging
from .runtime import PepRuntime


def http_parser_problem() -> str | None:
    """Why this installation would parse HTTP with aiohttp's pure-Python parser, or None.

    The two parsers disagree on hostile input (lower-case methods, unclosed quotes in
    chunk extensions): a PEP in front of an upstream must parse one way, the C (llhttp) way.
    """
    from aiohttp import http_parser

    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        why = (
            "AIOHTTP_NO_EXTENSIONS is set" if os.environ.get("AIOHTTP_NO_EXTENSIONS") else "its C extension is missing"
        )
        return (
            f"aiohttp's C HTTP parser is not in use ({why}); "
            "reinstall aiohttp with its extension or pass --allow-python-http-parser (development only)"
        )
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "…"


def _read_arg(path: Path | None, what: str, *, pem: str | None = None) -> bytes | None:
    """A CLI file argument's bytes; SystemExit(2) with one line naming the file."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SystemExit(_fail_arg(f"{what} {path}: cannot read: {exc.strerror}")) from None
    if pem is not None and f"-----BEGIN {pem}-----".encode() not in data:
        raise SystemExit(_fail_arg(f"{what} {path}: not a PEM {pem.lower()}"))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise SystemExit(_fail_arg(f"{what} {path}: not UTF-8 text")) from None
    return data


def _fail_arg(line: str) -> int:
    print(f"vvault-pep: {line}", file=sys.stderr)
    return 2


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on every platform)
        return asyncio.run(main)
    return uvloop.run(main)


def _tune_gc() -> None:
    """Fewer, cheaper collections on a long-running server.

    Everything loaded at start (config, keys, routes, modules) is moved out of the
    collector's sight with ``gc.freeze``, and the young generation is collected every
    20,000 allocations instead of 700: a request allocates a few hundred objects that
    almost all die by reference counting, so frequent young collections cost CPU
    (several % under load) and find little.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _serve(config: Config, worker: int = 0, workers: int = 1) -> int:
    runtime = PepRuntime(config, worker=worker, workers=workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.start()
    except (OSError, RuntimeError, ValueError) as exc:
        # Port in use, unresolvable host, unreadable key, OPA that never came up: one line.
        print(f"vvault-pep: cannot start: {_one_line(exc)}", file=sys.stderr)
        await runtime.stop()
        return 1
    _tune_gc()
    if config.risk.enabled and config.redis is None:
        os.write(2, b"vvault-pep: warning: risk is on without Redis: risk is never available, and the shipped "
                 b"policy treats writes, rotations and the control plane as read-only\n")  # fmt: skip
    # One write(2) per line: workers share stderr, and tools read it line by line.
    os.write(
        2,
        (
            f"vvault-pep {__version__}: mTLS on {config.listener.host}:{runtime.port}, "
            f"admin on {config.admin.host}:{runtime.admin_port}"
            + (f" (worker {worker + 1}/{workers})" if workers > 1 else "")
            + "\n"
        ).encode(),
    )
    await stop.wait()
    # Drain: /readyz turns 503 at once, requests are still served for drain_s,
    # then the listeners close and in-flight requests finish.
    runtime.draining = True
    await asyncio.sleep(config.listener.drain_s)
    await runtime.stop()
    return 0


def _serve_workers(config: Config, workers: int, log_level: str) -> int:
    """``serve --workers N``: N processes, one event loop each, sharing the listener.

    The kernel spreads new connections over the workers (SO_REUSEPORT).  This process
    only supervises: SIGTERM/SIGINT are passed on (each worker drains as a single one
    would), and a worker that dies takes the others down with a non-zero exit, so the
    orchestrator restarts the whole PEP rather than running it short of a worker.
    """
    if config.opa.managed:
        print("vvault-pep: --workers > 1 needs an OPA sidecar (opa.managed: false)", file=sys.stderr)
        return 2
    if config.listener.port == 0:
        print("vvault-pep: --workers > 1 needs a fixed listener.port", file=sys.stderr)
        return 2
    if config.redis is None:
        # Quarantines, revocations, cache invalidations and rate limits reach the other
        # workers through Redis: without it an admin call would hold on one worker only.
        print(
            "vvault-pep: --workers > 1 needs redis (what one worker is told, the others learn there)", file=sys.stderr
        )
        return 2
    children: dict[int, int] = {}
    supervisor = os.getpid()
    for k in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _die_with_parent(supervisor)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                configure_logging(log_level)
                code = _run(_serve(config, worker=k, workers=workers))
            except BaseException:
                traceback.print_exc()  # os._exit below would swallow it
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = k
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        pid, wait_status = os.wait()
        k = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            print(f"vvault-pep: worker {k + 1} exited ({code}): stopping the others", file=sys.stderr, flush=True)
            status = 1
            stop(signal.SIGTERM, None)
        elif code != 0:
            status = 1
    return status


def _die_with_parent(supervisor: int) -> None:
    """Linux: a worker gets SIGTERM when the supervisor dies, so no orphan keeps the port."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the line above took effect
        raise SystemExit(1)


def _hardening(config: Config, *, strict: bool) -> int:
    """Print the hardening report; the number of findings that fail the check (all of them with --strict)."""
    from .hardening import findings

    found = findings(config)
    for finding in found:
        print(f"{'FAIL' if strict else 'warn'}  hardening: {finding.line()}")
    if not found:
        print("ok    hardening: every secure default holds")
    return len(found) if strict else 0


async def _check(config: Config, *, strict: bool = False) -> int:
    problems = 0

    def line(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}")

    line(True, "config", f"{config.source} is valid ({len(config.routes)} routes)")
    problems += _hardening(config, strict=strict)
    supervisor: OpaSupervisor | None = None
    if config.opa.managed:
        supervisor = OpaSupervisor(config.opa)
        pdp = PdpClient(config.opa, url=supervisor.url)
        supervisor.client = pdp
    else:
        pdp = PdpClient(config.opa)
    try:
        if supervisor is not None:
            try:
                await supervisor.start()
                line(True, "opa", f"managed OPA started from {config.opa.binary} with {config.opa.policy_dir}")
            except (OSError, RuntimeError) as exc:
                line(False, "opa", f"managed OPA failed to start: {exc}")
        if supervisor is not None:
            healthy = await supervisor.healthy(timeout_s=2)
            who = f"the managed OPA (pid {supervisor.pid}) on {supervisor.url}"
        else:
            healthy = await pdp.healthy(timeout_s=2)
            who = f"{pdp.url} (an OPA this PEP does not manage)"
        line(healthy, "opa", f"{who} {'answers /health' if healthy else 'is not reachable'}")
        paths = sorted({r.policy for r in config.routes})
        if healthy:
            try:
                defined = await pdp.defined_paths(paths)
                for path in paths:
                    line(
                        defined[path],
                        "policy",
                        f"data.{path.replace('/', '.')} {'is defined' if defined[path] else 'is NOT defined in OPA'}",
                    )
            except PepError as err:
                line(False, "policy", f"cannot list OPA policies ({err.code})")
        if config.redis is not None:
            from ..shared.state import SharedState

            shared = SharedState(config.redis)
            pong = await shared.call(lambda c: c.ping(), deadline_s=2.0)
            info = await shared.call(lambda c: c.info("server"), deadline_s=2.0) if pong is not None else None
            await shared.close()
            line(
                pong is not None,
                "redis",
                f"{config.redis.mode} {'answers PING' if pong is not None else 'is not reachable'}",
            )
            version = _oldest_redis(info)
            if version is not None:
                # L2 entries are written with SET … PXAT: an older server refuses every write.
                line(
                    version >= (6, 2),
                    "redis",
                    f"version {'.'.join(map(str, version))}"
                    + ("" if version >= (6, 2) else ": 6.2 or later is needed (L2 writes use SET … PXAT)"),
                )
        for name, up in config.upstreams.items():
            parts = urlsplit(up.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                async with asyncio.timeout(up.connect_timeout_s):
                    _, writer = await asyncio.open_connection(parts.hostname, port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                line(True, "upstream", f"{name} ({up.url}) accepts connections")
            except (OSError, TimeoutError) as exc:
                line(False, "upstream", f"{name} ({up.url}) is not reachable: {type(exc).__name__}")
    finally:
        await pdp.close()
        if supervisor is not None:
            await supervisor.stop()
    return 1 if problems else 0


def _probe(url: str) -> int:
    import urllib.request

    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        print("vvault-pep probe: only loopback URLs", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback only, checked above
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vvault-pep", description="zero-trust policy enforcement point")
    parser.add_argument("--version", action="version", version=f"vvault-pep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the PEP"), ("check", "validate the config and probe its dependencies")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", required=True, help="YAML config file")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == "serve":
            p.add_argument(
                "--workers", type=int, default=1, metavar="N",
                help="N processes sharing the listener (SO_REUSEPORT), one event loop each; "
                "worker k serves admin on admin.port + k",
            )  # fmt: skip
            p.add_argument(
                "--allow-python-http-parser", action="store_true",
                help="development only: serve although aiohttp's C HTTP parser is not in use",
            )  # fmt: skip
        if name == "check":
            p.add_argument("--offline", action="store_true", help="validate the config only: no files, no dependencies")
            p.add_argument("--strict", action="store_true", help="fail on any departure from the secure defaults")
    ex = sub.add_parser("explain", help="show the input, decision and reasons for one described request")
    ex.add_argument("--config", "-c", required=True, help="YAML config file")
    ex.add_argument("--method", default="GET")
    ex.add_argument("--path", required=True, help="request target as sent, e.g. /v1/tenants/acme/secrets/db")
    ex.add_argument("--host", default="localhost")
    ex.add_argument("--token", type=Path, help="file holding the bearer token")
    ex.add_argument("--cert", type=Path, help="client certificate (PEM)")
    ex.add_argument("--posture", type=Path, help="file holding the device posture assertion")
    probe = sub.add_parser("probe", help="exit 0 if URL answers 200 (container health checks)")
    probe.add_argument("url", nargs="?", default="http://127.0.0.1:9901/readyz")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return _probe(args.url)
    offline = bool(getattr(args, "offline", False))
    try:
        config = load_config(args.config, offline=offline)
    except ConfigError as exc:
        print(f"vvault-pep: invalid config:\n{exc}", file=sys.stderr)
        return 2
    if offline:
        print(
            f"ok    config: {config.source} is valid ({len(config.routes)} routes; files and dependencies not checked)"
        )
        return 1 if _hardening(config, strict=bool(args.strict)) else 0
    if args.command == "serve":
        problem = http_parser_problem()
        if problem is not None and not args.allow_python_http_parser:
            print(f"vvault-pep: cannot start: {problem}", file=sys.stderr)
            return 1
        if args.workers < 1:
            print("vvault-pep: --workers must be at least 1", file=sys.stderr)
            return 2
        if args.workers > 1:
            return _serve_workers(config, args.workers, args.log_level)
        configure_logging(args.log_level)
        return _run(_serve(config))
    if args.command == "explain":
        return _run(_explain(config, args))
    return _run(_check(config, strict=bool(args.strict)))


async def _explain(config: Config, args: argparse.Namespace) -> int:
    from .explain import explain

    token = _read_arg(args.token, "--token")
    cert = _read_arg(args.cert, "--cert", pem="CERTIFICATE")
    posture = _read_arg(args.posture, "--posture")
    try:
        out = await explain(
            config,
            method=args.method.upper(),
            path=args.path,
            host=args.host,
            token=token.decode() if token is not None else None,
            cert_pem=cert,
            posture=posture.decode() if posture is not None else None,
        )
    except ValueError as exc:  # a certificate that does not parse, for one
        print(f"vvault-pep: cannot explain: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _oldest_redis(info: Any) -> tuple[int, ...] | None:
    """The lowest ``redis_version`` in an ``INFO server`` answer (a Cluster's: one per node)."""
    answers = [info] if isinstance(info, dict) and "redis_version" in info else []
    if isinstance(info, dict) and not answers:
        answers = [v for v in info.values() if isinstance(v, dict) and "redis_version" in v]
    versions = []
    for answer in answers:
        try:
            versions.append(tuple(int(part) for part in str(answer["redis_version"]).split(".")[:2]))
        except ValueError:
            continue
    return min(versions) if versions else None
