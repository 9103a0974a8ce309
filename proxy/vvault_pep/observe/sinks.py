"""Where audit records go: each sink a thread behind its own bounded buffer, chosen by type.

A sink type is a :class:`Sink` subclass registered under the name ``audit.sinks[].type``
takes in the config (``stdout``, ``file``, ``otlp`` here; ``http`` in :mod:`.decision_log`).
Adding one is a class, a :func:`register` line, and the name in the config model's literal.
Every record is encoded by :func:`encode`: one JSON line, control characters escaped, cut to
``max_record_bytes`` keeping the fields an investigation needs.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson

from ..config.models import AuditSink

SinkFactory = Callable[[str, AuditSink], "Sink"]
SINKS: dict[str, SinkFactory] = {}


def register(kind: str, factory: SinkFactory) -> None:
    """Make ``kind`` (an ``audit.sinks[].type``) build its sinks with ``factory``."""
    SINKS[kind] = factory


def build(name: str, cfg: AuditSink) -> Sink:
    return SINKS[cfg.type](name, cfg)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


_BATCH = 256  # records written (and flushed) at once by a sink's thread


_FLUSH_S = 0.05  # a quiet PEP's records reach the sink within this


class Sink(threading.Thread):
    """One sink behind its own bounded buffer and thread.

    :meth:`offer` never blocks the event loop and wakes nobody: it appends to a deque
    (a full buffer drops the record and counts it).  The thread wakes every
    ``_FLUSH_S``, or at once when a batch's worth is waiting, and writes what it finds
    in batches: one write and one flush per batch, not per record, and no lock handed
    between threads per request.
    """

    flush_s = _FLUSH_S

    def __init__(self, name: str, buffer_records: int) -> None:
        super().__init__(name=f"audit-sink-{name}", daemon=True)  # a stuck sink must not hold up exit
        self.sink = name
        self.capacity = buffer_records
        self.dropped = 0
        self.failures = 0
        self.escaped = 0
        self.truncated = 0
        self.max_record_bytes = 16_384
        self.in_flight = 0  # records taken by the thread and not yet written
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False

    def offer(self, record: dict[str, Any]) -> None:
        buffer = self._buffer
        if len(buffer) >= self.capacity:
            self.dropped += 1
            return
        buffer.append(record)
        if len(buffer) == _BATCH:
            self._wake.set()

    def run(self) -> None:
        buffer = self._buffer
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            stopping = self._stopping  # read before draining: what came before stop() is written
            while buffer:
                batch = [buffer.popleft() for _ in range(min(_BATCH, len(buffer)))]
                self.in_flight = len(batch)
                try:
                    self.write(batch)
                except Exception as exc:  # disk full, broken pipe: count, never a traceback per record
                    self._failed(len(batch), exc)
                self.in_flight = 0
            if stopping:
                return

    def stop(self, timeout_s: float) -> None:
        """Write what is buffered, then end; a stuck sink's thread is abandoned after ``timeout_s``."""
        self._stopping = True
        self._wake.set()
        self.join(timeout_s)
        if not self.is_alive():
            self.close()

    def _failed(self, n: int, exc: Exception) -> None:
        before, self.failures = self.failures, self.failures + n
        if before == 0 or before // 1000 != self.failures // 1000:
            logging.getLogger("vvault_pep.audit.sink").warning(
                "audit sink %s failing (%d records): %s", self.sink, self.failures, type(exc).__name__
            )

    def lines(self, batch: list[dict[str, Any]]) -> list[bytes]:
        out = []
        for record in batch:
            line, escaped, truncated = encode(record, self.max_record_bytes)
            self.escaped += escaped
            self.truncated += truncated
            out.append(line)
        return out

    def write(self, batch: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


_ESSENTIAL = (
    "timestamp", "decision_id", "request_id", "trace_id", "route", "method", "path", "request_path",
    "source_ip", "client_cert_sha256", "spiffe_id", "subject", "issuer", "tenant", "device_id", "status",
    "result", "admin_action", "admin", "enforced", "cache", "latency_ms", "upstream_status", "bytes_in",
)  # fmt: skip


_MAX_STRING = 512


_MAX_ITEMS = 32


def _scrub(value: Any, depth: int = 0) -> Any:
    """A copy JSON can carry: strings UTF-8 can encode, string keys, 64-bit integers."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    if depth > 64:
        return "…"
    if isinstance(value, dict):
        return {_scrub(str(k)): _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return _scrub(str(value))


def _shorten(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_STRING else value[:_MAX_STRING] + "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {k: _shorten(v) for k, v in items[:_MAX_ITEMS]}
        if len(items) > _MAX_ITEMS:
            out["…"] = f"{len(items) - _MAX_ITEMS} more"
        return out
    if isinstance(value, list):
        return [_shorten(v) for v in value[:_MAX_ITEMS]] + (
            [f"… {len(value) - _MAX_ITEMS} more"] if len(value) > _MAX_ITEMS else []
        )
    return value


def encode(record: dict[str, Any], max_bytes: int) -> tuple[bytes, bool, bool]:
    """One JSON line for ``record``, never an exception: (line, escaped, truncated)."""
    escaped = False
    try:
        line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate, a non-str key, a huge int
        record = {**_scrub(record), "escaped": True}
        line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
        escaped = True
    if len(line) <= max_bytes:
        return line, escaped, False
    marker = {"truncated": {"bytes": len(line)}}
    shortened = _shorten(record)
    for candidate in (
        shortened,
        {k: v for k, v in shortened.items() if k != "input"},
        {k: shortened[k] for k in _ESSENTIAL if k in shortened},
        {k: record.get(k) for k in ("timestamp", "decision_id", "request_id")},
    ):
        line = orjson.dumps({**candidate, **marker}, default=str, option=orjson.OPT_APPEND_NEWLINE)
        if len(line) <= max_bytes:
            break
    return line, escaped, True


class _StdoutSink(Sink):
    def __init__(self, name: str, sink: AuditSink) -> None:
        super().__init__(name, sink.buffer_records)
        self.stream = sys.stdout

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.stream.write(b"".join(self.lines(batch)).decode())
        self.stream.flush()


class _FileSink(Sink):
    """JSON lines appended to a file, rotated past ``max_bytes`` keeping ``backups`` files."""

    def __init__(self, name: str, sink: AuditSink) -> None:
        super().__init__(name, sink.buffer_records)
        assert sink.path is not None
        self.path = str(sink.path)
        self.max_bytes = sink.max_bytes
        self.backups = sink.backups
        self._file: Any = None
        self._size = 0

    def write(self, batch: list[dict[str, Any]]) -> None:
        data = b"".join(self.lines(batch))
        if self._file is None:
            self._open()
        if self.backups > 0 and self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
        try:
            self._size = os.fstat(self._file.fileno()).st_size
        except OSError:
            self._size = 0

    def _rotate(self) -> None:
        """Shift the backups and start a new file; a file moved away meanwhile is no error."""
        file, self._file = self._file, None
        try:
            file.close()
            for i in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):  # logrotate or an operator moved it
                os.replace(self.path, f"{self.path}.1")
        finally:
            self._open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _OtlpSink(Sink):
    """Audit records as OTLP log records (body = the record, a few indexable attributes)."""

    def __init__(self, name: str, sink: AuditSink) -> None:
        super().__init__(name, sink.buffer_records)
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

    def write(self, batch: list[dict[str, Any]]) -> None:
        for audit in batch:
            attributes = {k: str(audit[k]) for k in ("decision_id", "request_id", "trace_id", "route") if audit.get(k)}
            self.otel.emit(body=self.lines([audit])[0].rstrip(b"\n").decode(), attributes=attributes)

    def close(self) -> None:
        self.provider.shutdown()


register("stdout", _StdoutSink)
register("file", _FileSink)
register("otlp", _OtlpSink)
