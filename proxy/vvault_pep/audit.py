"""Audit: one structured record per request, allowed or denied, on every sink.

A record is a plain dict handed to this runtime's audit logger (a child of
``vvault_pep.audit``) as ``extra={"audit": record}``; tests read
``LogRecord.audit`` instead of parsing text.  Each sink (stdout, a rotating
file, OTLP logs) sits behind its own bounded queue and its own thread:
putting a record on the queue never blocks, serialisation happens in the
sink's thread, and a full queue drops the record and counts it
(``vvault_pep_audit_dropped_total{sink}``).  A slow or stuck sink therefore
costs records, never request latency.

Field names follow OPA's decision-log format where the meaning is the same
(``decision_id``, ``path``, ``bundles``, ``input``, ``result``,
``timestamp``).  Redaction is built in (:func:`redact`): the record's
``redacted`` field lists which input paths were ``erased`` and which
``masked``.  The bearer token, the posture assertion and cookies never reach
a record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import logging.handlers
import queue
import sys
import threading
from typing import Any

import orjson

from .config import Audit as AuditConfig
from .config import AuditSink

_counter = itertools.count()

# Input paths erased from every record whatever the config says.
ALWAYS_ERASE = (
    "request.headers.authorization",
    "request.headers.cookie",
    "request.headers.set-cookie",
    "request.headers.proxy-authorization",
    "request.headers.x-device-posture",
)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _copy_paths(doc: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """A copy of ``doc`` in which every dict on ``paths`` is a fresh copy (copy on write)."""
    out = dict(doc)
    fresh = {id(out)}
    for parts in paths:
        parent = out
        for part in parts[:-1]:
            child = parent.get(part)
            if not isinstance(child, dict):
                break
            if id(child) not in fresh:
                child = dict(child)
                parent[part] = child
                fresh.add(id(child))
            parent = child
    return out


def _mask(value: Any) -> str:
    # A digest prefix lets records be correlated without showing the value;
    # erase low-entropy secrets instead: a short digest can be guessed.
    return "masked:sha256:" + hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def redact(
    doc: dict[str, Any], erase: tuple[str, ...], mask: tuple[str, ...], query: str = "mask"
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A redacted copy of ``doc`` and which paths were erased / masked (pure).

    Only the dicts on the paths it changes are copied; the rest is shared with ``doc``,
    which must not change afterwards (the policy input never does).
    """
    out = _copy_paths(doc, [p.split(".") for p in (*ALWAYS_ERASE, *erase, *mask, "request.query")])
    done: dict[str, list[str]] = {"erased": [], "masked": []}
    params = (out.get("request") or {}).get("query")
    if isinstance(params, dict) and params and query != "keep":
        if query == "erase":
            out["request"]["query"] = {}
        else:
            out["request"]["query"] = {k: [_mask(v) for v in vs] for k, vs in params.items()}
        done["erased" if query == "erase" else "masked"].append("request.query")
    for kind, paths in (("erased", (*ALWAYS_ERASE, *erase)), ("masked", mask)):
        for dotted in paths:
            parts = dotted.split(".")
            parent: Any = out
            for part in parts[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict) or parts[-1] not in parent:
                continue
            if kind == "erased":
                del parent[parts[-1]]
            else:
                parent[parts[-1]] = _mask(parent[parts[-1]])
            done[kind].append(dotted)
    return out, done


class JsonLines(logging.Formatter):
    """Audit records as they are; other records as small JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            return orjson.dumps(audit, default=str).decode()
        doc: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("peer", "why"):
            if hasattr(record, key):
                doc[key] = str(getattr(record, key))
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__  # type only: messages may carry data
        return orjson.dumps(doc).decode()


class _OtlpHandler(logging.Handler):
    """Audit records as OTLP log records (body = the record, a few indexable attributes)."""

    def __init__(self, sink: AuditSink) -> None:
        super().__init__()
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        exporter: Any
        if sink.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as Grpc

            exporter = Grpc(
                endpoint=sink.endpoint, insecure=sink.endpoint is not None and sink.endpoint.startswith("http://")
            )
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as Http

            exporter = Http(endpoint=sink.endpoint)
        self.provider = LoggerProvider()
        self.provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
        self.otel = self.provider.get_logger("vvault_pep.audit")

    def emit(self, record: logging.LogRecord) -> None:
        audit = getattr(record, "audit", None)
        if not isinstance(audit, dict):
            return
        attributes = {k: str(audit[k]) for k in ("decision_id", "request_id", "trace_id", "route") if audit.get(k)}
        self.otel.emit(body=orjson.dumps(audit, default=str).decode(), attributes=attributes)

    def close(self) -> None:
        self.provider.shutdown()
        super().close()


class _SinkQueue(logging.handlers.QueueHandler):
    """Hands records to a sink's thread; never blocks, counts what it drops."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None], name: str) -> None:
        super().__init__(q)
        self.sink = name
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatting happens in the sink's thread, off the request path

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _SinkWorker(threading.Thread):
    def __init__(self, q: queue.Queue[logging.LogRecord | None], target: logging.Handler, name: str) -> None:
        super().__init__(name=f"audit-sink-{name}", daemon=True)  # a stuck sink must not hold up exit
        self.q = q
        self.target = target
        self.failures = 0
        # A sink that fails (disk full, broken pipe) counts, rather than printing a
        # traceback per record to stderr.
        target.handleError = self._failed  # type: ignore[method-assign]

    def _failed(self, record: logging.LogRecord) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            logging.getLogger("vvault_pep.audit.sink").warning(
                "audit sink %s failing (%d records)", self.name, self.failures
            )

    def run(self) -> None:
        while True:
            record = self.q.get()
            if record is None:
                return
            try:
                self.target.handle(record)
            except Exception:
                self._failed(record)


class AuditLog:
    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        # A child of vvault_pep.audit per runtime: records propagate to the parent (tests,
        # embedding), while this runtime's sinks see only this runtime's records.
        self.logger = logging.getLogger(f"vvault_pep.audit.{next(_counter)}")
        self.logger.setLevel(logging.INFO)
        self.queues: list[_SinkQueue] = []
        self._workers: list[tuple[_SinkWorker, queue.Queue[logging.LogRecord | None], logging.Handler]] = []

    def start(self) -> None:
        for i, sink in enumerate(self.cfg.sinks):
            target = _target(sink)
            target.setFormatter(JsonLines())
            name = f"{sink.type}-{i}"
            q: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=sink.buffer_records)
            handler = _SinkQueue(q, name)
            worker = _SinkWorker(q, target, name)
            worker.start()
            self.logger.addHandler(handler)
            self.queues.append(handler)
            self._workers.append((worker, q, target))

    def dropped(self) -> dict[str, int]:
        """Records lost per sink: dropped on a full queue, or failed to write."""
        return {h.sink: h.dropped + w.failures for h, (w, _, _) in zip(self.queues, self._workers, strict=True)}

    def emit(self, record: dict[str, Any]) -> None:
        self.logger.info("decision", extra={"audit": record})

    def stop(self, timeout_s: float = 2.0) -> None:
        for handler in self.queues:
            self.logger.removeHandler(handler)
        for worker, q, target in self._workers:
            try:
                q.put(None, timeout=timeout_s)
            except queue.Full:
                continue  # stuck sink: its daemon thread is abandoned
            worker.join(timeout_s)
            if not worker.is_alive():
                target.close()


def _target(sink: AuditSink) -> logging.Handler:
    if sink.type == "stdout":
        return logging.StreamHandler(sys.stdout)
    if sink.type == "file":
        assert sink.path is not None
        return logging.handlers.RotatingFileHandler(
            sink.path, maxBytes=sink.max_bytes, backupCount=sink.backups, encoding="utf-8", delay=True
        )
    return _OtlpHandler(sink)


def configure_logging(level: str = "INFO") -> None:
    """Operational logs to stderr as JSON lines; audit records go to their sinks only."""
    ops = logging.StreamHandler(sys.stderr)
    ops.setFormatter(JsonLines())
    root = logging.getLogger()
    root.addHandler(ops)
    root.setLevel(level)
    logging.getLogger("vvault_pep.audit").propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
