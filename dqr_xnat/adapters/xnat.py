"""XNAT through xnatpy: login, project resource files, project configs, the import service and
the prearchive -- only the endpoints of xnat-contract.md, so the same code runs against real XNAT
1.8+ and the sandbox emulator.

Why it looks the way it does:

* ``xnat.connect(..., no_parse_model=True)`` always with a password (xnatpy prompts otherwise); a
  UUID-shaped ``xnat.user`` is an alias token and takes xnatpy's token path by itself.
* xnatpy's keep-alive heartbeat is switched off: a heartbeat failing in its thread cannot be caught.
  Instead any 401 (expired JSESSION) makes us log in again once and repeat the call.
* Every xnatpy/requests failure becomes an :mod:`dqr_xnat.errors` type: 401/403 ->
  :class:`XnatAuthError`, 408/429/5xx/timeouts/connection -> :class:`RetriableXnatError`, anything
  else -> :class:`XnatError`; each message names the project and says what to do. Secrets are
  registered with :func:`dqr_xnat.logs.register_secret` and never formatted into messages.
* Alias tokens expire (2 days by default): with ``auto_renew`` (the service) the client issues
  itself a fresh token at the first call and again after ``xnat.token_renew_fraction`` of its
  lifetime, in memory only (see :class:`XnatClient`). A restart uses the configured token again.
* TLS: ``xnat.verify_tls`` and ``xnat.ca_bundle`` are pinned on the session after login, because
  requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE in the environment override ``verify``
  (psf/requests#3829); without either setting the environment's trust store applies, as usual.
* Imports POST the zip with xnatpy's ``upload_stream`` rather than ``services.import_``: the latter
  folds a multi-line answer into one bogus URI and needs the object model for any non-prearchive
  answer, and we must read every line to catch XNAT's silent routing to ``Unassigned``.

Not thread-safe: give each thread or process its own client.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, Iterator, NamedTuple, TypeVar
from urllib.parse import quote

import requests
import xnat
from xnat import exceptions as xe
from xnat.session import BaseXNATSession, XNATSession

from dqr_xnat.config import XnatConfig
from dqr_xnat.errors import (
    DqrError,
    LabelError,
    RetriableXnatError,
    WrongProjectError,
    XnatAuthError,
    XnatError,
)
from dqr_xnat.logs import redact, register_secret
from dqr_xnat.model import UploadResult

log = logging.getLogger(__name__)

#: xnatpy's own log lines go here; ``setup_logging`` keeps the ``xnat`` tree at WARNING or above.
XNATPY_LOGGER = "xnat.dqr_xnat"
LABEL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_LABEL_LENGTH = 64
TOKEN_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
PREARCHIVE_RE = re.compile(r"^/data/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>[^/]+)/(?P<folder>[^/]+)$")
WRITE_ROLES = ("owner", "member")
#: Failures worth retrying: the network, not the request.
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                  xe.XNATConnectionError)
SERVER_TROUBLE = re.compile(r"internal server error|service unavailable|bad gateway|gateway time-?out|"
                            r"request time-?out|too many requests", re.IGNORECASE)
DEFAULT_MAX_READ = 64 * 1024 * 1024
#: XNAT's aliasTokenTimeout default, assumed when an issue answer has no estimatedExpirationTime.
DEFAULT_TOKEN_LIFETIME = 48 * 3600.0
#: A token is renewed at the latest this many seconds before it expires (a poll may come late).
RENEW_MARGIN = 15 * 60.0
#: After a failed renewal, wait this long before trying again (the current token still works).
RENEW_RETRY = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    """A file in a project resource; ``path`` is relative to the resource (may contain ``/``)."""

    path: str
    size: int
    digest: str  # MD5 as XNAT's catalog has it ("" if XNAT has none)
    uri: str


@dataclass(frozen=True)
class PrearchiveEntry:
    """One prearchive session as XNAT lists it; ``url`` is the ``/data/prearchive/...`` URL."""

    url: str
    project: str
    timestamp: str
    folder: str
    subject: str
    session: str
    study_instance_uid: str  # XNAT's "tag"
    status: str  # READY, RECEIVING, CONFLICT, ERROR, BUILDING, ...
    uploaded: str
    lastmod: str

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "PrearchiveEntry":
        url = row.get("url", "")
        return cls(
            url=url if url.startswith("/data") else "/data" + url,
            project=row.get("project", ""),
            timestamp=row.get("timestamp", ""),
            folder=row.get("folderName", ""),
            subject=row.get("subject", ""),
            session=row.get("name", "") or row.get("folderName", ""),
            study_instance_uid=row.get("tag", ""),
            status=row.get("status", ""),
            uploaded=row.get("uploaded", ""),
            lastmod=row.get("lastmod", ""),
        )


class IssuedToken(NamedTuple):
    """A new alias token; log in with ``user=alias``, password ``secret`` until ``expires_at``."""

    alias: str
    secret: str
    expires_at: datetime | None
    issued_at: datetime | None = None  # our clock just before asking (a lower bound)

    def renew_at(self, fraction: float, margin: float) -> datetime:
        """When to replace it: after ``fraction`` of its life, and at least ``margin`` s before it ends."""
        issued = self.issued_at or datetime.now(timezone.utc)
        expires = self.expires_at or issued + timedelta(seconds=DEFAULT_TOKEN_LIFETIME)
        return min(issued + (expires - issued) * fraction, expires - timedelta(seconds=margin))


def validate_label(kind: str, label: str) -> None:
    """Refuse a project/subject/session label XNAT would mangle or reject (xnat-contract.md §3)."""
    if not label:
        raise LabelError(f"the XNAT {kind} label is empty; every study needs a {kind} label")
    if len(label) > MAX_LABEL_LENGTH:
        raise LabelError(f"the XNAT {kind} label has {len(label)} characters; shorten it to at most "
                         f"{MAX_LABEL_LENGTH}")
    if not LABEL_RE.match(label):
        bad = "".join(sorted(set(re.sub(r"[A-Za-z0-9_-]", "", label))))
        raise LabelError(f"the XNAT {kind} label contains characters XNAT does not allow ({bad!r}); "
                         "use only letters, digits, '_' and '-'")


class XnatClient:
    """One logged-in XNAT account (user + password, or alias token) and the calls the service needs.

    Alias tokens expire (XNAT's default: after 2 days), so a long-running client renews its own:
    with ``auto_renew`` every call first checks :meth:`maybe_renew`. A renewal issues a fresh token
    with the current session, logs in with it, and switches to that session; the new secret is
    registered for log redaction and kept in memory only. The configured token's age is unknown, so
    it is replaced at the first call; tokens this client issued are replaced once
    ``config.token_renew_fraction`` of their lifetime has passed (and at least ``renew_margin``
    seconds before they expire). On 401 the client logs in again with its newest token, and with the
    configured one if that is refused. After a restart the configured token is used again: the admin
    must keep it valid (re-issue it before it expires) or use a password login.
    """

    def __init__(self, config: XnatConfig, *, xnatpy_logger: logging.Logger | None = None,
                 auto_renew: bool = False, renew_margin: float = RENEW_MARGIN,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.config = config
        self.auto_renew = auto_renew
        self.renew_margin = renew_margin
        self._clock = clock
        self._session: XNATSession | None = None
        self._retired: XNATSession | None = None  # the session before the last renewal
        self._token: IssuedToken | None = None  # the token we issued and use instead of the configured one
        self._next_try: datetime | None = None  # renewal back-off after a failure
        self._renew_lock = threading.Lock()
        self._xnatpy_logger = xnatpy_logger or logging.getLogger(XNATPY_LOGGER)

    # ------------------------------------------------------------------ session

    def __enter__(self) -> "XnatClient":
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def uses_token(self) -> bool:
        return bool(TOKEN_RE.match(self.config.user))

    @property
    def logged_in_user(self) -> str | None:
        """The XNAT login behind the session (for a token: the user the token belongs to)."""
        return self._session.logged_in_user if self._session is not None else None

    @property
    def token_expires_at(self) -> datetime | None:
        """When the token in use expires, if this client issued it (None: configured or password)."""
        return self._token.expires_at if self._token is not None else None

    def connect(self) -> None:
        """Log in (idempotent). Raises XnatAuthError, RetriableXnatError or XnatError."""
        if self._session is not None:
            return
        token = self._token
        if token is None:
            session = self._login(self.config.user, self._configured_secret())
        else:
            try:
                session = self._login(token.alias, token.secret)
            except XnatAuthError:
                log.warning("XNAT refused the alias token this service issued itself; logging in with the "
                            "configured one")
                self._token = None
                session = self._login(self.config.user, self._configured_secret())
        self._session = session
        log.info("logged in to XNAT at %s as %s", self.config.url,
                 self._account if self._token is None else "(alias token issued by this service)")
        if self.auto_renew:
            self.maybe_renew()

    def _configured_secret(self) -> str:
        if not self.config.user:
            raise XnatAuthError(f"no XNAT account configured for {self.config.url}: set xnat.user "
                                "(a login, or an alias token) and its password_env or password_file")
        secret = self.config.password()
        if not secret:
            raise XnatAuthError(f"no password for XNAT account {self._account}: set xnat.password_env or "
                                "xnat.password_file")
        register_secret(secret)
        if self.uses_token:
            register_secret(self.config.user)
        return secret

    def _login(self, user: str, secret: str) -> XNATSession:
        """A new xnatpy session for ``user``; failures translated (see :meth:`_login_error`)."""
        if not self.config.verify_tls:
            log.warning("TLS certificates of XNAT at %s are NOT verified (xnat.verify_tls: false); "
                        "give xnat.ca_bundle instead", self.config.url)
        try:
            with _tls_environment(self.config.verify_tls, self.config.ca_bundle):
                session = xnat.connect(
                    self.config.url, user=user, password=secret,
                    verify=self.config.verify_tls, no_parse_model=True, logger=self._xnatpy_logger,
                    default_timeout=self.config.timeout, pilot_timeout=min(self.config.timeout, 30.0),
                )
        except Exception as exc:  # noqa: BLE001 - translated, never leaked as xnatpy's type
            raise self._login_error(exc) from None
        _pin_tls(session.interface, self.config)
        session.keepalive = False
        return session

    def close(self) -> None:
        session, self._session = self._session, None
        retired, self._retired = self._retired, None
        for old in (session, retired):
            if old is not None:
                _drop(old)

    # ------------------------------------------------------------------ alias token renewal

    def renewal_due(self) -> bool:
        """Whether the alias token in use should be replaced now (never for a password login)."""
        if not self.uses_token:
            return False
        now = self._clock()
        if self._next_try is not None and now < self._next_try:
            return False
        if self._token is None:
            return True  # the configured token: its age is unknown
        return now >= self._token.renew_at(self.config.token_renew_fraction, self.renew_margin)

    def maybe_renew(self) -> bool:
        """Renew the alias token if due (see the class docstring); True if it did.

        Never raises for a failed renewal: the current token still works until it expires, so the
        failure is logged and retried after RENEW_RETRY seconds. Other threads do not wait for it.
        """
        if not self.renewal_due() or not self._renew_lock.acquire(blocking=False):
            return False
        try:
            if not self.renewal_due():
                return False
            return self._renew()
        finally:
            self._renew_lock.release()

    def _renew(self) -> bool:
        try:
            token = self._issue()
            session = self._login(token.alias, token.secret)
        except XnatError as exc:
            self._next_try = self._clock() + timedelta(seconds=RENEW_RETRY)
            expires = self.token_expires_at
            log.warning("could not renew the XNAT alias token (%s); the current one %s; retrying in %.0f s",
                        redact(str(exc) or type(exc).__name__),
                        f"expires {expires:%Y-%m-%d %H:%M} UTC" if expires else "has an unknown expiry",
                        RENEW_RETRY)
            return False
        # Switch; the old session is closed at the next renewal, so a call still using it can finish.
        previous, self._retired = self._retired, self._session
        self._session, self._token, self._next_try = session, token, None
        if previous is not None:
            _drop(previous)
        log.info("renewed the XNAT alias token; the new one expires %s",
                 f"{token.expires_at:%Y-%m-%d %H:%M} UTC" if token.expires_at else "at an unknown time")
        return True

    def _reconnect(self) -> None:
        log.info("XNAT session at %s expired; logging in again", self.config.url)
        self.close()
        self.connect()

    @property
    def _account(self) -> str:
        return "(alias token in xnat.user)" if self.uses_token else f"'{self.config.user}'"

    def _call(self, what: str, project: str, fn: Callable[[XNATSession], T], *, renew: bool = True) -> T:
        """Run ``fn`` on the session; on 401 log in again once; translate every failure."""
        for attempt in (1, 2):
            self.connect()
            if renew and self.auto_renew:
                self.maybe_renew()
            assert self._session is not None
            try:
                return fn(self._session)
            except DqrError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated below
                if _status(exc) == 401 and attempt == 1:
                    self._reconnect()
                    continue
                raise self._error(exc, what, project) from exc
        raise AssertionError("unreachable")

    def _get(self, what: str, project: str, path: str, *, missing: tuple[int, ...] = (),
             **kwargs: Any) -> requests.Response | None:
        """GET ``path``; None when XNAT answers one of the ``missing`` statuses."""
        def call(session: XNATSession) -> requests.Response | None:
            try:
                return session.get(path, **kwargs)
            except xe.XNATResponseError as exc:
                if exc.status_code in missing:
                    return None
                raise
        return self._call(what, project, call)

    # ------------------------------------------------------------------ projects

    def projects(self) -> list[str]:
        """IDs of the projects the account can see."""
        response = self._get("list the projects", "", "/data/projects", format="json")
        assert response is not None
        return sorted(row["ID"] for row in _rows(response))

    def project_exists(self, project: str) -> bool:
        """True if the project exists (403 counts: it exists, the account just cannot read it)."""
        def call(session: XNATSession) -> bool:
            try:
                session.get(f"/data/projects/{_q(project)}", format="json")
                return True
            except xe.XNATResponseError as exc:
                if exc.status_code in (403, 404):
                    return exc.status_code == 403
                raise
        return self._call("look up the project", project, call)

    def can_write(self, project: str) -> bool:
        """Whether the account may upload into ``project`` (owner or member role).

        Uses ``/xapi/access/projects`` (XNAT >= 1.8); where that does not exist it can only tell
        whether the project is visible, and the import's Unassigned check remains the safety net.
        """
        def call(session: XNATSession) -> Any:
            try:
                return session.get_json("/xapi/access/projects")
            except xe.XNATResponseError as exc:
                if exc.status_code == 404:
                    return None
                raise
        data = self._call("read the account's project roles", project, call)
        if data is None:
            return self.project_exists(project)
        roles = {str(x.get("ID")): str(x.get("role", "")) for x in data if isinstance(x, dict)}
        return _normalise_role(roles.get(project, "")) in WRITE_ROLES

    def ensure_writable(self, project: str) -> None:
        """Raise a clear error before uploading anything into a project the account cannot fill."""
        if self.can_write(project):
            return
        if not self.project_exists(project):
            raise XnatError(f"project '{project}' does not exist in XNAT at {self.config.url} (or account "
                            f"{self._account} cannot see it); check the project ID", project=project, status=404)
        raise XnatAuthError(f"account {self._account} cannot write to XNAT project '{project}'; a project owner "
                            "must give it member or owner access (Project > Manage > User access)",
                            project=project, status=403)

    # ------------------------------------------------------------------ resource files

    def list_files(self, project: str, resource: str) -> list[RemoteFile]:
        """The files of a project resource; [] if the resource does not exist (yet)."""
        response = self._get(f"list the files of resource '{resource}'", project,
                             f"{_resource_uri(project, resource)}/files", format="json", missing=(404,))
        if response is None:
            if not self.project_exists(project):
                raise XnatError(f"project '{project}' does not exist in XNAT at {self.config.url}; check the "
                                "project ID in the configuration", project=project, status=404)
            return []
        return [RemoteFile(path=_relative(row.get("URI", "")), size=int(row.get("Size") or 0),
                           digest=row.get("digest", ""), uri=row.get("URI", "")) for row in _rows(response)]

    def download_file(self, project: str, resource: str, path: str, dest: Path) -> Path:
        """Stream a resource file to ``dest`` (written to ``dest.part`` first, then renamed)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        uri = _file_uri(project, resource, path)

        def call(session: XNATSession) -> None:
            with open(partial, "wb") as fh:
                session.download_stream(uri, fh, timeout=self.config.timeout)
        try:
            self._call(f"download '{path}' from resource '{resource}'", project, call)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        return dest

    def read_file(self, project: str, resource: str, path: str, *, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        """A small resource file's bytes (e.g. a CSV); XnatError if it exceeds ``max_bytes``."""
        uri = _file_uri(project, resource, path)
        what = f"read '{path}' from resource '{resource}'"

        def call(session: XNATSession) -> bytes:
            chunks, total = [], 0
            for chunk in session.download_generator(uri, timeout=self.config.timeout):
                total += len(chunk)
                if total > max_bytes:
                    raise XnatError(f"'{path}' in resource '{resource}' of project '{project}' is larger than "
                                    f"{max_bytes} bytes; it cannot be read into memory", project=project)
                chunks.append(chunk)
            return b"".join(chunks)
        return self._call(what, project, call)

    def upload_file(self, project: str, resource: str, path: str, data: bytes | Path, *,
                    overwrite: bool = True) -> None:
        """Store a file in a project resource (created if needed), replacing it by default.

        XNAT answers 200 ``{"duplicates": [...]}`` and keeps the old file when ``overwrite`` is
        False; that is reported as an XnatError instead of passing silently.
        """
        uri = _file_uri(project, resource, path)

        def call(session: XNATSession) -> requests.Response:
            with _stream(data) as stream:
                return session.upload_stream(uri, stream, overwrite=overwrite, method="put",
                                             content_type="application/octet-stream", timeout=self.config.timeout)
        response = self._call(f"upload '{path}' to resource '{resource}'", project, call)
        if _duplicates(response):
            raise XnatError(f"'{path}' already exists in resource '{resource}' of project '{project}' and XNAT "
                            "kept the old file; upload with overwrite=True to replace it", project=project,
                            status=response.status_code)

    def delete_file(self, project: str, resource: str, path: str) -> bool:
        """Delete a resource file; False if it was not there."""
        uri = _file_uri(project, resource, path)

        def call(session: XNATSession) -> bool:
            try:
                session.delete(uri)
                return True
            except xe.XNATResponseError as exc:
                if exc.status_code == 404:
                    return False
                raise
        return self._call(f"delete '{path}' from resource '{resource}'", project, call)

    def read_project_config(self, project: str, tool: str, path: str) -> str | None:
        """A project configuration's contents (config service), None if missing or disabled."""
        response = self._get(f"read configuration '{tool}/{path}'", project,
                             f"/data/projects/{_q(project)}/config/{_q(tool)}/{quote(path, safe='/')}",
                             query={"contents": "true", "accept-not-found": "true"},
                             accepted_status=[200, 204], missing=(404,))
        if response is None or response.status_code == 204:
            return None
        return response.text

    # ------------------------------------------------------------------ import and prearchive

    def import_study(self, project: str, subject: str, session: str, zip_path: Path) -> UploadResult:
        """Upload one study's zip into the project's prearchive with explicit labels.

        Raises LabelError before sending anything, WrongProjectError if XNAT routed the study
        elsewhere (the misplaced session is deleted again), XnatError if the zip held several
        studies. A timeout may mean the study landed anyway: check :meth:`find_prearchive` first.
        """
        for kind, label in (("project", project), ("subject", subject), ("session", session)):
            validate_label(kind, label)
        zip_path = Path(zip_path)
        instances = _zip_members(zip_path, project)
        query = {"import-handler": "DICOM-zip", "dest": f"/prearchive/projects/{project}",
                 "project": project, "subject": subject, "session": session}

        def call(xs: XNATSession) -> str:
            with open(zip_path, "rb") as fh:
                response = xs.upload_stream("/data/services/import", fh, query=dict(query), method="post",
                                            content_type="application/zip", timeout=self.config.timeout)
            return response.text
        answer = self._call("import the study", project, call)
        urls = [line.strip() for line in answer.splitlines() if line.strip()]
        self._check_destination(project, urls)
        if len(urls) != 1:
            raise XnatError(f"XNAT made {len(urls)} prearchive sessions from one zip in project '{project}'; "
                            "each upload must hold exactly one study (StudyInstanceUID)", project=project)
        entry = self.prearchive_entry(urls[0])
        if entry is None:
            raise XnatError(f"XNAT accepted the study for project '{project}' but its prearchive session "
                            "cannot be read back; look for it in the project's prearchive", project=project)
        return UploadResult(prearchive_url=urls[0], project=project, status=entry.status, instances=instances)

    def _check_destination(self, project: str, urls: list[str]) -> None:
        """XNAT silently routes unplaceable studies to Unassigned: undo that and say so."""
        wrong = [u for u in urls if _url_project(u) != project]
        if not wrong:
            return
        places = sorted({_url_project(u) or u.split("?")[0] for u in wrong})
        problems = []
        for url in wrong:
            if PREARCHIVE_RE.match(url):
                try:
                    self.delete_prearchive(url)
                except XnatError as exc:
                    problems.append(str(exc))
            else:
                problems.append(f"{url} is not in the prearchive")
        log.warning("XNAT routed an upload for project %s to %s; removed: %s", project, places, not problems)
        cleanup = ("The misplaced session was deleted again." if not problems else
                   "It could not be deleted: ask an XNAT administrator to delete "
                   + ", ".join(wrong) + " from the prearchive.")
        raise WrongProjectError(
            f"XNAT put the study into '{', '.join(places)}' instead of project '{project}'; XNAT does this when "
            f"the project does not exist or account {self._account} cannot write to it. {cleanup} Check the "
            f"project ID and give the account member or owner access to '{project}', then import again.",
            project=project)

    def prearchive_entries(self, project: str) -> list[PrearchiveEntry]:
        """Every prearchive session of the project, RECEIVING ones included, oldest first."""
        response = self._get("list the prearchive", project, f"/data/prearchive/projects/{_q(project)}",
                             format="json")
        assert response is not None
        return sorted((PrearchiveEntry.from_row(row) for row in _rows(response)), key=lambda e: e.timestamp)

    def find_prearchive(self, project: str, study_uid: str) -> list[PrearchiveEntry]:
        """The project's prearchive sessions of this StudyInstanceUID (did an upload already land?)."""
        return [e for e in self.prearchive_entries(project) if e.study_instance_uid == study_uid]

    def prearchive_entry(self, url: str) -> PrearchiveEntry | None:
        """One prearchive session by its URL, read fresh (status changes); None if it is gone."""
        project = _url_project(url) or ""
        response = self._get("read a prearchive session", project, url, format="json", missing=(404,))
        if response is None:
            return None
        rows = _rows(response)
        return PrearchiveEntry.from_row(rows[0]) if rows else None

    def delete_prearchive(self, url: str) -> None:
        """Delete a prearchive session (prearchive delete service); already gone is fine."""
        project = _url_project(url) or ""

        def call(session: XNATSession) -> None:
            try:
                session.post("/data/services/prearchive/delete", query={"src": url})
            except xe.XNATResponseError as exc:
                if exc.status_code != 404:
                    raise
        self._call("delete a prearchive session", project, call)

    # ------------------------------------------------------------------ tokens

    def issue_token(self) -> IssuedToken:
        """A fresh alias token for the logged-in account (tokens expire, by default after 48 h)."""
        return self._issue()

    def _issue(self) -> IssuedToken:
        issued_at = self._clock()
        data = self._call("issue an alias token", "",
                          lambda s: s.get_json("/data/services/tokens/issue"), renew=False)
        if not isinstance(data, dict) or not data.get("secret") or not data.get("alias"):
            raise XnatError(f"XNAT at {self.config.url} answered the token request without a token; check "
                            "that xnat.url is XNAT's base URL")
        register_secret(str(data["secret"]))
        register_secret(str(data["alias"]))
        expires = data.get("estimatedExpirationTime")
        expires_at = (datetime.fromtimestamp(int(expires) / 1000, tz=timezone.utc)
                      if str(expires or "").lstrip("-").isdigit() else None)
        return IssuedToken(str(data["alias"]), str(data["secret"]), expires_at, issued_at)

    # ------------------------------------------------------------------ error translation

    def _login_error(self, exc: Exception) -> XnatError:
        url = self.config.url
        if isinstance(exc, (requests.exceptions.SSLError, xe.XNATSSLError)):
            return XnatError(f"TLS to XNAT at {url} failed; check xnat.url, xnat.ca_bundle and xnat.verify_tls")
        if isinstance(exc, NETWORK_ERRORS):
            return RetriableXnatError(f"cannot reach XNAT at {url} ({type(exc).__name__}); check xnat.url and "
                                      "that XNAT is running; the service retries later")
        text = redact(str(exc))
        if isinstance(exc, xe.XNATExpiredCredentialsError):
            return XnatAuthError(f"the password of XNAT account {self._account} at {url} has expired; set a new "
                                 "one in XNAT and in the service's password file or variable", status=401)
        if isinstance(exc, xe.XNATAuthError) and (SERVER_TROUBLE.search(text) or "Could not determine" in text):
            return RetriableXnatError(f"XNAT at {url} failed during login ({text}); it may be restarting; the "
                                      "service retries later (check xnat.url if this persists)")
        if isinstance(exc, xe.XNATAuthError):
            return XnatAuthError(f"XNAT at {url} refused the login of account {self._account}: check xnat.user "
                                 f"and the secret in {self._secret_source}" + self._token_hint, status=401)
        if isinstance(exc, xe.XNATResponseError):
            return self._error(exc, "log in", "")
        return XnatError(f"logging in to XNAT at {url} failed ({type(exc).__name__}: {text}); check xnat.url")

    @property
    def _secret_source(self) -> str:
        if self.config.password_env:
            return f"environment variable {self.config.password_env}"
        return f"file {self.config.password_file}" if self.config.password_file else "the configuration"

    @property
    def _token_hint(self) -> str:
        return "; alias tokens expire (48 h by default): issue a new one" if self.uses_token else ""

    def _error(self, exc: BaseException, what: str, project: str) -> XnatError:
        where = f"project '{project}'" if project else f"XNAT at {self.config.url}"
        if isinstance(exc, NETWORK_ERRORS):
            return RetriableXnatError(f"could not {what} in {where}: XNAT at {self.config.url} did not answer "
                                      f"({type(exc).__name__}); the service retries later", project=project)
        status = _status(exc)
        detail = _detail(exc)
        if status is None:
            return XnatError(f"could not {what} in {where}: {type(exc).__name__}: {detail}", project=project)
        message = f"XNAT refused to {what} in {where} (HTTP {status}{': ' + detail if detail else ''}); "
        if status == 401:
            return XnatAuthError(message + f"the session of account {self._account} was rejected; check its "
                                 f"secret in {self._secret_source}" + self._token_hint, project=project, status=status)
        if status == 403:
            return XnatAuthError(message + f"account {self._account} lacks permission; a project owner must give it "
                                 f"member or owner access to '{project or 'the project'}'", project=project,
                                 status=status)
        if status in (408, 429) or status >= 500:
            return RetriableXnatError(message + "XNAT may be busy or restarting; the service retries later",
                                      project=project, status=status)
        hint = {404: f"check that {where} and the path exist",
                409: "it already exists",
                417: "the project ID or a label has characters outside [A-Za-z0-9_-]"}.get(status, "see XNAT's log")
        return XnatError(message + hint, project=project, status=status)


# ------------------------------------------------------------------------------------------
# Helpers


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _resource_uri(project: str, resource: str) -> str:
    return f"/data/projects/{_q(project)}/resources/{_q(resource)}"


def _file_uri(project: str, resource: str, path: str) -> str:
    return f"{_resource_uri(project, resource)}/files/{quote(path.lstrip('/'), safe='/')}"


def _relative(uri: str) -> str:
    """The path inside the resource, as xnatpy derives it from a file row's URI."""
    return re.sub(r"^.*/resources/[^/]+/files/", "", uri, count=1)


def _rows(response: requests.Response) -> list[dict[str, str]]:
    try:
        rows = response.json()["ResultSet"]["Result"]
    except (ValueError, KeyError, TypeError):
        raise XnatError(f"XNAT answered {response.url.split('?')[0]} with something that is not an XNAT "
                        "listing; check xnat.url points to XNAT's base URL") from None
    return [r for r in rows if isinstance(r, dict)]


def _url_project(url: str) -> str | None:
    """The project segment of a prearchive or archive URL."""
    match = PREARCHIVE_RE.match(url)
    if match:
        return match["project"]
    match = re.match(r"^/data(?:/archive)?/projects/([^/]+)", url)
    return match.group(1) if match else None


def _normalise_role(role: str) -> str:
    """'Owners', 'owner', 'Members' ... -> 'owner' / 'member' (XNAT spells group roles both ways)."""
    role = role.strip().lower()
    return role[:-1] if role.endswith("s") else role


def _duplicates(response: requests.Response) -> bool:
    if not response.text.lstrip().startswith("{"):
        return False
    try:
        return bool(response.json().get("duplicates"))
    except (ValueError, AttributeError):
        return False


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, xe.XNATResponseError):
        return int(exc.status_code)
    if isinstance(exc, xe.XNATUploadError):
        match = re.search(r"Status code (\d{3})", str(exc))
        return int(match.group(1)) if match else None
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return None


def _detail(exc: BaseException) -> str:
    """The server's own words (Restlet's <h3>), short and redacted; never a request URL."""
    text = getattr(exc, "text", None) or str(exc)
    match = re.search(r"<h3>(.*?)</h3>", text, re.DOTALL)
    if match:
        text = match.group(1)
    elif isinstance(exc, xe.XNATUploadError):
        text = text.split("response text", 1)[-1]
    elif isinstance(exc, xe.XNATResponseError):
        text = exc.text
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()
    return redact(text[:200])


def _zip_members(zip_path: Path, project: str) -> int:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            return sum(1 for info in archive.infolist() if not info.is_dir())
    except (OSError, zipfile.BadZipFile) as exc:
        raise XnatError(f"cannot read the study zip {zip_path} for project '{project}': {exc}",
                        project=project) from None


@contextlib.contextmanager
def _stream(data: bytes | Path) -> Iterator[IO[bytes]]:
    if isinstance(data, (bytes, bytearray)):
        yield io.BytesIO(bytes(data))
    else:
        with open(data, "rb") as fh:
            yield fh


_ca_lock = threading.Lock()
#: requests lets these variables override ``Session.verify`` (psf/requests#3829).
CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@contextlib.contextmanager
def _tls_environment(verify_tls: bool, ca_bundle: str | None) -> Iterator[None]:
    """Make xnatpy's login requests verify as configured, for their duration.

    xnatpy builds its own requests.Session inside ``connect`` and requests lets REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE override that session's ``verify`` (so ``verify=False`` or our CA bundle would be
    ignored on hosts that set them). The variables are process-wide: changed under a lock, restored after.
    """
    if verify_tls and not ca_bundle:
        yield  # the default: the environment's trust store, as requests would use it
        return
    with _ca_lock:
        previous = {name: os.environ.get(name) for name in CA_ENV}
        for name in CA_ENV:
            os.environ.pop(name, None)
        if verify_tls and ca_bundle:
            os.environ["REQUESTS_CA_BUNDLE"] = ca_bundle
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _pin_tls(session: requests.Session, config: XnatConfig) -> None:
    """Fix the session's verification once, so later environment changes cannot alter it.

    ``trust_env`` off stops the CA variables overriding ``verify`` (psf/requests#3829); the proxy
    for XNAT's URL (HTTPS_PROXY/NO_PROXY) is resolved now, since trust_env also controlled that.
    """
    if not config.verify_tls:
        verify: bool | str = False
    else:
        verify = config.ca_bundle or next((os.environ[n] for n in CA_ENV if os.environ.get(n)), True)
    session.proxies = requests.utils.get_environ_proxies(config.url)
    session.trust_env = False
    session.verify = verify


def _drop(session: XNATSession) -> None:
    """Log out; if that fails (e.g. the session already expired), still stop xnatpy's thread."""
    try:
        session.disconnect()
    except Exception:  # noqa: BLE001 - logging out of a dead session is not an error
        log.debug("XNAT logout failed; closing the connection anyway")
        BaseXNATSession.disconnect(session)
