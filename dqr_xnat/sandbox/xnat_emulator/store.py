"""The emulated XNAT's state: users, sessions, tokens, projects, resources, configs, prearchive.

Metadata lives in memory behind one lock; every file (resource files, landed DICOM) lives on disk
under the emulator's root directory, so tests can open exactly what a client uploaded. Nothing here
knows HTTP: the routes translate requests into these calls and :class:`HttpError` into statuses.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

#: XNAT's REST rule for project IDs (XftStringUtils.REGEX_VALID_ID).
PROJECT_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
ROLES = ("owner", "member", "collaborator")
WRITE_ROLES = ("owner", "member")
UNASSIGNED = "Unassigned"
DEFAULT_TOKEN_LIFETIME = 48 * 3600.0  # XNAT's aliasTokenTimeout default: 2 days
DEFAULT_SESSION_TIMEOUT = 15 * 60.0  # Tomcat/XNAT default session timeout


class HttpError(Exception):
    """An XNAT error answer: the routes turn it into ``status`` with ``message`` as the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def to_label_chars(value: str) -> str:
    """XNAT's ``Labels.toLabelChars``: every character outside ``[A-Za-z0-9_-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def xnat_timestamp(moment: datetime) -> str:
    """``PrearcUtils.makeTimestamp``: ``yyyyMMdd_HHmmssSSS``."""
    return moment.strftime("%Y%m%d_%H%M%S") + f"{moment.microsecond // 1000:03d}"


def xnat_datetime(moment: datetime) -> str:
    """The prearchive's lastmod/uploaded format, which xnatpy parses with ``%Y-%m-%d %H:%M:%S.%f``."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def safe_relative_path(path: str) -> str:
    """A resource-relative path without ``..``, empty or absolute segments (else 400)."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise HttpError(400, f"Invalid file path '{path}'.")
    return "/".join(parts)


# ------------------------------------------------------------------------------------------
# Accounts


@dataclass
class User:
    login: str
    password: str
    admin: bool = False
    enabled: bool = True


@dataclass
class Token:
    alias: str
    secret: str
    login: str
    expires_at: float  # epoch seconds
    enabled: bool = True

    def valid(self, now: float) -> bool:
        return self.enabled and now < self.expires_at


@dataclass
class WebSession:
    id: str
    login: str
    last_access: float


# ------------------------------------------------------------------------------------------
# Projects, resources, configs


@dataclass
class FileMeta:
    size: int
    digest: str
    content: str = ""
    format: str = ""
    tags: str = ""


@dataclass
class Resource:
    id: int
    label: str
    directory: Path
    format: str = ""
    content: str = ""
    tags: str = ""
    files: dict[str, FileMeta] = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        """One row of ``CatalogResourceList`` (no ID/URI keys, like XNAT)."""
        return {
            "xnat_abstractresource_id": str(self.id),
            "label": self.label,
            "element_name": "xnat:resourceCatalog",
            "category": "resources",
            "cat_id": "",
            "cat_desc": " ",
            "file_count": str(len(self.files)),
            "file_size": str(sum(f.size for f in self.files.values())),
            "tags": self.tags,
            "content": self.content,
            "format": self.format,
        }


@dataclass
class ConfigVersion:
    contents: str
    user: str
    created: datetime
    reason: str
    status: str
    version: int
    unversioned: bool = False


@dataclass
class Project:
    id: str
    name: str
    secondary_id: str
    description: str = ""
    pi_firstname: str = ""
    pi_lastname: str = ""
    roles: dict[str, str] = field(default_factory=dict)
    resources: dict[int, Resource] = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        return {
            "ID": self.id,
            "secondary_ID": self.secondary_id,
            "name": self.name,
            "description": self.description,
            "pi_firstname": self.pi_firstname,
            "pi_lastname": self.pi_lastname,
            "URI": f"/data/projects/{self.id}",
        }


# ------------------------------------------------------------------------------------------
# Prearchive and archive


@dataclass
class Scan:
    id: str
    series_description: str
    modality: str

    @property
    def xsi_type(self) -> str:
        known = {"MR": "xnat:mrScanData", "CT": "xnat:ctScanData", "PT": "xnat:petScanData",
                 "US": "xnat:usScanData", "CR": "xnat:crScanData", "DX": "xnat:dxScanData",
                 "MG": "xnat:mgScanData", "NM": "xnat:nmScanData", "XA": "xnat:xaScanData",
                 "SR": "xnat:srScanData"}
        return known.get(self.modality.upper(), "xnat:otherDicomScanData")


@dataclass
class PrearcSession:
    """A prearchive session as XNAT's ``DatabaseSession`` table holds it."""

    project: str
    timestamp: str
    folder: str
    subject: str
    tag: str  # StudyInstanceUID
    directory: Path
    uploader: str
    uploaded: datetime
    lastmod: datetime
    receiving: bool
    conflict: bool
    scan_date: str = ""
    scan_time: str = ""
    autoarchive: str = "Manual"
    error: bool = False
    scans: dict[str, Scan] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The ``url`` column: without ``/data``, as XNAT lists it."""
        return f"/prearchive/projects/{self.project}/{self.timestamp}/{self.folder}"

    @property
    def status(self) -> str:
        if self.receiving:
            return "RECEIVING"
        if self.error:
            return "ERROR"
        return "CONFLICT" if self.conflict else "READY"

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def row(self) -> dict[str, str]:
        return {
            "project": self.project,
            "timestamp": self.timestamp,
            "lastmod": xnat_datetime(self.lastmod),
            "uploaded": xnat_datetime(self.uploaded),
            "scan_date": self.scan_date,
            "scan_time": self.scan_time,
            "subject": self.subject,
            "folderName": self.folder,
            "name": self.folder,
            "tag": self.tag,
            "status": self.status,
            "url": self.url,
            "autoarchive": self.autoarchive,
            "prevent_anon": "false",
            "prevent_auto_commit": "false",
            "SOURCE": "",
            "VISIT": "",
            "PROTOCOL": "",
            "TIMEZONE": "",
        }


@dataclass
class ArchivedSession:
    project: str
    subject: str
    label: str
    tag: str
    directory: Path

    @property
    def uri(self) -> str:
        return f"/data/archive/projects/{self.project}/subjects/{self.subject}/experiments/{self.label}"


# ------------------------------------------------------------------------------------------


class Store:
    """All emulated state; every public method takes the lock, so routes can run in threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("resources", "prearchive", "archive", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.tokens: dict[str, Token] = {}
        self.sessions: dict[str, WebSession] = {}
        self.projects: dict[str, Project] = {}
        self.configs: dict[tuple[str | None, str, str], list[ConfigVersion]] = {}
        self.prearchive: list[PrearcSession] = []
        self.archive: list[ArchivedSession] = []
        self.token_lifetime = DEFAULT_TOKEN_LIFETIME
        self.session_timeout = DEFAULT_SESSION_TIMEOUT
        self.receiving_idle: float | None = None
        self.unassigned_visible_to_uploader = True
        self._next_resource_id = 1
        self._last_timestamp = ""

    # -------------------------------------------------------------------- accounts

    def add_user(self, login: str, password: str, *, admin: bool = False) -> None:
        with self.lock:
            self.users[login] = User(login, password, admin)

    def check_password(self, login: str, password: str) -> str | None:
        with self.lock:
            user = self.users.get(login)
            if user and user.enabled and secrets.compare_digest(user.password, password):
                return login
            return None

    def check_basic(self, name: str, password: str) -> str | None:
        """Basic credentials are a login/password or a token alias/secret (XNAT accepts both)."""
        with self.lock:
            token = self.tokens.get(name)
            if token is not None:
                if token.valid(time.time()) and secrets.compare_digest(token.secret, password):
                    return token.login
                return None
            return self.check_password(name, password)

    def open_session(self, login: str) -> str:
        with self.lock:
            sid = secrets.token_hex(16).upper()
            self.sessions[sid] = WebSession(sid, login, time.time())
            return sid

    def session_user(self, sid: str) -> str | None:
        with self.lock:
            session = self.sessions.get(sid)
            now = time.time()
            if session is None or now - session.last_access > self.session_timeout:
                self.sessions.pop(sid, None)
                return None
            session.last_access = now
            return session.login

    def close_session(self, sid: str) -> None:
        with self.lock:
            self.sessions.pop(sid, None)

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions.clear()

    def issue_token(self, login: str) -> Token:
        with self.lock:
            token = Token(
                alias=str(uuid.uuid4()),
                secret="".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                               for _ in range(64)),
                login=login,
                expires_at=time.time() + self.token_lifetime,
            )
            self.tokens[token.alias] = token
            return token

    def is_admin(self, login: str) -> bool:
        with self.lock:
            user = self.users.get(login)
            return bool(user and user.admin)

    # -------------------------------------------------------------------- projects

    def add_project(self, project_id: str, *, owner: str | None = None, name: str | None = None,
                    description: str = "") -> Project:
        if not PROJECT_ID_RE.match(project_id):
            raise HttpError(417, "Invalid character in project ID.")
        with self.lock:
            project = self.projects.get(project_id)
            if project is None:
                project = Project(project_id, name or project_id, project_id, description)
                self.projects[project_id] = project
            if owner is not None:
                project.roles[owner] = "owner"
            return project

    def grant(self, project_id: str, login: str, role: str | None) -> None:
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        with self.lock:
            project = self.projects[project_id]
            if role is None:
                project.roles.pop(login, None)
            else:
                project.roles[login] = role

    def role(self, project_id: str, login: str) -> str | None:
        """The user's project role; site admins count as owners everywhere."""
        with self.lock:
            project = self.projects.get(project_id)
            if project is None:
                return None
            explicit = project.roles.get(login)
            if explicit is None and self.is_admin(login):
                return "owner"
            return explicit

    def can_read(self, project_id: str, login: str) -> bool:
        return self.role(project_id, login) is not None

    def can_write(self, project_id: str, login: str) -> bool:
        return self.role(project_id, login) in WRITE_ROLES

    def can_edit_config(self, project_id: str, login: str) -> bool:
        return self.role(project_id, login) == "owner"

    def readable_project(self, project_id: str, login: str) -> Project:
        """The project if the user may read it: 404 when unknown, 403 when not allowed."""
        with self.lock:
            project = self.projects.get(project_id)
            if project is None:
                raise HttpError(404, f"Unable to find project '{project_id}'.")
            if not self.can_read(project_id, login):
                raise HttpError(403, f"Specified user account has insufficient privileges for project '{project_id}'.")
            return project

    def writable_project(self, project_id: str, login: str) -> Project:
        project = self.readable_project(project_id, login)
        if not self.can_write(project_id, login):
            raise HttpError(403, f"Specified user account has insufficient privileges to edit project '{project_id}'.")
        return project

    # -------------------------------------------------------------------- resources

    def find_resource(self, project: Project, ref: str) -> Resource | None:
        """Resolve ``{R}`` as the numeric ``xnat_abstractresource_id`` first, then as the label."""
        with self.lock:
            if ref.isdigit() and int(ref) in project.resources:
                return project.resources[int(ref)]
            return next((r for r in project.resources.values() if r.label == ref), None)

    def create_resource(self, project: Project, label: str, *, format: str = "", content: str = "",
                        tags: str = "") -> Resource:
        with self.lock:
            if self.find_resource(project, label) is not None:
                raise HttpError(409, "Specified resource already exists.")
            if not label or "/" in label:
                raise HttpError(400, f"Invalid resource label '{label}'.")
            rid = self._next_resource_id
            self._next_resource_id += 1
            directory = self.root / "resources" / project.id / label
            directory.mkdir(parents=True, exist_ok=True)
            resource = Resource(rid, label, directory, format, content, tags)
            project.resources[rid] = resource
            return resource

    def delete_resource(self, project: Project, resource: Resource) -> None:
        with self.lock:
            project.resources.pop(resource.id, None)
            shutil.rmtree(resource.directory, ignore_errors=True)

    def store_file(self, resource: Resource, rel: str, source: Path, *, overwrite: bool,
                   meta: dict[str, str]) -> bool:
        """Move ``source`` into the resource; False (and no change) if it exists without overwrite."""
        with self.lock:
            if rel in resource.files and not overwrite:
                source.unlink(missing_ok=True)
                return False
            target = resource.directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = file_digest(source)
            os.replace(source, target)
            resource.files[rel] = FileMeta(size, digest, meta.get("content", ""),
                                           meta.get("format", ""), meta.get("tags", ""))
            return True

    def delete_file(self, resource: Resource, rel: str) -> None:
        with self.lock:
            if rel not in resource.files:
                raise HttpError(404, "Unable to find file.")
            del resource.files[rel]
            (resource.directory / rel).unlink(missing_ok=True)

    # -------------------------------------------------------------------- configs

    def config_versions(self, project: str | None, tool: str, path: str) -> list[ConfigVersion]:
        with self.lock:
            return list(self.configs.get((project, tool, path), []))

    def configs_of(self, project: str | None, tool: str | None) -> list[tuple[str, str, ConfigVersion]]:
        with self.lock:
            return [(t, p, versions[-1]) for (proj, t, p), versions in sorted(
                self.configs.items(), key=lambda kv: (kv[0][1], kv[0][2]))
                if proj == project and (tool is None or t == tool)]

    def put_config(self, project: str | None, tool: str, path: str, contents: str | None, *,
                   user: str, reason: str = "", status: str | None = None,
                   unversioned: bool = False) -> bool:
        """Store a new version (or toggle status); True if the config is new (XNAT's 201)."""
        with self.lock:
            versions = self.configs.setdefault((project, tool, path), [])
            new = not versions
            if contents is None:
                if new:
                    del self.configs[(project, tool, path)]
                    raise HttpError(400, "No contents were specified for the configuration.")
                contents = versions[-1].contents
            current = versions[-1] if versions else None
            wanted_status = status or "enabled"
            if current and current.contents == contents and current.status == wanted_status:
                return False  # identical: XNAT's no-op that still answers 200
            versions.append(ConfigVersion(contents, user, datetime.now(), reason, wanted_status,
                                          len(versions) + 1, unversioned))
            return new

    # -------------------------------------------------------------------- prearchive

    def new_timestamp(self) -> str:
        """A prearchive timestamp, unique in this emulator (XNAT's are unique per upload)."""
        with self.lock:
            moment = datetime.now()
            stamp = xnat_timestamp(moment)
            while stamp <= self._last_timestamp:
                moment = datetime.fromtimestamp(moment.timestamp() + 0.001)
                stamp = xnat_timestamp(moment)
            self._last_timestamp = stamp
            return stamp

    def prearchive_of(self, project: str | None = None) -> list[PrearcSession]:
        with self.lock:
            self._settle_receiving()
            return [s for s in self.prearchive if project is None or s.project == project]

    def find_prearchive(self, project: str, timestamp: str, folder: str) -> PrearcSession | None:
        with self.lock:
            self._settle_receiving()
            return next((s for s in self.prearchive if (s.project, s.timestamp, s.folder)
                         == (project, timestamp, folder)), None)

    def prearchive_by_src(self, src: str) -> PrearcSession:
        """Resolve a ``src=/data/prearchive/projects/P/TS/F`` (``/data`` optional) or 404."""
        match = re.fullmatch(r"(?:/data)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?", src or "")
        session = self.find_prearchive(*match.groups()) if match else None
        if session is None:
            raise HttpError(404, f"Unable to find prearchive session '{src}'.")
        return session

    def visible_in_prearchive(self, session: PrearcSession, login: str) -> bool:
        """XNAT shows prearchive sessions of projects the user can edit; Unassigned to admins."""
        if session.project == UNASSIGNED:
            return self.is_admin(login) or (
                self.unassigned_visible_to_uploader and session.uploader == login)
        return self.can_write(session.project, login)

    def conflicts(self, project: str, folder: str, tag: str) -> bool:
        """Same label, different StudyInstanceUID, already in this project's prearchive or archive."""
        with self.lock:
            return any(s.project == project and s.folder == folder and s.tag != tag
                       for s in self.prearchive) or any(
                a.project == project and a.label == folder and a.tag != tag for a in self.archive)

    def remove_prearchive(self, session: PrearcSession) -> None:
        with self.lock:
            if session in self.prearchive:
                self.prearchive.remove(session)
            shutil.rmtree(session.directory.parent, ignore_errors=True)

    def finish_receiving(self, project: str | None = None) -> int:
        """Build every RECEIVING session now (XNAT does it after 5 idle minutes)."""
        with self.lock:
            count = 0
            for session in self.prearchive:
                if session.receiving and (project is None or session.project == project):
                    session.receiving = False
                    count += 1
            return count

    def _settle_receiving(self) -> None:
        if self.receiving_idle is None:
            return
        now = datetime.now()
        for session in self.prearchive:
            if session.receiving and (now - session.lastmod).total_seconds() >= self.receiving_idle:
                session.receiving = False


def file_digest(path: Path) -> tuple[int, str]:
    """Size and MD5 of a file, read in chunks (XNAT's catalog digest is MD5)."""
    md5 = hashlib.md5()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            md5.update(chunk)
            size += len(chunk)
    return size, md5.hexdigest()
