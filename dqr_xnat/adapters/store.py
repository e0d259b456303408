"""The durable job store: jobs, their CSV rows and their studies, in one SQLite file.

Why SQLite: one file in the state directory, transactions that survive ``kill -9``, and safe
sharing between the threads and the processes of one host (WAL mode, ``busy_timeout``, every write
in a ``BEGIN IMMEDIATE`` transaction). It must not live on a network filesystem.

State model (ADIT's job/task model, style.md): a **job** is one inbox file; its **rows** are the
CSV's lines (status None = not queried yet, then a RowStatus); its **studies** are the studies the
rows matched, each moving PENDING → RETRIEVING → RETRIEVED → RELABELED → UPLOADING → DONE (or
SKIPPED / FAILED / CANCELED). The job's state is derived from its rows and studies
(:meth:`JobStore.derive_job_state`).

Identity: ``UNIQUE(project, path, digest)``: the same file is never processed twice, an edited
file (new digest) is a new job. Job ids are 8 lowercase hex characters, random, typed by users
(``dqr-xnat cancel 3f9a``): any unique prefix finds the job.

Ownership and resume: a study in RETRIEVING or UPLOADING, or handed out by :meth:`claim_study`, is
owned by the process that put it there (``claimed_by`` = host:pid:process start time). When that
process dies, :meth:`reset_interrupted` applies the resume rule of the study's state:

* RETRIEVING → PENDING (retrieve again into a clean staging directory; ``staging_dir`` is kept so
  the pipeline can delete the partial files first);
* UPLOADING → stays UPLOADING with ``interrupted`` set: the upload may or may not have landed, so
  the pipeline must ask XNAT before sending it again (never upload twice);
* RETRIEVED / RELABELED (owned by a worker that died mid-relabel or before uploading) → same state,
  released: that work is local and is simply redone;
* PENDING and final states → unchanged.

Every reset counts as an attempt (``attempts`` + 1, ``last_error`` says why), so a study that kills
its worker every time ends FAILED instead of looping.

PHI: the store keeps what it needs to resume: StudyInstanceUIDs, the CSV's query and relabel
values, the PACS's study description. The file is created 0600 (its WAL and shared-memory files
inherit that mode) and a missing parent directory is created 0700.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dqr_xnat.errors import DqrError, StoreError
from dqr_xnat.model import (
    CsvProblem,
    CsvRow,
    JobMode,
    JobState,
    RowMatch,
    RowStatus,
    StudyInfo,
    StudyState,
    XnatLabels,
)

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another one before StoreError

#: Study states owned by the process that entered them (resume rules in the module docstring).
ACTIVE_STATES = frozenset({StudyState.RETRIEVING, StudyState.UPLOADING})
#: Row outcomes that make a finished job FAILED rather than DONE: the user must act on them.
# no-match is an outcome, not a failure (csv-language.md); ambiguous imported nothing and needs the user.
FAILED_ROW_STATUSES = frozenset({RowStatus.ERROR, RowStatus.AMBIGUOUS})
PENDING_ROW = "pending"  # the key for rows not queried yet in JobProgress.rows
CANCELLED_ROW_MESSAGE = "not queried: the job was cancelled"


class NotInStoreError(DqrError, LookupError):
    """No job (or study, or row) with that id; for a job prefix, none or several match."""


# ------------------------------------------------------------------------------------------------
# Typed records


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Job:
    """One inbox file and what the service does with it."""

    id: str
    project: str
    resource: str
    path: str  # within the inbox resource, '/'-separated
    digest: str  # sha256 hex of the file's content
    mode: JobMode
    pacs: str
    reimport: bool
    state: JobState
    message: str
    created: datetime
    updated: datetime
    finished: datetime | None
    cancel_requested: bool
    csv_encoding: str | None
    totals: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "totals", _frozen(self.totals))

    def to_json(self) -> dict[str, object]:
        """For ``status --json``: no PHI (paths and counts only)."""
        return {
            "id": self.id, "project": self.project, "resource": self.resource, "path": self.path,
            "mode": self.mode.value, "pacs": self.pacs, "reimport": self.reimport,
            "state": self.state.value, "message": self.message,
            "created": self.created.isoformat(), "updated": self.updated.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "cancel_requested": self.cancel_requested, "totals": dict(self.totals),
        }


@dataclass(frozen=True)
class RowRecord:
    """One CSV line of a job. ``status`` None = not queried yet."""

    job_id: str
    line: int
    status: RowStatus | None
    message: str
    query: Mapping[str, str]
    relabel: Mapping[str, str]
    subject: str | None
    session: str | None
    dropped: int
    duplicate_of: int | None
    updated: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", _frozen(self.query))
        object.__setattr__(self, "relabel", _frozen(self.relabel))

    def csv_row(self) -> CsvRow:
        """The row as the parser gave it, to query it again after a restart."""
        return CsvRow(self.line, self.query, self.relabel, self.subject, self.session)


@dataclass(frozen=True)
class NewStudy:
    """What the pipeline knows about a matched study when it records it."""

    info: StudyInfo
    session_suffix: str = ""
    unverified: tuple[str, ...] = ()  # row criteria to check on the retrieved DICOM
    series_uids: tuple[str, ...] = ()  # the series to retrieve (empty = all)
    series_expected: int | None = None
    expected: int | None = None  # instances the PACS announced (after the series filter)


@dataclass(frozen=True)
class StudyRecord:
    """One matched study of a job and where it stands."""

    id: int
    job_id: str
    line: int
    study_uid: str
    info: StudyInfo
    state: StudyState
    message: str
    attempts: int
    last_error: str
    xnat_project: str | None
    subject: str | None
    session: str | None
    label_fallback: str | None
    session_suffix: str
    expected: int | None
    received: int | None
    uploaded: int | None
    series_expected: int | None
    series_uids: tuple[str, ...]
    prearchive_url: str | None
    staging_dir: str | None
    unverified: tuple[str, ...]
    claimed_by: str | None  # owner token while a process works on it
    interrupted: bool  # UPLOADING left by a dead process: ask XNAT before uploading again
    retry_after: datetime | None
    updated: datetime

    @property
    def labels(self) -> XnatLabels | None:
        if self.xnat_project is None or self.subject is None or self.session is None:
            return None
        return XnatLabels(self.xnat_project, self.subject, self.session, self.label_fallback)


@dataclass(frozen=True)
class JobProgress:
    """Counts for status lines and reports: rows by status (``pending`` = not queried), studies by state."""

    rows: Mapping[str, int]
    studies: Mapping[str, int]
    owned: int  # studies a live or dead process holds (RETRIEVING/UPLOADING or claimed)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_studies(self) -> int:
        return sum(self.studies.values())


# ------------------------------------------------------------------------------------------------
# Schema


_SCHEMA_V1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    resource TEXT NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    mode TEXT NOT NULL,
    pacs TEXT NOT NULL,
    reimport INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    finished TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    csv_encoding TEXT,
    totals TEXT NOT NULL DEFAULT '{}',
    UNIQUE (project, path, digest)
);
CREATE INDEX jobs_state ON jobs (state);
CREATE TABLE rows (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    line INTEGER NOT NULL,
    status TEXT,
    message TEXT NOT NULL DEFAULT '',
    query TEXT NOT NULL DEFAULT '{}',
    relabel TEXT NOT NULL DEFAULT '{}',
    subject TEXT,
    session TEXT,
    dropped INTEGER NOT NULL DEFAULT 0,
    duplicate_of INTEGER,
    updated TEXT NOT NULL,
    PRIMARY KEY (job_id, line)
);
CREATE TABLE studies (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    info TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    xnat_project TEXT,
    subject TEXT,
    session TEXT,
    label_fallback TEXT,
    session_suffix TEXT NOT NULL DEFAULT '',
    expected INTEGER,
    received INTEGER,
    uploaded INTEGER,
    series_expected INTEGER,
    series_uids TEXT NOT NULL DEFAULT '[]',
    prearchive_url TEXT,
    staging_dir TEXT,
    unverified TEXT NOT NULL DEFAULT '[]',
    claimed_by TEXT,
    interrupted INTEGER NOT NULL DEFAULT 0,
    retry_after TEXT,
    updated TEXT NOT NULL,
    UNIQUE (job_id, study_uid),
    FOREIGN KEY (job_id, line) REFERENCES rows (job_id, line) ON DELETE CASCADE
);
CREATE INDEX studies_work ON studies (state, claimed_by);
CREATE INDEX studies_landed ON studies (study_uid, xnat_project);
"""

#: MIGRATIONS[n] turns schema version n into n + 1 (0 = empty file). Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    lambda conn: _executescript(conn, _SCHEMA_V1),
]
assert len(MIGRATIONS) == SCHEMA_VERSION


def _executescript(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL statement by statement: executescript() would COMMIT our open transaction."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION inside the caller's write transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"job store {path} has schema version {version}, newer than this "
                         f"dqr-xnat understands ({SCHEMA_VERSION}); upgrade dqr-xnat")
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn)
        conn.execute("UPDATE schema_version SET version = ?", (step + 1,))
        log.info("job store %s migrated to schema version %d", path, step + 1)


# ------------------------------------------------------------------------------------------------
# Small helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """Fixed-width UTC text, so SQL string comparison orders instants correctly."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _info_json(info: StudyInfo) -> str:
    return _json(asdict(info))


def _info_from(text: str) -> StudyInfo:
    data = json.loads(text)
    known = {f.name for f in fields(StudyInfo)}
    data = {k: v for k, v in data.items() if k in known}
    data["modalities"] = tuple(data.get("modalities") or ())
    return StudyInfo(**data)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a live process from a reused pid.

    Returns "" where /proc is unavailable, None when the process does not exist or is a zombie.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _pid_exists(pid)
    after_name = raw[raw.rindex(")") + 2:].split()
    if after_name[0] in ("Z", "X"):
        return None
    return after_name[19]  # field 22, starttime


def _pid_exists(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def _owner_token() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or ''}"


def _owner_alive(token: str) -> bool:
    """Is the process that owns ``token`` still running? Other hosts' owners count as alive."""
    host, _, rest = token.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    current = _process_start(int(pid_text))
    return current is not None and (current == start or "" in (current, start))


def _prepare_file(path: Path) -> None:
    """Create the store 0600 (parent 0700) before SQLite opens it; tighten an existing one."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if part.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(part, 0o600)
        except FileNotFoundError:
            continue


# ------------------------------------------------------------------------------------------------
# The store


_STUDY_FIELDS = frozenset({
    "message", "last_error", "xnat_project", "subject", "session", "label_fallback",
    "session_suffix", "expected", "received", "uploaded", "series_expected", "series_uids",
    "prearchive_url", "staging_dir", "unverified", "info", "retry_after",
})


#: Connections inherited through fork(). SQLite forbids using them in the child; closing them there
#: (e.g. by garbage collection) could disturb the parent's locks, so the child keeps them forever.
_FORK_ORPHANS: list[object] = []


class JobStore:
    """Thread- and process-safe access to one store file (one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()
        self._guard = threading.Lock()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._pid = os.getpid()
        self._owner = _owner_token()
        try:
            _prepare_file(self.path)
        except OSError as exc:
            raise StoreError(f"cannot create the job store {self.path}: {exc.strerror}") from None
        with self._write() as conn:
            _migrate(conn, self.path)

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> JobStore:
        """The service's store: ``<state_dir>/jobs.sqlite3``."""
        return cls(Path(state_dir) / DB_NAME)

    @property
    def owner(self) -> str:
        """This process's owner token (host:pid:start), recorded on the studies it works on."""
        self._conn()  # refreshes the token after a fork
        return self._owner

    # -------------------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: never use, nor even close, the parent's connections
            _FORK_ORPHANS.append((self._local, self._connections))
            self._local, self._guard, self._connections = threading.local(), threading.Lock(), {}
            self._pid, self._owner = os.getpid(), _owner_token()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._guard:
                self._close_dead_threads()
                self._connections[threading.current_thread()] = conn
        return conn

    def _close_dead_threads(self) -> None:
        """Worker pools come and go: close the connections of threads that have ended."""
        for thread in [t for t in self._connections if not t.is_alive()]:
            self._connections.pop(thread).close()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a committed DONE survives a power cut
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        conn.row_factory = sqlite3.Row
        return conn

    def _error(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(f"job store {self.path} stayed locked by another process for "
                              f"{self.timeout:.0f} s; is a stuck dqr-xnat holding it?")
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreError(f"job store {self.path}: {text}")
        return StoreError(f"job store {self.path} is unusable ({text}); restore it or move it "
                          "away to start with an empty store")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no deadlocks)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            yield conn
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise self._error(exc) from None
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise self._error(exc) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reads made of several queries."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            yield conn
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # read-only: nothing to undo, just end the snapshot

    def close(self) -> None:
        """Close every connection this process opened (call once no thread uses the store)."""
        with self._guard:
            connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> list[str]:
        """SQLite's own check; ``['ok']`` when the file is sound."""
        with self._read() as conn:
            return [r[0] for r in conn.execute("PRAGMA integrity_check")]

    # -------------------------------------------------------------------- jobs

    def create_job(
        self,
        *,
        project: str,
        resource: str,
        path: str,
        digest: str,
        mode: JobMode,
        pacs: str,
        reimport: bool = False,
        csv_encoding: str | None = None,
        state: JobState = JobState.PENDING,
        message: str = "",
    ) -> Job | None:
        """A new job for this file, or None when (project, path, digest) already has one.

        None is the "already seen, do nothing" answer the inbox poller needs; use
        :meth:`job_for_file` to read the existing job.
        """
        now = _iso(_now())
        with self._write() as conn:
            if _job_id_for_file(conn, project, path, digest) is not None:
                return None
            job_id = _new_job_id(conn)
            conn.execute(
                "INSERT INTO jobs (id, project, resource, path, digest, mode, pacs, reimport, state,"
                " message, created, updated, csv_encoding) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, project, resource, path, digest, JobMode(mode).value, pacs, int(reimport),
                 JobState(state).value, message, now, now, csv_encoding),
            )
            return _job(conn, job_id)

    def job_for_file(self, project: str, path: str, digest: str) -> Job | None:
        with self._read() as conn:
            job_id = _job_id_for_file(conn, project, path, digest)
            return None if job_id is None else _job(conn, job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            return _job(conn, job_id)

    def find_job(self, id_prefix: str) -> Job:
        """The job whose id is or starts with ``id_prefix`` (what a user types)."""
        prefix = id_prefix.strip().lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise NotInStoreError(f"'{id_prefix}' is not a job id (8 hex characters, or the start of one)")
        with self._read() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id", (prefix, prefix + "g"))]
            if len(ids) != 1:
                if not ids:
                    raise NotInStoreError(f"no job {id_prefix}; `dqr-xnat status` lists the jobs")
                raise NotInStoreError(f"'{id_prefix}' matches {len(ids)} jobs ({', '.join(ids[:5])}"
                                      f"{'...' if len(ids) > 5 else ''}); type more characters")
            job = _job(conn, ids[0])
            assert job is not None
            return job

    def list_jobs(
        self,
        states: Collection[JobState] | None = None,
        *,
        project: str | None = None,
        path: str | None = None,
    ) -> list[Job]:
        """Jobs in creation order, optionally only in ``states`` / of a project / for an inbox path."""
        where, args = _job_filters(states, project, path)
        with self._read() as conn:
            ids = [r[0] for r in conn.execute(f"SELECT id FROM jobs{where} ORDER BY rowid", args)]
            return [job for job_id in ids if (job := _job(conn, job_id)) is not None]

    def set_job_state(
        self,
        job_id: str,
        state: JobState,
        message: str | None = None,
        *,
        totals: Mapping[str, int] | None = None,
        csv_encoding: str | None = None,
    ) -> Job:
        """Record the job's state (``finished`` is set when it is final); None leaves a field alone."""
        with self._write() as conn:
            _require_job(conn, job_id)
            _store_job_state(conn, job_id, JobState(state), message)
            if totals is not None:
                conn.execute("UPDATE jobs SET totals = ? WHERE id = ?", (_json(dict(totals)), job_id))
            if csv_encoding is not None:
                conn.execute("UPDATE jobs SET csv_encoding = ? WHERE id = ?", (csv_encoding, job_id))
            return _job(conn, job_id)  # type: ignore[return-value]

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: what no process holds stops now, the rest at the worker's next check.

        Unowned PENDING/RETRIEVED/RELABELED studies become CANCELED (their staging directories,
        if any, are for the pipeline to delete); studies a live process holds finish their step;
        an interrupted UPLOADING study is left for the XNAT check (it may have landed). Rows not
        queried yet keep status None with a message saying why. A final job is left as it is.
        """
        now = _iso(_now())
        with self._write() as conn:
            job = _require_job(conn, job_id)
            if job.state.final:
                return job
            conn.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id))
            conn.execute(
                "UPDATE studies SET state = ?, message = 'cancelled', updated = ? WHERE job_id = ?"
                " AND claimed_by IS NULL AND state IN (?, ?, ?, ?)",
                (StudyState.CANCELED.value, now, job_id, StudyState.PENDING.value,
                 StudyState.RETRIEVING.value, StudyState.RETRIEVED.value, StudyState.RELABELED.value),
            )
            _cancel_pending_rows(conn, job_id, now)
            _store_job_state(conn, job_id, _derive(conn, job_id), None)
            return _job(conn, job_id)  # type: ignore[return-value]

    def is_cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def cancel_pending_rows(self, job_id: str) -> int:
        """Give every row not queried yet the 'cancelled' message; returns how many."""
        with self._write() as conn:
            return _cancel_pending_rows(conn, job_id, _iso(_now()))

    def job_progress(self, job_id: str) -> JobProgress:
        with self._read() as conn:
            _require_job(conn, job_id)
            return _progress(conn, job_id)

    def derive_job_state(self, job_id: str) -> JobState:
        """The job's state as its rows and studies say (rules in :func:`_derive`)."""
        with self._read() as conn:
            return _derive(conn, job_id)

    def refresh_job_state(self, job_id: str, message: str | None = None) -> Job:
        """Derive the job's state and store it, atomically."""
        with self._write() as conn:
            _store_job_state(conn, job_id, _derive(conn, job_id), message)
            return _job(conn, job_id)  # type: ignore[return-value]

    # -------------------------------------------------------------------- rows

    def add_rows(self, job_id: str, rows: Iterable[CsvRow]) -> int:
        """Store the job's valid CSV rows (not queried yet). Idempotent: known lines are kept."""
        now = _iso(_now())
        with self._write() as conn:
            _require_job(conn, job_id)
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO rows (job_id, line, query, relabel, subject, session, updated)"
                " VALUES (?,?,?,?,?,?,?)",
                ((job_id, r.line, _json(dict(r.query)), _json(dict(r.relabel)), r.subject, r.session, now)
                 for r in rows),
            )
            return conn.total_changes - before

    def add_error_rows(self, job_id: str, problems: Iterable[CsvProblem]) -> int:
        """Store the CSV's invalid lines as ERROR rows (one per line, messages joined)."""
        by_line: dict[int, list[str]] = {}
        for problem in problems:
            if problem.line is not None:
                by_line.setdefault(problem.line, []).append(
                    f'column "{problem.column}": {problem.message}' if problem.column else problem.message)
        now = _iso(_now())
        with self._write() as conn:
            _require_job(conn, job_id)
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO rows (job_id, line, status, message, updated) VALUES (?,?,?,?,?)",
                ((job_id, line, RowStatus.ERROR.value, "; ".join(msgs), now)
                 for line, msgs in sorted(by_line.items())),
            )
            return conn.total_changes - before

    def set_row_result(
        self,
        job_id: str,
        line: int,
        status: RowStatus,
        message: str,
        *,
        dropped: int = 0,
        duplicate_of: int | None = None,
    ) -> RowRecord:
        with self._write() as conn:
            _set_row(conn, job_id, line, RowStatus(status), message, dropped, duplicate_of)
            return _row(conn, job_id, line)

    def record_row(
        self,
        job_id: str,
        match: RowMatch,
        studies: Sequence[NewStudy] = (),
        *,
        state: StudyState = StudyState.PENDING,
    ) -> list[StudyRecord]:
        """A row's decision and its studies in one transaction, so a crash never splits them."""
        with self._write() as conn:
            _set_row(conn, job_id, match.line, match.status, match.message, match.dropped,
                     match.duplicate_of)
            return _add_studies(conn, job_id, match.line, studies, StudyState(state))

    def rows(self, job_id: str) -> list[RowRecord]:
        with self._read() as conn:
            return [_row_from(r) for r in conn.execute(
                "SELECT * FROM rows WHERE job_id = ? ORDER BY line", (job_id,))]

    def pending_rows(self, job_id: str) -> list[RowRecord]:
        """Rows not queried yet: what a resumed job still has to query."""
        with self._read() as conn:
            return [_row_from(r) for r in conn.execute(
                "SELECT * FROM rows WHERE job_id = ? AND status IS NULL ORDER BY line", (job_id,))]

    def row_status(self, job_id: str, line: int) -> RowStatus | None:
        row = self._conn().execute(
            "SELECT status FROM rows WHERE job_id = ? AND line = ?", (job_id, line)).fetchone()
        return RowStatus(row[0]) if row and row[0] else None

    # -------------------------------------------------------------------- studies

    def add_studies(
        self,
        job_id: str,
        line: int,
        studies: Sequence[NewStudy],
        *,
        state: StudyState = StudyState.PENDING,
    ) -> list[StudyRecord]:
        """Record matched studies of a row; a study already in the job is kept as it is.

        Studies added to a job whose cancel was requested are stored CANCELED.

        Returns the stored record of every distinct given study, new or not (idempotent on resume).
        """
        with self._write() as conn:
            return _add_studies(conn, job_id, line, studies, StudyState(state))

    def get_study(self, study_id: int) -> StudyRecord:
        with self._read() as conn:
            return _require_study(conn, study_id)

    def studies(self, job_id: str, *, line: int | None = None) -> list[StudyRecord]:
        sql, args = "SELECT * FROM studies WHERE job_id = ?", [job_id]
        if line is not None:
            sql, args = sql + " AND line = ?", [job_id, line]
        with self._read() as conn:
            return [_study_from(r) for r in conn.execute(sql + " ORDER BY line, id", args)]

    def unfinished_studies(self, job_id: str | None = None) -> list[StudyRecord]:
        """Non-final studies of import jobs (all jobs, or one), in first-come order."""
        finals = [s.value for s in StudyState if s.final]
        sql = (f"SELECT s.* FROM studies s JOIN jobs j ON j.id = s.job_id WHERE j.mode = ?"
               f" AND s.state NOT IN ({','.join('?' * len(finals))})")
        args: list[Any] = [JobMode.IMPORT.value, *finals]
        if job_id is not None:
            sql += " AND s.job_id = ?"
            args.append(job_id)
        with self._read() as conn:
            return [_study_from(r) for r in conn.execute(sql + " ORDER BY j.rowid, s.line, s.id", args)]

    def claimed_studies(self, job_id: str) -> dict[str, int]:
        """StudyInstanceUID → the CSV line that claims it in this job (csv-language's duplicate rule).

        "Claims" here is the CSV's sense (which row imports the study), not a worker claim.
        """
        with self._read() as conn:
            return {r[0]: r[1] for r in conn.execute(
                "SELECT study_uid, line FROM studies WHERE job_id = ? ORDER BY line DESC", (job_id,))}

    def claim_study(
        self,
        state_from: StudyState | Collection[StudyState],
        state_to: StudyState,
        *,
        pacs: str | None = None,
        job_id: str | None = None,
        max_active: int | None = None,
    ) -> StudyRecord | None:
        """Atomically take the oldest unowned study in ``state_from``, move it to ``state_to``.

        Only studies of import jobs that are not final nor cancelled (except UPLOADING ones: XNAT
        must still confirm them), and whose ``retry_after`` has passed. ``max_active`` (needs ``pacs``): claim nothing while that many studies of
        jobs on that PACS are already owned in ``state_to``, an association limit that holds
        across processes. The caller owns the study until it sets another state
        (:meth:`set_study_state`) or :meth:`release_study`.
        """
        if max_active is not None and pacs is None:
            raise ValueError("max_active needs pacs")
        sources = [state_from] if isinstance(state_from, StudyState) else list(state_from)
        now = _iso(_now())
        with self._write() as conn:
            if max_active is not None and _owned_on_pacs(conn, pacs or "", state_to) >= max_active:
                return None
            study_id = _next_claimable(conn, sources, now, pacs, job_id)
            if study_id is None:
                return None
            conn.execute("UPDATE studies SET state = ?, claimed_by = ?, updated = ? WHERE id = ?",
                         (StudyState(state_to).value, self.owner, now, study_id))
            return _require_study(conn, study_id)

    def release_study(self, study_id: int) -> StudyRecord:
        """Give a claimed study back without changing its state (e.g. the PACS window closed)."""
        with self._write() as conn:
            conn.execute("UPDATE studies SET claimed_by = NULL, updated = ? WHERE id = ?",
                         (_iso(_now()), study_id))
            return _require_study(conn, study_id)

    def set_study_state(
        self,
        study_id: int,
        state: StudyState,
        *,
        labels: XnatLabels | None = None,
        keep_claim: bool = False,
        **values: Any,
    ) -> StudyRecord:
        """Move a study to ``state`` and set any of its fields (names as in StudyRecord).

        Ownership: entering RETRIEVING or UPLOADING makes this process the owner; any other state
        releases the study unless ``keep_claim``. Leaving UPLOADING clears ``interrupted``.
        ``labels`` sets xnat_project/subject/session/label_fallback at once.
        """
        if labels is not None:
            values.update(xnat_project=labels.project, subject=labels.subject,
                          session=labels.session, label_fallback=labels.fallback)
        with self._write() as conn:
            _set_state(conn, _require_study(conn, study_id), StudyState(state), values,
                       owner=self.owner, keep_claim=keep_claim)
            return _require_study(conn, study_id)

    def update_study(self, study_id: int, **values: Any) -> StudyRecord:
        """Set fields (e.g. the received count during a retrieval) without touching state or owner."""
        with self._write() as conn:
            _require_study(conn, study_id)
            _update_study(conn, study_id, {**values, "updated": _iso(_now())})
            return _require_study(conn, study_id)

    def record_attempt(
        self,
        study_id: int,
        error: str,
        *,
        state: StudyState | None = None,
        retry_in: float | None = None,
    ) -> StudyRecord:
        """Count a failed attempt: attempts + 1, ``last_error``; optionally a new state and delay.

        Without ``state`` the study keeps its state and owner (the caller decides next). With
        ``retry_in`` seconds, :meth:`claim_study` will not hand it out before then.
        """
        now = _now()
        values: dict[str, Any] = {"last_error": error, "updated": _iso(now)}
        if retry_in is not None:
            values["retry_after"] = _iso(now + timedelta(seconds=retry_in))
        with self._write() as conn:
            current = _require_study(conn, study_id)
            conn.execute("UPDATE studies SET attempts = attempts + 1 WHERE id = ?", (study_id,))
            if state is None:
                _update_study(conn, study_id, values)
            else:
                _set_state(conn, current, StudyState(state), values, owner=self.owner)
            return _require_study(conn, study_id)

    def reset_interrupted(self, *, force: bool = False) -> list[StudyRecord]:
        """Apply the resume rules (module docstring) to studies whose owner process is gone.

        ``force`` treats every owner as gone: only for a start-up when no other dqr-xnat process
        uses this store (e.g. one on another host that this host cannot check). Returns the studies
        that were reset.
        """
        now = _iso(_now())
        with self._write() as conn:
            stale = [r for r in conn.execute(
                "SELECT id, state, claimed_by FROM studies WHERE claimed_by IS NOT NULL"
                " OR (state = ? ) OR (state = ? AND interrupted = 0)",
                (StudyState.RETRIEVING.value, StudyState.UPLOADING.value))
                if force or r["claimed_by"] is None or not _owner_alive(r["claimed_by"])]
            for r in stale:
                _resume(conn, r["id"], StudyState(r["state"]), now)
            reset = [_require_study(conn, r["id"]) for r in stale]
        if reset:
            log.warning("job store: %d interrupted studies reset for resumption (ids %s)",
                        len(reset), ", ".join(str(s.id) for s in reset[:20]))
        return reset

    def landed(
        self,
        project: str,
        study_uid: str,
        subject: str,
        session: str,
        *,
        exclude_job: str | None = None,
    ) -> StudyRecord | None:
        """The DONE study of another job with this StudyInstanceUID and these labels in ``project``.

        Such a study is skipped unless the user asked to re-import. The record gives the job id,
        line and prearchive URL for the report.
        """
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM studies WHERE study_uid = ? AND xnat_project = ? AND subject = ?"
                " AND session = ? AND state = ? AND job_id != ? ORDER BY updated DESC LIMIT 1",
                (study_uid, project, subject, session, StudyState.DONE.value, exclude_job or ""),
            ).fetchone()
            return _study_from(row) if row else None


# ------------------------------------------------------------------------------------------------
# SQL helpers (each runs inside the caller's transaction)


def _new_job_id(conn: sqlite3.Connection) -> str:
    while True:
        job_id = secrets.token_hex(4)
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            return job_id


def _job_id_for_file(conn: sqlite3.Connection, project: str, path: str, digest: str) -> str | None:
    row = conn.execute("SELECT id FROM jobs WHERE project = ? AND path = ? AND digest = ?",
                       (project, path, digest)).fetchone()
    return row[0] if row else None


def _job_filters(
    states: Collection[JobState] | None, project: str | None, path: str | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if states is not None:
        values = [JobState(s).value for s in states]
        clauses.append(f"state IN ({','.join('?' * len(values))})" if values else "0")
        args += values
    for column, value in (("project", project), ("path", path)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _job(conn: sqlite3.Connection, job_id: str) -> Job | None:
    r = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if r is None:
        return None
    return Job(
        id=r["id"], project=r["project"], resource=r["resource"], path=r["path"],
        digest=r["digest"], mode=JobMode(r["mode"]), pacs=r["pacs"], reimport=bool(r["reimport"]),
        state=JobState(r["state"]), message=r["message"], created=_parse(r["created"]),  # type: ignore[arg-type]
        updated=_parse(r["updated"]), finished=_parse(r["finished"]),  # type: ignore[arg-type]
        cancel_requested=bool(r["cancel_requested"]), csv_encoding=r["csv_encoding"],
        totals=json.loads(r["totals"]),
    )


def _require_job(conn: sqlite3.Connection, job_id: str) -> Job:
    job = _job(conn, job_id)
    if job is None:
        raise NotInStoreError(f"no job {job_id} in the job store")
    return job


def _store_job_state(conn: sqlite3.Connection, job_id: str, state: JobState, message: str | None) -> None:
    now = _iso(_now())
    conn.execute(
        "UPDATE jobs SET state = ?, message = COALESCE(?, message), updated = ?,"
        " finished = CASE WHEN ? THEN COALESCE(finished, ?) ELSE NULL END WHERE id = ?",
        (state.value, message, now, int(state.final), now, job_id),
    )


def _cancel_pending_rows(conn: sqlite3.Connection, job_id: str, now: str) -> int:
    return conn.execute(
        "UPDATE rows SET message = ?, updated = ? WHERE job_id = ? AND status IS NULL",
        (CANCELLED_ROW_MESSAGE, now, job_id)).rowcount


def _set_row(
    conn: sqlite3.Connection, job_id: str, line: int, status: RowStatus, message: str,
    dropped: int, duplicate_of: int | None,
) -> None:
    changed = conn.execute(
        "UPDATE rows SET status = ?, message = ?, dropped = ?, duplicate_of = ?, updated = ?"
        " WHERE job_id = ? AND line = ?",
        (RowStatus(status).value, message, dropped, duplicate_of, _iso(_now()), job_id, line),
    ).rowcount
    if not changed:
        raise NotInStoreError(f"job {job_id} has no row at line {line}")


def _row(conn: sqlite3.Connection, job_id: str, line: int) -> RowRecord:
    return _row_from(conn.execute("SELECT * FROM rows WHERE job_id = ? AND line = ?",
                                  (job_id, line)).fetchone())


def _row_from(r: sqlite3.Row) -> RowRecord:
    return RowRecord(
        job_id=r["job_id"], line=r["line"], status=RowStatus(r["status"]) if r["status"] else None,
        message=r["message"], query=json.loads(r["query"]), relabel=json.loads(r["relabel"]),
        subject=r["subject"], session=r["session"], dropped=r["dropped"],
        duplicate_of=r["duplicate_of"], updated=_parse(r["updated"]),  # type: ignore[arg-type]
    )


def _add_studies(
    conn: sqlite3.Connection, job_id: str, line: int, studies: Sequence[NewStudy], state: StudyState
) -> list[StudyRecord]:
    if conn.execute("SELECT 1 FROM rows WHERE job_id = ? AND line = ?", (job_id, line)).fetchone() is None:
        raise NotInStoreError(f"job {job_id} has no row at line {line}; add the rows first")
    if _require_job(conn, job_id).cancel_requested:
        state = StudyState.CANCELED  # a cancelled job takes no new work
    now = _iso(_now())
    for s in studies:
        conn.execute(
            "INSERT OR IGNORE INTO studies (job_id, line, study_uid, info, state, session_suffix,"
            " unverified, series_uids, series_expected, expected, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (job_id, line, s.info.study_instance_uid, _info_json(s.info), state.value,
             s.session_suffix, _json(list(s.unverified)), _json(list(s.series_uids)),
             s.series_expected, s.expected, now),
        )
    uids = dict.fromkeys(s.info.study_instance_uid for s in studies)
    return [_study_from(conn.execute("SELECT * FROM studies WHERE job_id = ? AND study_uid = ?",
                                     (job_id, uid)).fetchone()) for uid in uids]


def _study_from(r: sqlite3.Row) -> StudyRecord:
    return StudyRecord(
        id=r["id"], job_id=r["job_id"], line=r["line"], study_uid=r["study_uid"],
        info=_info_from(r["info"]), state=StudyState(r["state"]), message=r["message"],
        attempts=r["attempts"], last_error=r["last_error"], xnat_project=r["xnat_project"],
        subject=r["subject"], session=r["session"], label_fallback=r["label_fallback"],
        session_suffix=r["session_suffix"], expected=r["expected"], received=r["received"],
        uploaded=r["uploaded"], series_expected=r["series_expected"],
        series_uids=tuple(json.loads(r["series_uids"])), prearchive_url=r["prearchive_url"],
        staging_dir=r["staging_dir"], unverified=tuple(json.loads(r["unverified"])),
        claimed_by=r["claimed_by"], interrupted=bool(r["interrupted"]),
        retry_after=_parse(r["retry_after"]), updated=_parse(r["updated"]),  # type: ignore[arg-type]
    )


def _require_study(conn: sqlite3.Connection, study_id: int) -> StudyRecord:
    row = conn.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
    if row is None:
        raise NotInStoreError(f"no study {study_id} in the job store")
    return _study_from(row)


def _update_study(conn: sqlite3.Connection, study_id: int, values: Mapping[str, Any]) -> None:
    """UPDATE with column names checked against a fixed list (they are interpolated into SQL)."""
    allowed = _STUDY_FIELDS | {"state", "claimed_by", "interrupted", "updated"}
    unknown = set(values) - allowed
    if unknown:
        raise TypeError(f"unknown study field(s): {', '.join(sorted(unknown))}")
    encoded = {k: _encode_study_value(k, v) for k, v in values.items()}
    assignments = ", ".join(f"{k} = ?" for k in encoded)
    conn.execute(f"UPDATE studies SET {assignments} WHERE id = ?", (*encoded.values(), study_id))


def _set_state(
    conn: sqlite3.Connection,
    current: StudyRecord,
    state: StudyState,
    values: Mapping[str, Any],
    *,
    owner: str,
    keep_claim: bool = False,
) -> None:
    """The ownership rules of a state change (see JobStore.set_study_state)."""
    if state in ACTIVE_STATES:
        claimed_by: str | None = owner
    else:
        claimed_by = current.claimed_by if keep_claim else None
    interrupted = current.interrupted and state is StudyState.UPLOADING
    _update_study(conn, current.id, {"updated": _iso(_now()), **values, "state": state.value,
                                     "claimed_by": claimed_by, "interrupted": int(interrupted)})


def _encode_study_value(key: str, value: Any) -> Any:
    if key in ("series_uids", "unverified"):
        return _json(list(value or ()))
    if key == "info":
        return _info_json(value)
    if key == "retry_after" and isinstance(value, datetime):
        return _iso(value)
    if key == "state":
        return StudyState(value).value
    return value


def _next_claimable(
    conn: sqlite3.Connection, sources: Sequence[StudyState], now: str, pacs: str | None, job_id: str | None
) -> int | None:
    finals = [s.value for s in JobState if s.final]
    sql = (f"SELECT s.id FROM studies s JOIN jobs j ON j.id = s.job_id"
           f" WHERE s.state IN ({','.join('?' * len(sources))}) AND s.claimed_by IS NULL"
           f" AND j.mode = ? AND j.state NOT IN ({','.join('?' * len(finals))})"
           f" AND (j.cancel_requested = 0 OR s.state = ?)"  # an upload must still be confirmed
           f" AND (s.retry_after IS NULL OR s.retry_after <= ?)")
    args: list[Any] = [*(StudyState(s).value for s in sources), JobMode.IMPORT.value, *finals,
                       StudyState.UPLOADING.value, now]
    for column, value in (("j.pacs", pacs), ("s.job_id", job_id)):
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    row = conn.execute(sql + " ORDER BY j.rowid, s.line, s.id LIMIT 1", args).fetchone()
    return row[0] if row else None


def _owned_on_pacs(conn: sqlite3.Connection, pacs: str, state: StudyState) -> int:
    return conn.execute(
        "SELECT count(*) FROM studies s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.pacs = ? AND s.state = ? AND s.claimed_by IS NOT NULL",
        (pacs, StudyState(state).value)).fetchone()[0]


def _resume(conn: sqlite3.Connection, study_id: int, state: StudyState, now: str) -> None:
    """The resume rule for one study whose owner died (module docstring)."""
    new_state = StudyState.PENDING if state is StudyState.RETRIEVING else state
    conn.execute(
        "UPDATE studies SET state = ?, claimed_by = NULL, interrupted = ?, attempts = attempts + 1,"
        " last_error = ?, updated = ? WHERE id = ?",
        (new_state.value, int(state is StudyState.UPLOADING),
         f"interrupted while {state.value}: the process working on it stopped", now, study_id),
    )


def _progress(conn: sqlite3.Connection, job_id: str) -> JobProgress:
    rows = {(status or PENDING_ROW): n for status, n in conn.execute(
        "SELECT status, count(*) FROM rows WHERE job_id = ? GROUP BY status", (job_id,))}
    studies = {state: n for state, n in conn.execute(
        "SELECT state, count(*) FROM studies WHERE job_id = ? GROUP BY state", (job_id,))}
    owned = conn.execute(
        "SELECT count(*) FROM studies WHERE job_id = ? AND (claimed_by IS NOT NULL OR state IN (?, ?))",
        (job_id, StudyState.RETRIEVING.value, StudyState.UPLOADING.value)).fetchone()[0]
    return JobProgress(rows=_frozen(rows), studies=_frozen(studies), owned=owned)


def _derive(conn: sqlite3.Connection, job_id: str) -> JobState:
    """ADIT-style job state from its rows and studies.

    * cancel requested: RUNNING while a process still holds a study (or one sits in UPLOADING,
      which XNAT must confirm), else CANCELED;
    * no rows yet: the job's current state (the file is being read, or was refused as a whole);
    * something left to do (a row not queried, a study not final; a preview's studies do not
      count): WAITING stays WAITING while nothing is held, RUNNING once anything has started,
      otherwise PENDING;
    * all final: FAILED if a row is ERROR / NO_MATCH / AMBIGUOUS or a study FAILED or CANCELED,
      else DONE.
    """
    job = _require_job(conn, job_id)
    progress = _progress(conn, job_id)
    if job.cancel_requested:
        return JobState.RUNNING if progress.owned else JobState.CANCELED
    if not progress.rows:
        return job.state
    studies = progress.studies if job.mode is JobMode.IMPORT else {}
    unfinished = sum(n for s, n in studies.items() if not StudyState(s).final)
    if progress.rows.get(PENDING_ROW, 0) or unfinished:
        if job.state is JobState.WAITING and not progress.owned:
            return JobState.WAITING
        started = (progress.owned or job.state is JobState.RUNNING
                   or progress.total_rows > progress.rows.get(PENDING_ROW, 0))
        return JobState.RUNNING if started else JobState.PENDING
    failed_rows = any(progress.rows.get(s.value) for s in FAILED_ROW_STATUSES)
    failed_studies = studies.get(StudyState.FAILED.value) or studies.get(StudyState.CANCELED.value)
    return JobState.FAILED if failed_rows or failed_studies else JobState.DONE
