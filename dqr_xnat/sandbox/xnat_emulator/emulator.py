"""The public face of the XNAT emulator: start/stop, accounts, projects, faults and test helpers.

``XnatEmulator`` serves xnat-contract.md §7 on ``127.0.0.1`` (ephemeral port) in a background
thread. Tests set state up through methods here (users, projects, roles, files, configs) and look
at what landed (``prearchive_sessions``: records with the on-disk DICOM), while the product talks
to it only over HTTP through xnatpy, exactly as it would to a real XNAT.
"""

from __future__ import annotations

import logging
import re
import ssl
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from . import routes
from .server import EmulatorHTTPServer, Request, Response, status_page, text
from .store import (
    ROLES,
    HttpError,
    Store,
    safe_relative_path,
    xnat_datetime,
)

log = logging.getLogger("dqr_xnat.sandbox.xnat_emulator")


class RequestRecord(NamedTuple):
    """One line of the request log: (method, path, query, status). ``path`` is as the client sent it."""

    method: str
    path: str
    query: dict[str, str]
    status: int


@dataclass
class Fault:
    """An injected answer: ``status`` (None = answer normally) after ``delay`` seconds, ``times`` times.

    ``delay_after`` holds a normal answer back for that long *after* the request was processed (the
    work is done and logged, the client waits): e.g. a client killed between XNAT storing a study
    and the client learning it did.
    """

    method: str
    pattern: re.Pattern[str]
    status: int | None
    times: int | None  # None = every time
    delay: float
    hits: int = 0
    delay_after: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and self.pattern.search(path) is not None \
            and (self.times is None or self.hits < self.times)


@dataclass(frozen=True)
class PrearchiveRecord:
    """A snapshot of one prearchive session, with the directory holding its DICOM files."""

    project: str
    timestamp: str
    folder: str
    subject: str
    study_instance_uid: str
    status: str
    uploader: str
    uploaded: str
    url: str  # /data/prearchive/projects/P/TS/FOLDER, as the import service answers it
    directory: Path
    files: tuple[Path, ...]
    scans: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.folder


@dataclass(frozen=True)
class ArchiveRecord:
    project: str
    subject: str
    label: str
    study_instance_uid: str
    uri: str
    directory: Path
    files: tuple[Path, ...]


class XnatEmulator:
    """A loopback XNAT 1.8 good enough for xnatpy and the product (see xnat-contract.md §7)."""

    def __init__(self, root_dir: Path | str, *, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context`` (a server-side context with a certificate loaded) serves HTTPS instead."""
        self.root_dir = Path(root_dir)
        self._ssl_context = ssl_context
        self.store = Store(self.root_dir)
        self._address = (host, port)
        self._server: EmulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "XnatEmulator":
        if self._server is not None:
            return self
        self._server = EmulatorHTTPServer(self._address, self._handle, self.root_dir / "tmp")
        if self._ssl_context is not None:  # handshake in the connection's thread, not in accept()
            self._server.socket = self._ssl_context.wrap_socket(self._server.socket, server_side=True,
                                                                do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="xnat-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "XnatEmulator":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the XNAT emulator is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ accounts and projects

    def add_user(self, login: str, password: str, admin: bool = False) -> None:
        self.store.add_user(login, password, admin=admin)

    def add_project(self, project: str, owner: str | None = None, *, name: str | None = None,
                    description: str = "") -> None:
        """Create a project; raises ValueError for an ID XNAT would refuse (417)."""
        try:
            self.store.add_project(project, owner=owner, name=name, description=description)
        except HttpError as exc:
            raise ValueError(f"invalid XNAT project ID {project!r}: {exc.message}") from None

    def grant(self, project: str, login: str, role: str | None) -> None:
        """Give ``login`` a role in ``project``: owner/member (read+write) or collaborator (read); None removes it."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if project not in self.store.projects:
            raise ValueError(f"unknown project {project!r}: add_project() it first")
        self.store.grant(project, login, role)

    def expire_sessions(self) -> None:
        """Forget every JSESSION: the next cookie-only request gets 401 (client must log in again)."""
        self.store.expire_sessions()

    def issue_token(self, login: str) -> tuple[str, str]:
        """An alias token for ``login`` (alias, secret), valid for ``token_lifetime`` seconds."""
        token = self.store.issue_token(login)
        return token.alias, token.secret

    @property
    def token_lifetime(self) -> float:
        return self.store.token_lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: float) -> None:
        self.store.token_lifetime = seconds

    @property
    def session_timeout(self) -> float:
        return self.store.session_timeout

    @session_timeout.setter
    def session_timeout(self, seconds: float) -> None:
        self.store.session_timeout = seconds

    @property
    def receiving_idle(self) -> float | None:
        """Seconds after the last file before a RECEIVING session becomes READY (None: never by itself)."""
        return self.store.receiving_idle

    @receiving_idle.setter
    def receiving_idle(self, seconds: float | None) -> None:
        self.store.receiving_idle = seconds

    @property
    def unassigned_visible_to_uploader(self) -> bool:
        """Whether a non-admin sees (and may delete) the Unassigned sessions it uploaded itself."""
        return self.store.unassigned_visible_to_uploader

    @unassigned_visible_to_uploader.setter
    def unassigned_visible_to_uploader(self, value: bool) -> None:
        self.store.unassigned_visible_to_uploader = value

    # ------------------------------------------------------------------ faults and the request log

    def inject(self, method: str, path_regex: str, status: int | None = 500, times: int | None = 1,
               delay: float = 0.0, *, delay_after: float = 0.0) -> Fault:
        """Answer the next ``times`` matching requests with ``status`` after ``delay`` seconds.

        ``method`` may be ``*``; ``path_regex`` is searched in the path as sent; ``status=None``
        only delays; ``times=None`` applies forever (until :meth:`clear_faults`). ``delay_after``
        (with ``status=None``) processes and logs the request at once but sends the answer that
        many seconds later.
        """
        fault = Fault(method.upper(), re.compile(path_regex), status, times, delay, delay_after=delay_after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ looking at the state

    def prearchive_sessions(self, project: str | None = None) -> list[PrearchiveRecord]:
        """Prearchive sessions (all, or one project's, ``Unassigned`` included) with their files."""
        with self.store.lock:
            return [PrearchiveRecord(
                project=s.project, timestamp=s.timestamp, folder=s.folder, subject=s.subject,
                study_instance_uid=s.tag, status=s.status, uploader=s.uploader,
                uploaded=xnat_datetime(s.uploaded), url="/data" + s.url, directory=s.directory,
                files=tuple(s.files()), scans=tuple(s.scans),
            ) for s in self.store.prearchive_of(project)]

    def archived_sessions(self, project: str | None = None) -> list[ArchiveRecord]:
        with self.store.lock:
            return [ArchiveRecord(a.project, a.subject, a.label, a.tag, a.uri, a.directory,
                                  tuple(sorted(p for p in a.directory.rglob("*") if p.is_file())))
                    for a in self.store.archive if project is None or a.project == project]

    def finish_receiving(self, project: str | None = None) -> int:
        """Turn RECEIVING sessions READY now, as XNAT's rebuilder does after 5 idle minutes."""
        return self.store.finish_receiving(project)

    def set_prearchive_status(self, project: str, folder: str, status: str) -> None:
        """Force a session's status (READY, CONFLICT, ERROR, RECEIVING) to test a client's handling."""
        with self.store.lock:
            for session in self.store.prearchive:
                if session.project == project and session.folder == folder:
                    session.receiving = status == "RECEIVING"
                    session.conflict = status == "CONFLICT"
                    session.error = status == "ERROR"

    def put_resource_file(self, project: str, resource: str, path: str, data: bytes) -> None:
        """Place a file in a project resource (created if missing), as if a user uploaded it."""
        with self.store.lock:
            proj = self.store.projects[project]
            res = self.store.find_resource(proj, resource) or self.store.create_resource(proj, resource)
            with tempfile.NamedTemporaryFile(dir=self.root_dir / "tmp", delete=False) as out:
                out.write(data)
            self.store.store_file(res, safe_relative_path(path), Path(out.name), overwrite=True, meta={})

    def read_resource_file(self, project: str, resource: str, path: str) -> bytes:
        """The stored bytes of a resource file; KeyError if it does not exist."""
        with self.store.lock:
            proj = self.store.projects[project]
            res = self.store.find_resource(proj, resource)
            rel = safe_relative_path(path)
            if res is None or rel not in res.files:
                raise KeyError(f"{project}/{resource}/{path}")
            return (res.directory / rel).read_bytes()

    def resource_files(self, project: str, resource: str) -> list[str]:
        with self.store.lock:
            res = self.store.find_resource(self.store.projects[project], resource)
            return sorted(res.files) if res is not None else []

    def set_config(self, project: str | None, tool: str, path: str, contents: str, *,
                   status: str = "enabled") -> None:
        """Store a project (or site, with ``project=None``) configuration, as an owner would."""
        self.store.put_config(project, tool, path, contents, user="admin", status=status)

    def get_config(self, project: str | None, tool: str, path: str) -> str | None:
        versions = self.store.config_versions(project, tool, path)
        return versions[-1].contents if versions and versions[-1].status == "enabled" else None

    # ------------------------------------------------------------------ dispatch

    def _handle(self, req: Request) -> Response:
        fault = self._take_fault(req)
        response = self._answer(req, fault)
        with self._lock:
            self._log.append(RequestRecord(req.method, req.raw_path, dict(req.query), response.status))
        log.debug("%s %s -> %d", req.method, _route_name(req.path), response.status)
        if fault is not None and fault.delay_after:
            time.sleep(fault.delay_after)  # done and logged; only the answer is late
        return response

    def _answer(self, req: Request, fault: Fault | None) -> Response:
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                return status_page(fault.status, _reason(fault.status))
        try:
            self._authenticate(req)
            found = routes.match(req.path, req.method)
            protected = req.path.startswith(("/data", "/xapi")) and (found is None or not found[0].open)
            if protected and req.login is None:
                return status_page(401, "Authentication required.")
            if found is None:
                return text(404, f"No route for {req.method} {req.path}\n")
            route, params = found
            with self.store.lock:  # bodies are spooled and answers streamed outside the lock
                return route.handler(self.store, req, params)
        except HttpError as exc:
            return status_page(exc.status, exc.message)
        except Exception:  # noqa: BLE001 - an emulator bug must look like XNAT's 500, and be visible
            log.error("XNAT emulator error on %s %s:\n%s", req.method, _route_name(req.path),
                      traceback.format_exc())
            return status_page(500, "Internal emulator error.")

    def _take_fault(self, req: Request) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(req.method, req.raw_path):
                    fault.hits += 1
                    return fault
        return None

    def _authenticate(self, req: Request) -> None:
        """Cookie first, then Basic (login/password or token alias/secret, which opens a session)."""
        sid = req.cookies.get("JSESSIONID")
        if sid:
            req.login = self.store.session_user(sid)
        credentials = req.basic_credentials()
        if req.login is None and credentials is not None:
            user = self.store.check_basic(*credentials)
            if user is not None:
                routes.open_session(self.store, req, user)


def _reason(status: int) -> str:
    """Restlet's default page text for a status, e.g. "Internal Server Error"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _route_name(path: str) -> str:
    """The path with its variable parts elided, so debug logs carry no labels."""
    for route in routes.ROUTES:
        if route.pattern.fullmatch(path):
            return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route.pattern.pattern).replace("(?:", "(")
    return "(unmatched)"


__all__ = ["XnatEmulator", "RequestRecord", "Fault", "PrearchiveRecord", "ArchiveRecord"]
