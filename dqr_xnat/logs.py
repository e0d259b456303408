"""Logging set-up for the CLI, and the redaction that keeps secrets and PHI out of logs.

Library modules only create loggers; handlers are installed here, by the CLI. A filter on the
handler replaces every registered secret (password, token) with ``***`` as a last line of defence;
code must still never log PHI in the first place (use :func:`phi_hash`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from typing import Iterable

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in a log line written by our handlers."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    with _lock:
        secrets = list(_secrets)
    for secret in [*secrets, *extra]:
        if secret:
            text = text.replace(secret, "***")
    return text


def phi_hash(value: str, length: int = 12) -> str:
    """A short, stable, non-reversible stand-in for a PHI value (UIDs, names, IDs) in logs."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:length]


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job", "line", "study", "pacs", "project"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "WARNING", *, json_lines: bool = False, stream=None) -> None:
    """Install one handler on the root logger. Library loggers (pynetdicom, xnat) stay quieter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_dqr_xnat", False):
            root.removeHandler(old)
    handler._dqr_xnat = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs identifiers (PHI) at DEBUG/INFO; keep it at WARNING unless debugging.
    for noisy in ("pynetdicom", "xnat", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
