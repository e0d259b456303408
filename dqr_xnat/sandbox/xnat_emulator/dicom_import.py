"""``POST /data/services/import``: DICOM-zip / gradual-DICOM into the prearchive, as XNAT does it.

Each archive member is copied to disk, its header read with pydicom (``stop_before_pixels``), then
routed like ``GradualDicomImporter``: the explicit project if it exists and the user can write it,
else XNAT's DICOM routing, else the ``Unassigned`` prearchive -- silently, because real XNAT does
that too. Files of one StudyInstanceUID in one project merge into one prearchive session whose
folder is the session label.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import zipfile
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Callable, Iterator

import pydicom

from .store import UNASSIGNED, ArchivedSession, HttpError, PrearcSession, Scan, Store, to_label_chars

HANDLERS = ("DICOM-zip", "gradual-DICOM", "SI")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
TAR_TYPES = ("application/x-tar", "application/tar", "application/x-gzip", "application/gzip",
             "application/x-tgz")
DICOM_TYPES = ("application/dicom",)
#: Tags XNAT searches for ``Project:``/``Subject:``/``Session:`` assignments (Xnat15DicomProjectIdentifier).
COMMENT_TAGS = ("PatientComments", "StudyComments", "AdditionalPatientHistory")
#: Whole-value project candidates, in XNAT's order.
PROJECT_TAGS = ("StudyDescription", "AccessionNumber")


@dataclass
class ImportRequest:
    """The import parameters after XNAT's aliasing (project/PROJECT_ID, session/EXPT_LABEL ...)."""

    login: str
    content_type: str
    handler: str
    project: str | None = None
    subject: str | None = None
    session: str | None = None
    dest: str | None = None
    direct_archive: bool = False
    ignore_unparsable: bool = False

    @classmethod
    def from_query(cls, login: str, content_type: str, query: dict[str, str]) -> "ImportRequest":
        handler = query.get("import-handler") or (
            "gradual-DICOM" if content_type in DICOM_TYPES else "DICOM-zip")
        if handler not in HANDLERS:
            raise HttpError(404, f"Unknown import handler '{handler}'.")
        req = cls(
            login=login,
            content_type=content_type,
            handler=handler,
            project=query.get("project") or query.get("PROJECT_ID") or None,
            subject=query.get("subject") or query.get("SUBJECT_ID") or None,
            session=query.get("session") or query.get("EXPT_LABEL") or None,
            dest=query.get("dest") or None,
            direct_archive=query.get("Direct-Archive", "").lower() == "true",
            ignore_unparsable=query.get("Ignore-Unparsable", "").lower() == "true",
        )
        req._apply_dest()
        return req

    def _apply_dest(self) -> None:
        """``dest`` also names the project (and, for /archive, subject and session)."""
        if self.dest is None:
            return
        dest = self.dest if self.dest.startswith("/") else "/" + self.dest
        dest = re.sub(r"^/data", "", dest)
        archive = re.fullmatch(r"/archive/projects/([^/]+)(?:/subjects/([^/]+)(?:/experiments/([^/]+))?)?/?", dest)
        prearc = re.fullmatch(r"/prearchive(?:/projects/([^/]+))?/?", dest)
        if archive:
            self.project = self.project or archive.group(1)
            self.subject = self.subject or archive.group(2)
            self.session = self.session or archive.group(3)
        elif prearc:
            self.project = self.project or prearc.group(1)
        else:
            raise HttpError(400, f"Invalid destination '{self.dest}'.")

    @property
    def to_archive(self) -> bool:
        return self.direct_archive or bool(self.dest and re.match(r"^/?(data/)?archive", self.dest))


def run_import(store: Store, req: ImportRequest, body: Path) -> list[str]:
    """Import every DICOM member of ``body``; return the URI of each session touched, in order."""
    urls: list[str] = []
    with store.lock, closing(_members(body, req)) as members:
        for name, opener in members:
            with _spooled(store, opener) as tmp:
                header = _read_header(tmp)
                if header is None:
                    if req.ignore_unparsable:
                        continue
                    raise HttpError(400, f"Unable to parse '{name}' as DICOM.")
                url = _land(store, req, header, tmp)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise HttpError(400, "The upload contained no DICOM files.")
    return urls


# ------------------------------------------------------------------------------------------
# Reading the upload


def _archive_kind(req: ImportRequest) -> str:
    if req.handler == "gradual-DICOM" and req.content_type in DICOM_TYPES:
        return "dicom"
    if req.content_type in ZIP_TYPES:
        return "zip"
    if req.content_type in TAR_TYPES:
        return "tar"
    if req.content_type in DICOM_TYPES:
        return "dicom"
    raise HttpError(400, f"Unsupported format: content type '{req.content_type or 'none'}'.")


def _members(body: Path, req: ImportRequest) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """Yield (name, opener) for each file in the upload, never loading it whole."""
    kind = _archive_kind(req)
    if kind == "dicom":
        yield "upload.dcm", lambda: open(body, "rb")
        return
    if kind == "zip":
        try:
            archive = zipfile.ZipFile(body)
        except zipfile.BadZipFile:
            raise HttpError(400, "Unable to read the uploaded zip file.") from None
        with archive:
            for info in archive.infolist():
                if not info.is_dir() and not _ignored(info.filename):
                    yield info.filename, lambda info=info: archive.open(info)
        return
    try:
        tar = tarfile.open(body, "r:*")
    except tarfile.TarError:
        raise HttpError(400, "Unable to read the uploaded tar file.") from None
    with tar:
        for member in tar:
            if member.isfile() and not _ignored(member.name):
                yield member.name, lambda member=member: tar.extractfile(member)  # type: ignore[return-value]


def _ignored(name: str) -> bool:
    """Archive debris that XNAT's extraction skips (macOS resource forks, DICOMDIR)."""
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith("._") or base.upper() == "DICOMDIR"


@contextmanager
def _spooled(store: Store, opener: Callable[[], IO[bytes]]) -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(dir=store.root / "tmp", delete=False, suffix=".dcm") as out:
        with opener() as src:
            shutil.copyfileobj(src, out, 1 << 20)
    path = Path(out.name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if not ds.get("StudyInstanceUID") or not ds.get("SOPInstanceUID"):
            return None
        return ds
    except Exception:  # noqa: BLE001 - any parse failure means "unparsable", as in XNAT
        return None


# ------------------------------------------------------------------------------------------
# Routing and landing


def _assignment(ds: pydicom.Dataset, key: str) -> str | None:
    """A ``Key: value`` contained assignment in the comment tags (case-insensitive)."""
    pattern = re.compile(rf"(?:^|[\s,;]){key}\s*:\s*([\w\-]+)", re.IGNORECASE)
    for tag in COMMENT_TAGS:
        match = pattern.search(str(ds.get(tag, "") or ""))
        if match:
            return match.group(1)
    return None


def _route_project(store: Store, req: ImportRequest, ds: pydicom.Dataset) -> str:
    """GradualDicomImporter.getProject: explicit project, else DICOM routing, else Unassigned."""
    candidates = [req.project] if req.project else []
    candidates.append(_assignment(ds, "Project"))
    candidates += [str(ds.get(tag, "") or "").strip() for tag in PROJECT_TAGS]
    for candidate in candidates:
        if candidate and candidate in store.projects and store.can_write(candidate, req.login):
            return candidate
    return UNASSIGNED


def _labels(req: ImportRequest, ds: pydicom.Dataset) -> tuple[str, str]:
    subject = req.subject or _assignment(ds, "Subject") or to_label_chars(str(ds.get("PatientName", "") or ""))
    session = req.session or _assignment(ds, "Session") or to_label_chars(str(ds.get("PatientID", "") or ""))
    session = session or "dicom_upload"
    for label in (subject, session):
        if "/" in label or label in (".", ".."):
            raise HttpError(400, f"Invalid label '{label}'.")
    return subject, session


def _scan(ds: pydicom.Dataset) -> Scan:
    number = ds.get("SeriesNumber")
    scan_id = str(int(number)) if number not in (None, "") else to_label_chars(str(ds.get("SeriesInstanceUID", "1")))
    return Scan(scan_id, str(ds.get("SeriesDescription", "") or ""), str(ds.get("Modality", "") or ""))


def _file_name(ds: pydicom.Dataset) -> str:
    return to_label_chars(str(ds.SOPInstanceUID)) + ".dcm"


def _land(store: Store, req: ImportRequest, ds: pydicom.Dataset, tmp: Path) -> str:
    project = _route_project(store, req, ds)
    subject, label = _labels(req, ds)
    scan = _scan(ds)
    if req.to_archive and project != UNASSIGNED:
        return _land_archive(store, project, subject, label, ds, scan, tmp)
    session = _prearchive_session(store, req, project, subject, label, ds)
    session.scans.setdefault(scan.id, scan)
    target = session.directory / "SCANS" / scan.id / "DICOM" / _file_name(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp, target)
    session.lastmod = datetime.now()
    return "/data" + session.url


def _prearchive_session(store: Store, req: ImportRequest, project: str, subject: str, label: str,
                        ds: pydicom.Dataset) -> PrearcSession:
    """The session this file merges into (same project + StudyInstanceUID), or a new one."""
    tag = str(ds.StudyInstanceUID)
    for session in store.prearchive:
        if session.project == project and session.tag == tag:
            if req.dest:
                session.receiving = False  # a dest means "commit": XNAT rebuilds the session now
            return session
    timestamp = store.new_timestamp()
    now = datetime.now()
    session = PrearcSession(
        project=project,
        timestamp=timestamp,
        folder=label,
        subject=subject,
        tag=tag,
        directory=store.root / "prearchive" / project / timestamp / label,
        uploader=req.login,
        uploaded=now,
        lastmod=now,
        receiving=not req.dest,
        conflict=store.conflicts(project, label, tag),
        scan_date=_date(str(ds.get("StudyDate", "") or "")),
        scan_time=_time(str(ds.get("StudyTime", "") or "")),
    )
    session.directory.mkdir(parents=True, exist_ok=True)
    store.prearchive.append(session)
    return session


def _land_archive(store: Store, project: str, subject: str, label: str, ds: pydicom.Dataset,
                  scan: Scan, tmp: Path) -> str:
    tag = str(ds.StudyInstanceUID)
    existing = next((a for a in store.archive if a.project == project and a.label == label), None)
    if existing is not None and existing.tag != tag:
        raise HttpError(409, f"Session '{label}' already exists in project '{project}' with another study.")
    if existing is None:
        existing = ArchivedSession(project, subject, label, tag,
                                   store.root / "archive" / project / "arc001" / label)
        store.archive.append(existing)
    target = existing.directory / "SCANS" / scan.id / "DICOM" / _file_name(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp, target)
    return existing.uri


def _date(value: str) -> str:
    value = value.strip()
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if re.fullmatch(r"\d{8}", value) else ""


def _time(value: str) -> str:
    value = value.strip()
    return f"{value[:2]}:{value[2:4]}:{value[4:6]}" if re.match(r"\d{6}", value) else ""


def archive_session(store: Store, session: PrearcSession, *, project: str | None, subject: str | None,
                    label: str | None, overwrite: str | None) -> ArchivedSession:
    """``POST /data/services/archive``: move a prearchive session into the archive."""
    project = project or session.project
    subject = subject or session.subject
    label = label or session.folder
    with store.lock:
        if session.receiving:
            raise HttpError(409, "The session is still receiving files; try again later.")
        existing = next((a for a in store.archive if a.project == project and a.label == label), None)
        if existing is not None and (overwrite or "none") == "none":
            raise HttpError(409, f"Session '{label}' already exists in project '{project}'.")
        if existing is not None:
            if overwrite == "delete":
                shutil.rmtree(existing.directory, ignore_errors=True)
            store.archive.remove(existing)
        directory = store.root / "archive" / project / "arc001" / label
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(session.directory, directory, dirs_exist_ok=True)
        archived = ArchivedSession(project, subject, label, session.tag, directory)
        store.archive.append(archived)
        store.remove_prearchive(session)
        return archived
