"""The REST routes of xnat-contract.md §7, each answering with XNAT's statuses and shapes.

One function per XNAT resource class; the table at the bottom maps method + path pattern to them.
Paths arrive normalised (``/data/archive/X`` is ``/data/X``). Every ``/data`` and ``/xapi`` route
needs a login except the ones marked ``open``; the dispatcher answers 401 otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import quoteattr

from . import dicom_import
from .schemas import BUILD_INFO, SCHEMAS
from .server import Request, Response, json_response, status_page, table, text
from .store import (
    UNASSIGNED,
    HttpError,
    PrearcSession,
    Project,
    Resource,
    Store,
    safe_relative_path,
    xnat_datetime,
)

#: Content types XNAT stores as the file when no ``inbody``/multipart is used (RequestUtil).
IN_BODY_TYPES = ("application/octet-stream", "application/zip", "application/x-zip-compressed",
                 "application/dicom", "application/pdf", "application/x-gzip", "application/gzip",
                 "application/x-tar", "application/json", "application/xml")

Handler = Callable[[Store, Request, dict[str, str]], Response]


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    pattern: re.Pattern[str]
    handler: Handler
    open: bool = False  # reachable without a login


# ------------------------------------------------------------------------------------------
# Authentication (A1-A7)


def root(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A1: the login page; valid Basic credentials (e.g. an alias token) also get a session."""
    if req.basic_credentials() is not None and req.login is None:
        return status_page(401, "Authentication failed.")
    return text(200, "XNAT emulator (dqr-xnat sandbox)\n")


def login(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A2: ``PUT/POST /data/services/auth`` with a form body; the JSESSION id is the body."""
    form = {**req.query, **req.form()}
    user = store.check_password(form.get("username", ""), form.get("password", ""))
    if user is None:
        return status_page(401, "Authentication failed.")
    sid = open_session(store, req, user)
    return text(200, sid)


def open_session(store: Store, req: Request, login_name: str) -> str:
    sid = store.open_session(login_name)
    now_ms = int(time.time() * 1000)
    req.set_cookies.append(f"JSESSIONID={sid}; Path=/; HttpOnly")
    req.set_cookies.append(f'SESSION_EXPIRATION_TIME="{now_ms},{int(store.session_timeout * 1000)}"; Path=/')
    req.login = login_name
    return sid


def auth_check(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A3: the text xnatpy's ``check_auth`` parses."""
    return text(200, f"User '{req.login}' is logged in")


def jsession_get(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A4: the heartbeat answers the session id as text."""
    sid = req.cookies.get("JSESSIONID")
    if not sid or store.session_user(sid) is None:
        sid = open_session(store, req, req.login or "")
    return text(200, sid)


def jsession_delete(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A5: log out; answers 200 even for a session that already expired."""
    sid = req.cookies.get("JSESSIONID")
    if sid:
        store.close_session(sid)
    return text(200, "")


def version(store: Store, req: Request, _: dict[str, str]) -> Response:
    """A6: 404, so xnatpy falls through to /xapi/siteConfig/buildInfo (as on XNAT 1.7+)."""
    return status_page(404, "The requested resource was not found.")


def build_info(store: Store, req: Request, _: dict[str, str]) -> Response:
    return json_response(BUILD_INFO)


def schema_list(store: Store, req: Request, _: dict[str, str]) -> Response:
    return json_response(sorted(SCHEMAS))


def schema(store: Store, req: Request, m: dict[str, str]) -> Response:
    if m["name"] not in SCHEMAS:
        raise HttpError(404, f"Schema '{m['name']}' not found.")
    return text(200, SCHEMAS[m["name"]], "application/xml")


def search_elements(store: Store, req: Request, _: dict[str, str]) -> Response:
    return table([{"ELEMENT_NAME": "xnat:projectData", "PLURAL": "Projects", "SINGULAR": "Project"}])


def search_element_fields(store: Store, req: Request, _: dict[str, str]) -> Response:
    return table([])


def access_projects(store: Store, req: Request, _: dict[str, str]) -> Response:
    """``/xapi/access/projects`` (XNAT >= 1.8): the user's projects with their role."""
    rows = []
    for project in store.projects.values():
        role = store.role(project.id, req.login or "")
        if role is not None:
            rows.append({"ID": project.id, "name": project.name, "secondary_ID": project.secondary_id,
                         "description": project.description, "role": role})
    return json_response(rows)


# ------------------------------------------------------------------------------------------
# Projects (P1, P2)


def project_list(store: Store, req: Request, _: dict[str, str]) -> Response:
    login_name = req.login or ""
    rows = [p.row() for p in store.projects.values() if store.can_read(p.id, login_name)]
    return table(rows, "Projects")


def project_get(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.readable_project(m["project"], req.login or "")
    item = {
        "data_fields": {"ID": project.id, "name": project.name, "secondary_ID": project.secondary_id,
                        "description": project.description},
        "meta": {"xsi:type": "xnat:projectData", "isHistory": False, "start_date": ""},
        "children": [],
    }
    return json_response({"items": [item]})


def project_put(store: Store, req: Request, m: dict[str, str]) -> Response:
    """Create a project (the creator owns it), 417 for an ID outside ``[A-Za-z0-9_-]``."""
    project_id = m["project"]
    existing = store.projects.get(project_id)
    if existing is not None:
        store.writable_project(project_id, req.login or "")
        return text(200, "")
    store.add_project(project_id, owner=req.login, name=req.query.get("name"),
                      description=req.query.get("description", ""))
    return text(200, "")


# ------------------------------------------------------------------------------------------
# Resources and files (R1-R3, F1-F4)


def _resource(store: Store, project: Project, ref: str) -> Resource:
    resource = store.find_resource(project, ref)
    if resource is None:
        raise HttpError(404, f"Unable to find resource '{ref}'.")
    return resource


def resource_list(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.readable_project(m["project"], req.login or "")
    return table([r.row() for r in project.resources.values()], "Resources")


def resource_get(store: Store, req: Request, m: dict[str, str]) -> Response:
    """The catalog XML: XNAT ignores ``format=json`` here; xnatpy then reads the listing instead."""
    project = store.readable_project(m["project"], req.login or "")
    resource = _resource(store, project, m["resource"])
    entries = "".join(f'<cat:entry URI={quoteattr(rel)} ID={quoteattr(rel)} name={quoteattr(rel.rsplit("/", 1)[-1])} '
                      f'digest="{meta.digest}"/>' for rel, meta in resource.files.items())
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog xmlns:cat="http://nrg.wustl.edu/catalog" '
            f'ID="{resource.id}" description={quoteattr(resource.label)}><cat:entries>{entries}</cat:entries>'
            '</cat:Catalog>')
    return text(200, body, "text/xml")


def resource_put(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.writable_project(m["project"], req.login or "")
    store.create_resource(project, m["resource"], format=req.query.get("format", ""),
                          content=req.query.get("content", ""), tags=req.query.get("tags", ""))
    return text(200, "")


def resource_delete(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.writable_project(m["project"], req.login or "")
    store.delete_resource(project, _resource(store, project, m["resource"]))
    return text(200, "")


def file_list(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.readable_project(m["project"], req.login or "")
    resource = _resource(store, project, m["resource"])
    if req.query.get("format") == "zip":
        return _zip_answer(store, {f"{project.id}/resources/{resource.label}/files/{rel}": resource.directory / rel
                                   for rel in sorted(resource.files)})
    rows = [{
        "Name": rel.rsplit("/", 1)[-1],
        "Size": str(meta.size),
        "URI": f"/data/projects/{project.id}/resources/{resource.id}/files/{rel}",
        "collection": resource.label,
        "file_tags": meta.tags,
        "file_format": meta.format,
        "file_content": meta.content,
        "cat_ID": str(resource.id),
        "digest": meta.digest,
    } for rel, meta in sorted(resource.files.items())]
    return table(rows, "Files")


def file_get(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.readable_project(m["project"], req.login or "")
    resource = _resource(store, project, m["resource"])
    rel = safe_relative_path(m["path"])
    if rel not in resource.files:
        raise HttpError(404, "Unable to find file.")
    return Response(200, content_type="application/octet-stream", file=resource.directory / rel)


def file_put(store: Store, req: Request, m: dict[str, str]) -> Response:
    """F2: create the resource if missing; 200 ``{"duplicates": [...]}`` if it exists without overwrite."""
    project = store.writable_project(m["project"], req.login or "")
    rel = safe_relative_path(m["path"])
    if req.body is None:
        raise HttpError(400, "No content was uploaded.")
    if not req.flag("inbody") and not (req.content_type in IN_BODY_TYPES or req.content_type.startswith(
            ("text/", "image/"))):
        raise HttpError(400, f"Unsupported upload content type '{req.content_type}'; use inbody=true.")
    with store.lock:
        resource = store.find_resource(project, m["resource"]) or store.create_resource(project, m["resource"])
        meta = {"content": req.query.get("content", req.query.get("file_content", "")),
                "format": req.query.get("format", req.query.get("file_format", "")),
                "tags": req.query.get("tags", req.query.get("file_tags", ""))}
        overwrite = req.flag("overwrite")
        if req.flag("extract") and zipfile.is_zipfile(req.body):
            duplicates = _extract(store, resource, rel, req.body, overwrite, meta)
        else:
            duplicates = [] if _store_body(store, resource, rel, req.body, overwrite, meta) else [rel]
    if duplicates:
        return json_response({"duplicates": duplicates}, 200, "text/html;charset=UTF-8")
    return text(200, "")


def _store_body(store: Store, resource: Resource, rel: str, body: Path, overwrite: bool,
                meta: dict[str, str]) -> bool:
    """Move the spooled request body into place (the server deletes what is left)."""
    return store.store_file(resource, rel, body, overwrite=overwrite, meta=meta)


def _extract(store: Store, resource: Resource, rel: str, body: Path, overwrite: bool,
             meta: dict[str, str]) -> list[str]:
    """``extract=true``: the zip's members land next to where the zip itself would have."""
    base = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    duplicates = []
    with zipfile.ZipFile(body) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            member = safe_relative_path(base + info.filename)
            with archive.open(info) as src, tempfile.NamedTemporaryFile(
                    dir=store.root / "tmp", delete=False) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            tmp = Path(out.name)
            if not store.store_file(resource, member, tmp, overwrite=overwrite, meta=meta):
                duplicates.append(member)
    return duplicates


def file_delete(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = store.writable_project(m["project"], req.login or "")
    resource = _resource(store, project, m["resource"])
    store.delete_file(resource, safe_relative_path(m["path"]))
    return text(200, "")


def _zip_answer(store: Store, members: dict[str, Path]) -> Response:
    fd, name = tempfile.mkstemp(dir=store.root / "tmp", suffix=".zip")
    with open(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, path in members.items():
            archive.write(path, arcname)
    return Response(200, content_type="application/zip", file=Path(name), delete_file=True)


# ------------------------------------------------------------------------------------------
# Configuration service (C1-C3)


def _config_project(store: Store, req: Request, m: dict[str, str]) -> str | None:
    project = m.get("project")
    if project is not None:
        store.readable_project(project, req.login or "")
    return project


def _config_rows(project: str | None, tool: str, path: str, versions: list) -> list[dict[str, str]]:
    return [{
        "tool": tool, "path": path, "project": project or "", "user": v.user,
        "create_date": xnat_datetime(v.created), "reason": v.reason, "contents": v.contents,
        "unversioned": str(v.unversioned).lower(), "version": str(v.version), "status": v.status,
    } for v in versions]


def config_get(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = _config_project(store, req, m)
    tool, path = m.get("tool"), m.get("path")
    if tool is None or path is None:
        rows = [row for t, p, latest in store.configs_of(project, tool)
                for row in _config_rows(project, t, p, [latest])]
        return table(rows, "Configurations")
    versions = store.config_versions(project, tool, path)
    if not versions and project is not None and req.flag("defaultToSiteWide"):
        versions = store.config_versions(None, tool, path)
    if req.query.get("version", "").isdigit():
        versions = [v for v in versions if v.version == int(req.query["version"])]
    if req.query.get("action") != "getHistory":
        versions = versions[-1:]
    if req.flag("contents"):
        if not versions or versions[-1].status != "enabled":
            return _config_missing(req)
        return text(200, versions[-1].contents)
    if not versions:
        return _config_missing(req)
    return table(_config_rows(project, tool, path, versions), "Configurations")


def _config_missing(req: Request) -> Response:
    if req.flag("accept-not-found"):
        return text(204, "")
    raise HttpError(404, "Couldn't find config for the specified tool and path.")


def config_put(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = _config_project(store, req, m)
    login_name = req.login or ""
    allowed = store.can_edit_config(project, login_name) if project else store.is_admin(login_name)
    if not allowed:
        raise HttpError(403, "User does not have privileges to edit the configuration.")
    contents, status = _config_body(req)
    new = store.put_config(project, m["tool"], m["path"], contents, user=login_name,
                           reason=req.query.get("reason", ""), status=status,
                           unversioned=req.flag("unversioned"))
    return text(201 if new else 200, "")


def _config_body(req: Request) -> tuple[str | None, str | None]:
    status = req.query.get("status") or None
    if status not in (None, "enabled", "disabled"):
        raise HttpError(400, f"Invalid status '{status}'.")
    if req.body is None:
        if status is None:
            raise HttpError(400, "No contents were specified for the configuration.")
        return None, status
    if req.content_type == "application/json" and not req.flag("inbody"):
        try:
            data = json.loads(req.body_text())
        except ValueError:
            raise HttpError(400, "The JSON body could not be parsed.") from None
        if not isinstance(data, dict) or "contents" not in data:
            raise HttpError(400, "The JSON body needs a 'contents' field.")
        return str(data["contents"]), data.get("status") or status
    if not req.flag("inbody") and not req.content_type.startswith("text/"):
        raise HttpError(400, f"Unsupported content type '{req.content_type}'; send text/plain or inbody=true.")
    return req.body_text(), status


def config_delete(store: Store, req: Request, m: dict[str, str]) -> Response:
    project = _config_project(store, req, m)
    if not store.config_versions(project, m["tool"], m["path"]):
        raise HttpError(404, "Couldn't find config for the specified tool and path.")
    req.query["status"] = "disabled"
    req.body = None
    return config_put(store, req, m)


# ------------------------------------------------------------------------------------------
# Import and prearchive (I1, Q1-Q5)


def import_service(store: Store, req: Request, _: dict[str, str]) -> Response:
    if req.body is None:
        raise HttpError(400, "No file was uploaded.")
    if req.content_type.startswith("multipart/"):
        raise HttpError(400, "Multipart uploads are not supported by the emulator; send the file in the body.")
    request = dicom_import.ImportRequest.from_query(req.login or "", req.content_type, req.query)
    urls = dicom_import.run_import(store, request, req.body)
    return text(200, "".join(url + "\r\n" for url in urls), "text/uri-list")


def _visible(store: Store, req: Request, session: PrearcSession) -> PrearcSession:
    if not store.visible_in_prearchive(session, req.login or ""):
        raise HttpError(403, "Specified user account has insufficient privileges for this prearchive session.")
    return session


def prearchive_all(store: Store, req: Request, _: dict[str, str]) -> Response:
    rows = [s.row() for s in store.prearchive_of() if store.visible_in_prearchive(s, req.login or "")]
    return table(rows, "Prearchive")


def prearchive_project(store: Store, req: Request, m: dict[str, str]) -> Response:
    rows = []
    for project in m["project"].split(","):
        if project != UNASSIGNED:
            store.writable_project(project, req.login or "")
        rows += [s.row() for s in store.prearchive_of(project)
                 if store.visible_in_prearchive(s, req.login or "")]
    return table(rows, "Prearchive")


def _session(store: Store, req: Request, m: dict[str, str]) -> PrearcSession:
    session = store.find_prearchive(m["project"], m["timestamp"], m["folder"])
    if session is None:
        raise HttpError(404, "Unable to find the specified prearchive session.")
    return _visible(store, req, session)


def prearchive_session(store: Store, req: Request, m: dict[str, str]) -> Response:
    session = _session(store, req, m)
    if req.query.get("format") == "zip":
        files = session.files()
        return _zip_answer(store, {str(p.relative_to(session.directory.parent)): p for p in files})
    return table([session.row()], "Prearchive")


def prearchive_scans(store: Store, req: Request, m: dict[str, str]) -> Response:
    session = _session(store, req, m)
    return table([{"ID": s.id, "xsiType": s.xsi_type, "series_description": s.series_description}
                  for s in session.scans.values()], "Scans")


def _scan_dir(store: Store, req: Request, m: dict[str, str]) -> Path:
    session = _session(store, req, m)
    if m["scan"] not in session.scans or m.get("resource", "DICOM") != "DICOM":
        raise HttpError(404, "Unable to find the specified scan or resource.")
    return session.directory / "SCANS" / m["scan"] / "DICOM"


def prearchive_scan_resources(store: Store, req: Request, m: dict[str, str]) -> Response:
    files = sorted(_scan_dir(store, req, m).glob("*"))
    return table([{"label": "DICOM", "file_count": str(len(files)),
                   "file_size": str(sum(f.stat().st_size for f in files))}], "Resources")


def prearchive_scan_files(store: Store, req: Request, m: dict[str, str]) -> Response:
    directory = _scan_dir(store, req, m)
    base = req.path
    return table([{"Name": f.name, "Size": str(f.stat().st_size), "URI": f"{base}/{f.name}"}
                  for f in sorted(directory.glob("*"))], "Files")


def prearchive_scan_file(store: Store, req: Request, m: dict[str, str]) -> Response:
    path = _scan_dir(store, req, m) / m["name"]
    if "/" in m["name"] or not path.is_file():
        raise HttpError(404, "Unable to find file.")
    return Response(200, content_type="application/dicom", file=path)


def archive_service(store: Store, req: Request, _: dict[str, str]) -> Response:
    """Q4: ``POST /data/services/archive?src=...``: answers the new experiment's URI."""
    session = _visible(store, req, store.prearchive_by_src(req.query.get("src", "")))
    project = req.query.get("project") or session.project
    if project == UNASSIGNED:
        raise HttpError(400, "Sessions in Unassigned need a project to be archived.")
    store.writable_project(project, req.login or "")
    archived = dicom_import.archive_session(
        store, session, project=project, subject=req.query.get("subject"),
        label=req.query.get("session"), overwrite=req.query.get("overwrite"))
    return text(200, archived.uri)


def prearchive_operation(store: Store, req: Request, m: dict[str, str]) -> Response:
    """Q5: delete / move / rebuild one or more ``src`` sessions."""
    sources = req.query_all.get("src") or [""]
    sessions = [_visible(store, req, store.prearchive_by_src(src)) for src in sources]
    for session in sessions:
        if m["operation"] == "delete":
            store.remove_prearchive(session)
        elif m["operation"] == "rebuild":
            with store.lock:
                session.receiving = False
        else:
            _move(store, req, session)
    return text(200, "")


def _move(store: Store, req: Request, session: PrearcSession) -> None:
    target = req.query.get("newProject", "")
    store.writable_project(target, req.login or "")
    with store.lock:
        old_root = session.directory.parent
        new_root = store.root / "prearchive" / target / session.timestamp
        new_root.parent.mkdir(parents=True, exist_ok=True)
        old_root.rename(new_root)
        session.project = target
        session.directory = new_root / session.folder
        session.conflict = store.conflicts(target, session.folder, session.tag)


# ------------------------------------------------------------------------------------------
# Alias tokens (T1)


def token_issue(store: Store, req: Request, m: dict[str, str]) -> Response:
    target = m.get("user") or req.login or ""
    if target != req.login and not store.is_admin(req.login or ""):
        raise HttpError(403, "Only administrators can issue tokens for other users.")
    if target not in store.users:
        raise HttpError(404, f"User '{target}' not found.")
    token = store.issue_token(target)
    return json_response({
        "alias": token.alias,
        "secret": token.secret,
        "xdatUserId": token.login,
        "singleUse": False,
        "estimatedExpirationTime": int(token.expires_at * 1000),
        "validIPAddresses": [],
        "enabled": True,
        "timestamp": int(time.time() * 1000),
    })


def token_invalidate(store: Store, req: Request, m: dict[str, str]) -> Response:
    with store.lock:
        token = store.tokens.get(m["alias"])
        if token is None or (token.login != req.login and not store.is_admin(req.login or "")):
            raise HttpError(404, "Token not found.")
        token.enabled = False
    return text(200, "")


# ------------------------------------------------------------------------------------------
# The table


P = r"/data/projects/(?P<project>[^/]+)"
R = P + r"/resources/(?P<resource>[^/]+)"
PA = r"/data/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>[^/]+)/(?P<folder>[^/]+)"
CONFIG = r"/data(?:/projects/(?P<project>[^/]+))?/config(?:/(?P<tool>[^/]+)(?:/(?P<path>.+))?)?"


def _route(methods: str, pattern: str, handler: Handler, open_: bool = False) -> Route:
    return Route(tuple(methods.split("|")), re.compile(pattern), handler, open_)


ROUTES: list[Route] = [
    _route("GET", r"/", root, True),
    _route("PUT|POST", r"/data/services/auth", login, True),
    _route("GET", r"/data/auth", auth_check),
    _route("GET", r"/data/JSESSION", jsession_get),
    _route("DELETE", r"/data/JSESSION", jsession_delete, True),
    _route("GET", r"/data/version", version),
    _route("GET", r"/xapi/siteConfig/buildInfo", build_info),
    _route("GET", r"/xapi/schemas", schema_list),
    _route("GET", r"/xapi/schemas/(?P<name>[^/]+)", schema),
    _route("GET", r"/data/search/elements", search_elements),
    _route("GET", r"/data/search/elements/(?P<type>[^/]+)", search_element_fields),
    _route("GET", r"/xapi/access/projects", access_projects),
    _route("GET", r"/data/projects", project_list),
    _route("GET", P, project_get),
    _route("PUT", P, project_put),
    _route("GET", P + r"/resources", resource_list),
    _route("GET", R, resource_get),
    _route("PUT|POST", R, resource_put),
    _route("DELETE", R, resource_delete),
    _route("GET", R + r"/files", file_list),
    _route("GET", R + r"/files/(?P<path>.+)", file_get),
    _route("PUT|POST", R + r"/files/(?P<path>.+)", file_put),
    _route("DELETE", R + r"/files/(?P<path>.+)", file_delete),
    _route("GET", CONFIG, config_get),
    _route("PUT|POST", CONFIG, config_put),
    _route("DELETE", CONFIG, config_delete),
    _route("POST", r"/data/services/import", import_service),
    _route("GET", r"/data/prearchive/projects", prearchive_all),
    _route("GET", r"/data/prearchive/projects/(?P<project>[^/]+)", prearchive_project),
    _route("GET", PA, prearchive_session),
    _route("GET", PA + r"/scans", prearchive_scans),
    _route("GET", PA + r"/scans/(?P<scan>[^/]+)/resources", prearchive_scan_resources),
    _route("GET", PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files", prearchive_scan_files),
    _route("GET", PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files/(?P<name>.+)",
           prearchive_scan_file),
    _route("POST", r"/data/services/archive", archive_service),
    _route("POST", r"/data/services/prearchive/(?P<operation>delete|move|rebuild)", prearchive_operation),
    _route("GET", r"/data/services/tokens/issue(?:/user/(?P<user>[^/]+))?", token_issue),
    _route("GET", r"/data/services/tokens/invalidate/(?P<alias>[^/]+)(?:/(?P<secret>[^/]+))?", token_invalidate),
]


def match(path: str, method: str) -> tuple[Route, dict[str, str]] | None:
    """The route for ``method path``; raises 405 if the path exists for other methods only."""
    lookup = "GET" if method == "HEAD" else method
    seen = False
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        seen = True
        if lookup in route.methods:
            return route, {k: v for k, v in found.groupdict().items() if v is not None}
    if seen:
        raise HttpError(405, f"Method {method} is not allowed here.")
    return None
