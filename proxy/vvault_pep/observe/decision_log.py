"""OPA-compatible decision logs: the event format and the HTTP sink.

With ``audit.format: opa`` every audit record is an OPA decision-log event
(OPA's ``EventV1``: ``labels``, ``decision_id``, ``bundles``, ``path``,
``input``, ``result``, ``erased``, ``masked``, ``requested_by``,
``timestamp``, ``metrics``, ``error``), so a consumer of OPA's decision logs
reads it unchanged.  ``result`` is the policy's raw answer, as OPA logs it,
not the PEP's interpretation.  Facts only the PEP knows (status, enforcement,
cache layer, upstream, latency, identity summary) go in one extension block,
``vvault_pep``, left out with ``audit.extension: false``.

:class:`HttpSink` POSTs batches to a decision-log service as OPA does: a
gzip-compressed JSON array, ``Content-Encoding: gzip``.  It sits behind the
same bounded buffer as every sink (a full buffer drops and counts); a failed
POST is retried with exponential backoff and jitter, and a batch that still
fails after ``max_attempts`` is counted as lost
(``vvault_pep_audit_dropped_total{sink}``).  A 4xx other than 408/429 is not
retried: the service refused the batch and would refuse it again.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import random
import ssl
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson

from .. import __version__
from ..config.models import AuditSink
from .sinks import Sink, now_rfc3339, register

log = logging.getLogger("vvault_pep.audit.http")

# One id per PEP process, as OPA labels each instance (labels.id).
INSTANCE_ID = str(uuid.uuid4())
# The collector's answer is judged by its status; of its body no more than this is read.
_ANSWER_READ = 1024

# Fields of the PEP record that become OPA's own fields; the rest is the extension.
_MAPPED = frozenset({"timestamp", "decision_id", "trace_id", "path", "input", "redacted", "bundles"})


def pointer(dotted: str, root: str = "input") -> str:
    """A dotted input path as the JSON pointer OPA's ``erased`` / ``masked`` hold (RFC 6901)."""
    parts = [root, *dotted.split(".")]
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def bundles_of(revision: Any) -> dict[str, dict[str, str]] | None:
    """OPA's ``bundles`` map from the PEP's revision string (``b:{json}#…``); None outside bundle mode."""
    if not isinstance(revision, str) or not revision.startswith("b:"):
        return None
    try:
        revs = orjson.loads(revision[2:].split("#", 1)[0])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(revs, dict) or not revs:
        return None
    return {str(name): {"revision": str(rev)} for name, rev in revs.items()}


def opa_event(
    record: dict[str, Any],
    *,
    result: Any = None,
    has_result: bool = False,
    labels: dict[str, str] | None = None,
    extension: bool = True,
) -> dict[str, Any]:
    """The OPA decision-log event for one PEP audit record (pure)."""
    event: dict[str, Any] = {
        "labels": {**(labels or {}), "id": INSTANCE_ID, "version": __version__},
        "decision_id": str(record.get("decision_id") or uuid.uuid4()),
    }
    if record.get("trace_id"):
        event["trace_id"] = record["trace_id"]
    revision = (record.get("bundles") or {}).get("revision")
    bundles = bundles_of(revision)
    if bundles is not None:
        event["bundles"] = bundles
    if record.get("path"):
        event["path"] = record["path"]
    if "input" in record:
        event["input"] = record["input"]
    if has_result:
        event["result"] = result
    redacted = record.get("redacted") or {}
    for kind in ("erased", "masked"):
        if redacted.get(kind):
            event[kind] = [pointer(p) for p in redacted[kind]]
    code = str((record.get("result") or {}).get("code", ""))
    if code.startswith("pdp."):
        # The policy could not be evaluated: OPA reports that as the event's error.
        reasons = (record.get("result") or {}).get("reasons") or [""]
        event["error"] = {"code": code, "message": str(reasons[0])}
    source = record.get("source_ip")
    port = ((record.get("input") or {}).get("source") or {}).get("port")
    if source:
        host = f"[{source}]" if ":" in source else source
        event["requested_by"] = f"{host}:{port}" if port else str(source)
    event["timestamp"] = record.get("timestamp") or now_rfc3339()
    metrics: dict[str, int] = {}
    if isinstance(record.get("latency_ms"), int | float):
        metrics["timer_server_handler_ns"] = int(record["latency_ms"] * 1_000_000)
    for stage, ms in (record.get("stages_ms") or {}).items():
        metrics[f"timer_vvault_pep_{stage}_ns"] = int(ms * 1_000_000)
    if metrics:
        event["metrics"] = metrics
    if extension:
        ext = {k: v for k, v in record.items() if k not in _MAPPED}
        if "result" in ext:
            ext["decision"] = ext.pop("result")  # the PEP's reading of the result
        if isinstance(revision, str):
            ext["revision"] = revision
        event["vvault_pep"] = ext
    return event


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class HttpSink(Sink):
    """Batches to a decision-log service: gzip JSON arrays, retried with backoff."""

    def __init__(self, name: str, cfg: AuditSink) -> None:
        super().__init__(name, cfg.buffer_records)
        assert cfg.url is not None
        self.url = cfg.url
        self.cfg = cfg
        self.flush_s = cfg.flush_interval_s
        self.batch = cfg.batch_records
        self.sent = 0  # records the service accepted
        self.retries = 0
        self._ssl: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"vvault-pep/{__version__}",
        }
        if cfg.token:
            self._headers["Authorization"] = f"Bearer {cfg.token}"

    def write(self, batch: list[dict[str, Any]]) -> None:
        for start in range(0, len(batch), self.batch):
            part = batch[start : start + self.batch]
            # Each event encoded like every sink's (escaped, size-capped, never an exception),
            # then joined into OPA's wire format: one JSON array per POST.
            events = b",".join(line.rstrip(b"\n") for line in self.lines(part))
            self._send(gzip.compress(b"[" + events + b"]", compresslevel=5), len(part))

    def _send(self, body: bytes, count: int) -> None:
        delay = self.cfg.backoff_s
        attempt = 1
        while True:
            try:
                self._post(body)
                self.sent += count
                return
            except _Refused as exc:
                if exc.status < 500 and exc.status not in (408, 429):
                    raise
                failure: Exception = exc
            except (OSError, http.client.HTTPException) as exc:
                failure = exc
            # Stopping: one try only, what is left is counted, shutdown is not held up.
            if attempt >= self.cfg.max_attempts or self._stopping:
                raise failure
            attempt += 1
            self.retries += 1
            time.sleep(min(delay, self.cfg.max_backoff_s) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
            delay *= 2

    def _post(self, body: bytes) -> None:
        # http.client rather than urllib: no redirects followed (the token stays with this URL).
        parts = urlsplit(self.url)
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self.cfg.timeout_s, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self.cfg.timeout_s)
        try:
            conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, self._headers)
            resp = conn.getresponse()
            resp.read(_ANSWER_READ)  # the answer is not used: a little is read, then the connection closed
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise _Refused(resp.status)


register("http", HttpSink)
