"""JSON logs: one object per line (orjson), never payloads, passwords in URLs redacted."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.I)


def scrub(text: str) -> str:
    """Remove passwords from any URL in a text."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = scrub(f"{type(exc).__name__}: {exc}")
            entry["traceback"] = scrub(self.formatException(record.exc_info))
        line = orjson.dumps(entry, default=str).decode()
        return scrub(line) if fields else line


def setup(level: str = "info") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq and alembic are chatty at INFO; keep their warnings.
    for name in ("aiormq", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiormq.connection").addFilter(_not_transport_error)


def _not_transport_error(record: logging.LogRecord) -> bool:
    """aiormq logs every failed connection attempt, with OpenSSL's codes, before raising; the
    caller reports that same failure in its own line (a refusal: once), so aiormq's is a
    second, noisier line per attempt."""
    return record.msg != "error when creating transport: %r"
