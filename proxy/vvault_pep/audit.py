"""Audit: one structured record per request, allowed or denied.

Records are plain dicts handed to the ``vvault_pep.audit`` logger as
``extra={"audit": record}``; :class:`JsonLines` renders them one JSON object
per line.  Tests read ``LogRecord.audit`` instead of parsing text.

Field names follow OPA's decision-log format where the meaning is the same
(``decision_id``, ``path``, ``result``, ``timestamp``).  Nothing secret is
ever put in a record: no header values other than the allow-listed ones, no
``Authorization``, no bodies.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import orjson

log = logging.getLogger("vvault_pep.audit")


class JsonLines(logging.Formatter):
    """Audit records as they are; other records as small JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            return orjson.dumps(audit).decode()
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


def configure_logging(level: str = "INFO") -> None:
    """Audit records to stdout, operational logs to stderr, both JSON lines."""
    fmt = JsonLines()
    audit_handler = logging.StreamHandler(sys.stdout)
    audit_handler.setFormatter(fmt)
    log.addHandler(audit_handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    ops = logging.StreamHandler(sys.stderr)
    ops.setFormatter(fmt)
    root = logging.getLogger()
    root.addHandler(ops)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def emit(record: dict[str, Any]) -> None:
    log.info("decision", extra={"audit": record})
