"""Audit: one structured record per request, allowed or denied, on every sink.

A record is a plain dict.  Each sink (stdout, a rotating file, OTLP logs)
sits behind its own bounded buffer and its own thread: putting a record on
the buffer never blocks, serialisation and writing happen in the sink's
thread, in batches, and a full buffer drops the record and counts it
(``vvault_pep_audit_dropped_total{sink}``).  A slow or stuck sink therefore
costs records, never request latency.  When something listens on the
``vvault_pep.audit`` logger (tests, an embedding application), the record is
also handed to it as ``LogRecord.audit``.

Field names follow OPA's decision-log format where the meaning is the same
(``decision_id``, ``path``, ``bundles``, ``input``, ``result``,
``timestamp``).  Redaction is built in (:func:`redact`): the record's
``redacted`` field lists which input paths were ``erased`` and which
``masked``.  The bearer token, the posture assertion and cookies never reach
a record.

Every record is written, whatever it holds (:func:`encode`): a value JSON
cannot carry (a lone surrogate, a non-string key, an integer past 64 bits) is
escaped and the record marked ``"escaped": true``; a record longer than
``audit.max_record_bytes`` has its long strings and lists cut, then its
``input`` dropped, and is marked ``"truncated": {"bytes": <original size>}``.
Both are counted per sink (``vvault_pep_audit_escaped_total``,
``vvault_pep_audit_truncated_total``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import sys
from typing import Any

import orjson

from ..config.models import Audit as AuditConfig
from . import sinks
from .decision_log import opa_event
from .sinks import encode

_counter = itertools.count()

# Input paths erased from every record whatever the config says.
ALWAYS_ERASE = (
    "request.headers.authorization",
    "request.headers.cookie",
    "request.headers.set-cookie",
    "request.headers.proxy-authorization",
    "request.headers.x-device-posture",
)


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
            return encode(audit, 1 << 40)[0].rstrip(b"\n").decode()
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


class AuditLog:
    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        # A child of vvault_pep.audit per runtime: when someone listens there (tests,
        # embedding), records are also handed to it as LogRecord.audit.
        self.logger = logging.getLogger(f"vvault_pep.audit.{next(_counter)}")
        self.logger.setLevel(logging.INFO)
        self.sinks: list[sinks.Sink] = []

    def start(self) -> None:
        for i, cfg in enumerate(self.cfg.sinks):
            name = f"{cfg.type}-{i}"
            sink = sinks.build(name, cfg)
            sink.max_record_bytes = self.cfg.max_record_bytes
            sink.start()
            self.sinks.append(sink)

    def dropped(self) -> dict[str, int]:
        """Records lost per sink: dropped on a full buffer, or failed to write."""
        return {s.sink: s.dropped + s.failures for s in self.sinks}

    def escaped(self) -> dict[str, int]:
        return {s.sink: s.escaped for s in self.sinks}

    def truncated(self) -> dict[str, int]:
        return {s.sink: s.truncated for s in self.sinks}

    def emit(self, record: dict[str, Any], *, result: Any = None, has_result: bool = False) -> None:
        """Hand one record to every sink; ``result`` is the policy's raw answer (OPA format)."""
        if self.cfg.format == "opa":
            record = opa_event(
                record, result=result, has_result=has_result, labels=self.cfg.labels, extension=self.cfg.extension
            )
        for sink in self.sinks:
            sink.offer(record)
        if self.logger.hasHandlers():
            self.logger.info("decision", extra={"audit": record})

    def stop(self, timeout_s: float = 2.0) -> None:
        running, self.sinks = self.sinks, []
        for sink in running:
            sink.stop(timeout_s)


def configure_logging(level: str = "INFO") -> None:
    """Operational logs to stderr as JSON lines; audit records go to their sinks only."""
    ops = logging.StreamHandler(sys.stderr)
    ops.setFormatter(JsonLines())
    root = logging.getLogger()
    root.addHandler(ops)
    root.setLevel(level)
    logging.getLogger("vvault_pep.audit").propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
