"""The audit log: who asked for what, and what went where (issue 6, item 4).

One JSON object per line, appended, never rewritten::

    {"time": "2024-05-01T12:00:00.123Z", "event": "study_uploaded", "actor": "xnat:dqr-service",
     "pid": 4711, "job": "j-1", "line": 3, "study_uid_hash": "9f86d0…", "project": "NEURO01", ...}

Why it is built this way:

* Append-only and multi-process safe: every event is ONE ``write`` on a descriptor opened with
  ``O_APPEND``, so lines from several threads or processes never interleave or overwrite (a lock
  serialises this process's threads). The file is opened per event, so logrotate's rename works,
  with ``O_NOFOLLOW`` (a planted symlink cannot redirect it) and mode 0600.
* No PHI in clear: query criteria, StudyInstanceUIDs and (unless the project lets reports show
  identity) subject/session labels are SHA-256 hashed; labels come from PatientName when the CSV
  does not relabel. Unkeyed, the first 12 hex digits of a UID's hash equal
  :func:`dqr_xnat.logs.phi_hash`, so audit lines and log lines can be matched; give ``hash_key``
  for HMAC-SHA256 instead when low-entropy values (patient IDs in criteria) must not be
  brute-forced by a reader of the file. Free-text failure messages go through the caller's
  ``scrub`` function, the values it names in ``phi``, and secret redaction.
* :class:`NullAuditLog` has the same methods and writes nothing, for ``service.audit_log: off``.
"""

from __future__ import annotations

import enum
import getpass
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from dqr_xnat.config import Config
from dqr_xnat.errors import DqrError
from dqr_xnat.logs import redact

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
#: ``service.audit_log`` values that switch auditing off.
OFF = ("off", "none", "false")
MAX_MESSAGE = 1000  # characters of a failure message kept


class AuditError(DqrError):
    """The audit log cannot be written (a job must not run unaudited when auditing is on)."""


def default_actor() -> str:
    """Who acts when no XNAT account does: the OS user running the command."""
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary UIDs)
        return f"uid:{os.getuid()}"


class NullAuditLog:
    """Every audit event, recorded nowhere: the base of :class:`AuditLog` and auditing switched off."""

    enabled = False

    def __init__(self, *, actor: str | None = None, scrub: Callable[[str], str] | None = None,
                 hash_key: bytes | None = None) -> None:
        self.actor = actor or default_actor()
        self.scrub = scrub or (lambda text: text)
        self._key = hash_key

    # -- events (keyword-only details, so a call site reads like the record)

    def job_started(self, job_id: str, *, project: str, file: str, pacs: str, mode: Any) -> None:
        self._emit("job_started", job_id, project=project, file=file, pacs=pacs, mode=_plain(mode))

    def query(self, job_id: str, *, line: int, criteria: Mapping[str, str], pacs: str,
              counts: Mapping[str, int]) -> None:
        """One CSV row's C-FIND; ``counts`` e.g. {"candidates": 3, "matched": 1, "dropped": 2}."""
        self._emit("query", job_id, line=line, criteria_hash=self.criteria_hash(criteria), pacs=pacs,
                   counts=dict(counts))

    def study_retrieved(self, job_id: str, *, line: int, study_uid: str, counts: Mapping[str, int]) -> None:
        """``counts`` e.g. {"expected": 120, "received": 120, "failed": 0}."""
        self._emit("study_retrieved", job_id, line=line, study_uid_hash=self.hash(study_uid), counts=dict(counts))

    def study_uploaded(self, job_id: str, *, line: int, study_uid: str, project: str, subject: str,
                       session: str, instances: int, prearchive_url: str, labels_in_clear: bool = False) -> None:
        """``labels_in_clear`` only when the project's reports may show patient identity."""
        if labels_in_clear:
            labels: dict[str, Any] = {"subject": subject, "session": session, "prearchive_url": prearchive_url}
        else:
            labels = {"subject_hash": self.hash(subject), "session_hash": self.hash(session),
                      "prearchive_url": self._hide_folder(prearchive_url)}
        self._emit("study_uploaded", job_id, line=line, study_uid_hash=self.hash(study_uid), project=project,
                   instances=instances, **labels)

    def failure(self, job_id: str, *, kind: str, message: str, line: int | None = None,
                study_uid: str | None = None, phi: Iterable[str] = ()) -> None:
        """A row, study or job failed. ``phi``: values to hash out of ``message`` (names, IDs...)."""
        self._emit("failure", job_id, line=line, study_uid_hash=self.hash(study_uid) if study_uid else None,
                   kind=kind, message=self.clean(message, [*phi, *([study_uid] if study_uid else [])]))

    def job_finished(self, job_id: str, *, state: Any, counts: Mapping[str, int]) -> None:
        self._emit("job_finished", job_id, state=_plain(state), counts=dict(counts))

    def cancel_requested(self, job_id: str, *, by: str) -> None:
        self._emit("cancel_requested", job_id, by=by)

    # -- hashing and scrubbing

    def hash(self, value: str) -> str:
        """SHA-256 (or HMAC-SHA256 with ``hash_key``) hex digest of a PHI value."""
        data = value.encode("utf-8", "replace")
        if self._key:
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def criteria_hash(self, criteria: Mapping[str, str]) -> str:
        """The hash of a query: keys sorted, so the same criteria always give the same hash."""
        return self.hash(json.dumps({str(k): str(v) for k, v in criteria.items()}, sort_keys=True,
                                    ensure_ascii=False, separators=(",", ":")))

    def clean(self, message: str, phi: Iterable[str] = ()) -> str:
        """The caller's scrubber, then each named PHI value hashed out, then secrets masked."""
        text = self.scrub(message)
        for value in sorted({v for v in phi if v and v.strip()}, key=len, reverse=True):
            text = text.replace(value, f"<hash:{self.hash(value)[:12]}>")
        text = redact(text)
        return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "…"

    def _hide_folder(self, url: str) -> str:
        """A prearchive URL ends in the session folder (the label): keep project/timestamp, hash it."""
        head, _, folder = url.rstrip("/").rpartition("/")
        return f"{head}/<hash:{self.hash(folder)}>" if head else f"<hash:{self.hash(url)}>"

    def _emit(self, event: str, job_id: str, **fields: Any) -> None:
        """Nothing: auditing is off."""


class AuditLog(NullAuditLog):
    """The JSON-lines audit file at ``path`` (see the module docstring); thread- and process-safe."""

    enabled = True

    def __init__(self, path: Path | str, *, actor: str | None = None, scrub: Callable[[str], str] | None = None,
                 hash_key: bytes | None = None, fsync: bool = False) -> None:
        super().__init__(actor=actor, scrub=scrub, hash_key=hash_key)
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._prepare()

    def _prepare(self) -> None:
        """Create the file private; tighten a file others can read (it names projects and jobs)."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(self._open())
            mode = self.path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(self.path, 0o600)
                log.warning("audit log %s was readable by other users; made it private (0600)", self.path)
        except OSError as exc:
            raise self._error(exc) from None

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        return os.open(self.path, flags, 0o600)

    def _emit(self, event: str, job_id: str, **fields: Any) -> None:
        record = {"time": _now(), "event": event, "actor": self.actor, "pid": os.getpid(), "job": job_id,
                  **{k: v for k, v in fields.items() if v is not None}}
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = self._open()
                try:
                    written = os.write(fd, data)  # one write: O_APPEND keeps the line whole
                    if written != len(data):
                        raise OSError(0, f"short write ({written} of {len(data)} bytes)")
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise self._error(exc) from None

    def _error(self, exc: OSError) -> AuditError:
        why = exc.strerror or str(exc)
        return AuditError(f"cannot write the audit log {self.path}: {why}; fix the file or directory (it must be "
                          "a regular file writable by the service), or set service.audit_log")


def open_audit_log(config: Config, *, actor: str | None = None, scrub: Callable[[str], str] | None = None,
                   hash_key: bytes | None = None) -> NullAuditLog:
    """The audit log the configuration asks for: ``service.audit_log`` (default ``<state_dir>/audit.jsonl``;
    ``off`` switches it off)."""
    setting = config.service.audit_log
    if setting is not None and setting.strip().lower() in OFF:
        return NullAuditLog(actor=actor, scrub=scrub, hash_key=hash_key)
    path = Path(setting).expanduser() if setting else Path(config.state_dir) / AUDIT_FILE
    return AuditLog(path, actor=actor, scrub=scrub, hash_key=hash_key)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
