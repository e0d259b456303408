"""The PACS adapter: C-ECHO, C-FIND, C-MOVE and C-GET as a client, and our own storage SCP.

Everything pynetdicom-specific lives here; the rest of dqr-xnat sees :class:`StudyInfo`,
:class:`SeriesInfo`, :class:`RetrieveResult` and the errors of :mod:`dqr_xnat.errors`.

Decisions (see pacs-notes.md for the measurements behind them):

* **Statuses are judged by category**, never trusted blindly. An empty status (timeout, abort) and a
  refused, rejected or aborted association are :class:`RetriablePacsError`; C-FIND failure statuses
  are :class:`PacsError` with the hex code, except 0xA7xx (out of resources: transient).
* **Completeness is ours to check.** After every retrieval the instances that reached disk are
  compared with what was announced: the caller's ``expected``, else NumberOfStudyRelatedInstances
  (or the chosen series' NumberOfSeriesRelatedInstances), else an IMAGE-level C-FIND, and always
  with the sub-operation counts. A shortfall is :class:`IncompleteRetrieveError` even when the PACS
  said success (Orthanc aborts a whole move with 0xC000 and zero counts; DQR missed exactly this).
* **Retries live here and only here**, from :data:`RETRY_TABLE` (one row per operation), with
  exponential backoff and jitter, and only for :class:`RetriableError`. Layers above never retry
  an adapter call in a loop of their own (retries must not multiply); the pipeline's slow
  whole-task retry is the only other layer. A retrieval retry re-requests only the series that
  are short when the per-series counts are known, else the whole study; files are named by
  SOPInstanceUID, so a re-sent instance overwrites itself and nothing is duplicated.
* **Never more than ``max_associations`` associations to one PACS** (keyed by host and port), across
  all threads of the process, via an :class:`AssociationLimiter`; the default
  :data:`PROCESS_LIMITER` can be replaced by a cross-process one (file lock, shared store).
* **TCP_NODELAY on every socket** (EVT_CONN_OPEN), and pynetdicom's identifier logging is off:
  identifiers are PHI.
* **Chosen series are requested one SERIES-level identifier each** (on one association), never as a
  UID list: pynetdicom's qrscp fails a C-MOVE keyed on a SeriesInstanceUID list, and reports it as
  0xA801.
* **pynetdicom#875 is guarded against** (:class:`_ResponseWatch`): its reactor thread sometimes
  swallows a response (measured: 1 C-FIND in ~300). A swallowed C-FIND answer is detected and the
  query retried instead of silently losing a study; a swallowed final response aborts the
  association after a few seconds instead of waiting out the DIMSE timeout.
* The storage SCP streams each instance to a temporary file (pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET``) and renames it into place: bounded memory, pixel data never
  decoded, the bytes exactly as the PACS sent them. It refuses unknown calling AE titles at
  association time, and instances of studies it is not currently retrieving with 0x0124
  (Refused: Not Authorised: the general DIMSE status for "you may not store this here"), oversize
  instances with 0xA700 (Out of Resources), and unreadable ones with 0xC000 (Cannot Understand).
  It holds no module state besides pynetdicom's ``_config``, so it can run in a child process.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    AllTransferSyntaxes,
)
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND_MODEL,
    StudyRootQueryRetrieveInformationModelGet as GET_MODEL,
    StudyRootQueryRetrieveInformationModelMove as MOVE_MODEL,
    Verification,
)
from pynetdicom.status import code_to_category

from dqr_xnat.config import PacsConfig, ReceiverConfig
from dqr_xnat.errors import IncompleteRetrieveError, PacsError, RetriableError, RetriablePacsError
from dqr_xnat.logs import phi_hash
from dqr_xnat.model import RetrieveMethod, RetrieveResult, SeriesInfo, StudyInfo
from dqr_xnat.stages.queries import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS, needs_specific_character_set

log = logging.getLogger(__name__)

# Identifiers are PHI: pynetdicom must never log them (it does at DEBUG/INFO by default).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# Incoming C-STOREs stream into a temporary Part-10 file instead of memory (pacs-notes §3).
_config.STORE_RECV_CHUNKED_DATASET = True

#: Status codes used by our storage SCP when it refuses an instance.
STATUS_NOT_AUTHORISED = 0x0124  # a study we are not retrieving, or from an unexpected peer
STATUS_OUT_OF_RESOURCES = 0xA700  # larger than receiver.max_instance_mb, or a disk error
STATUS_CANNOT_UNDERSTAND = 0xC000  # not a readable DICOM data set

#: After a C-MOVE ends short, wait this long without a new arrival before judging (asynchronous
#: PACS may send the final response before the last C-STORE sub-operation lands).
SETTLE_IDLE_SECONDS = 1.0

#: Transfer syntaxes we offer for each storage context of a C-GET, uncompressed first.
GET_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: A C-GET association holds at most 128 presentation contexts; one is the C-GET model itself.
MAX_GET_STORAGE_CONTEXTS = 127

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------
# Association limit


class AssociationLimiter(Protocol):
    """Grants a slot for one association to one PACS; blocks while the PACS is at its limit.

    The limit is ``pacs.max_associations``; PACS are told apart by :func:`pacs_key` (host, port),
    so two configured names for one server share its limit. Implementations must be thread-safe.
    The process-wide :class:`LocalAssociationLimiter` is the default; a cross-process one (a file
    lock per slot, or a shared counter) only needs this one method.
    """

    def slot(self, pacs: PacsConfig) -> AbstractContextManager[None]: ...


def pacs_key(pacs: PacsConfig) -> tuple[str, int]:
    """What identifies one PACS server for the association limit."""
    return (pacs.host.strip().lower(), pacs.port)


class LocalAssociationLimiter:
    """Counts open associations per PACS in this process (threads of every job and project)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open: dict[tuple[str, int], int] = {}

    @contextmanager
    def slot(self, pacs: PacsConfig) -> Iterator[None]:
        key = pacs_key(pacs)
        limit = max(1, pacs.max_associations)
        with self._cond:
            while self._open.get(key, 0) >= limit:
                self._cond.wait()
            self._open[key] = self._open.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._open[key] -= 1
                self._cond.notify_all()

    def open_count(self, pacs: PacsConfig) -> int:
        """Associations to ``pacs`` currently holding a slot (for metrics and tests)."""
        with self._cond:
            return self._open.get(pacs_key(pacs), 0)


#: The default limiter, shared by every PacsClient of this process.
PROCESS_LIMITER = LocalAssociationLimiter()


# ------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """How often one operation is tried, and how long to wait in between."""

    attempts: int
    backoff: float
    max_backoff: float = 300.0

    def delay(self, failures: int) -> float:
        """Exponential backoff with 'equal jitter': concurrent jobs do not retry in lockstep."""
        base = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        return base / 2 + random.uniform(0, base / 2)


#: The one table deciding retries for every PACS operation. A health check (echo) reports at
#: once instead of insisting; queries and retrievals use the PACS's configured retries.
RETRY_TABLE: Mapping[str, Callable[[PacsConfig], RetryPolicy]] = {
    "echo": lambda c: RetryPolicy(attempts=1, backoff=0.0),
    "find": lambda c: RetryPolicy(attempts=c.retries + 1, backoff=c.retry_backoff),
    "retrieve": lambda c: RetryPolicy(attempts=c.retries + 1, backoff=c.retry_backoff),
}


def _detail(exc: PacsError) -> str:
    """The message of ``exc`` without the "PACS 'name': " prefix PacsError adds."""
    text = str(exc)
    prefix = f"PACS '{exc.pacs}': "
    return text[len(prefix):] if exc.pacs and text.startswith(prefix) else text


# ------------------------------------------------------------------------------------------
# Helpers on datasets


def _nodelay(event: evt.Event) -> None:
    """Nagle off: DCMTK peers otherwise stall 40 ms per DIMSE exchange (pacs-notes §0)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def query_dataset(level: str, keys: Mapping[str, str], charset: str | None = None) -> Dataset:
    """A C-FIND/C-MOVE/C-GET identifier from DICOM keywords and matching strings.

    Matching strings are not values (``mr``, ``2023-``, ``DOE*``), so pydicom's value validation is
    off for them: its warnings would be noise, and the PACS decides what it accepts.
    """
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"not a DICOM keyword: {keyword!r}")
        vr = dictionary_VR(tag)
        ds.add(DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE))
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    """A returned value as text ('' when absent); multi-values joined with a backslash."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute (ModalitiesInStudy) as a tuple without blanks or repeats."""
    value = ds.get(keyword)
    if value is None:
        return ()
    items = value if isinstance(value, (MultiValue, list, tuple)) else str(value).split("\\")
    return tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))


def _count(ds: Dataset, keyword: str) -> int | None:
    """A returned IS count, or None when the PACS did not fill it in."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _study_from(ds: Dataset) -> StudyInfo | None:
    uid = _text(ds, "StudyInstanceUID").strip()
    if not uid:
        return None
    return StudyInfo(
        study_instance_uid=uid,
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        modalities=_values(ds, "ModalitiesInStudy"),
        number_of_series=_count(ds, "NumberOfStudyRelatedSeries"),
        number_of_instances=_count(ds, "NumberOfStudyRelatedInstances"),
    )


def _series_from(ds: Dataset) -> SeriesInfo | None:
    uid = _text(ds, "SeriesInstanceUID").strip()
    if not uid:
        return None
    return SeriesInfo(
        series_instance_uid=uid,
        series_number=_text(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
        number_of_instances=_count(ds, "NumberOfSeriesRelatedInstances"),
    )


def _max_count(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def merge_study_info(a: StudyInfo, b: StudyInfo) -> StudyInfo:
    """One study from two answers about it: first non-blank text, union of modalities, max counts.

    Some PACS answer once per instance (pynetdicom's qrscp), and a row with a backslash list runs
    several C-FINDs that may return the same study.
    """
    if a.study_instance_uid != b.study_instance_uid:
        raise ValueError("merge_study_info: different studies")
    texts = {
        name: getattr(a, name) or getattr(b, name)
        for name in (
            "patient_name", "patient_id", "patient_birth_date", "accession_number", "study_date",
            "study_time", "study_id", "study_description",
        )
    }
    return StudyInfo(
        study_instance_uid=a.study_instance_uid,
        modalities=tuple(dict.fromkeys(a.modalities + b.modalities)),
        number_of_series=_max_count(a.number_of_series, b.number_of_series),
        number_of_instances=_max_count(a.number_of_instances, b.number_of_instances),
        **texts,
    )


def merge_studies(studies: Iterable[StudyInfo]) -> list[StudyInfo]:
    """Studies merged by StudyInstanceUID, in the order first seen."""
    merged: dict[str, StudyInfo] = {}
    for study in studies:
        uid = study.study_instance_uid
        merged[uid] = merge_study_info(merged[uid], study) if uid in merged else study
    return list(merged.values())


def _merge_series(series: Iterable[SeriesInfo]) -> list[SeriesInfo]:
    merged: dict[str, SeriesInfo] = {}
    for s in series:
        old = merged.get(s.series_instance_uid)
        if old is None:
            merged[s.series_instance_uid] = s
            continue
        merged[s.series_instance_uid] = SeriesInfo(
            series_instance_uid=s.series_instance_uid,
            series_number=old.series_number or s.series_number,
            series_description=old.series_description or s.series_description,
            modality=old.modality or s.modality,
            number_of_instances=_max_count(old.number_of_instances, s.number_of_instances),
        )
    return list(merged.values())


_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def instance_file_name(sop_instance_uid: str) -> str:
    """The file name for one instance: the UID if it is a plain UID, else a hash of it.

    DICOM values never reach a path unsanitised: only digits and dots survive, and a value that is
    not a well-formed UID (``../x``, 65 characters, blanks) becomes ``x<sha256>.dcm``.
    """
    uid = sop_instance_uid.strip().rstrip("\x00")
    if 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return f"{uid}.dcm"
    return f"x{phi_hash(sop_instance_uid, 40)}.dcm"


# ------------------------------------------------------------------------------------------
# Receiving instances (storage SCP and C-GET share this)


@dataclass
class Incoming:
    """One received data set staged on disk, with the UIDs we route it by."""

    path: Path
    owned: bool  # ours to remove if refused (pynetdicom removes its own chunked temp files)
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    size: int

    @classmethod
    def read(cls, path: Path, *, owned: bool, sop_instance_uid: str = "") -> Incoming:
        """The file and its UIDs, read from the header only ("" for one that is absent)."""
        header = dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        return cls(
            path=path,
            owned=owned,
            sop_instance_uid=sop_instance_uid or str(header.get("SOPInstanceUID", "")),
            study_instance_uid=str(header.get("StudyInstanceUID", "")),
            series_instance_uid=str(header.get("SeriesInstanceUID", "")),
            size=path.stat().st_size,
        )

    def discard(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)


def _stage(event: evt.Event, staging: Path) -> Incoming:
    """The incoming data set as a Part-10 file, plus its UIDs read from the header only."""
    try:
        path, owned = Path(event.dataset_path), False
    except AttributeError:  # STORE_RECV_CHUNKED_DATASET was turned off by someone: still stream
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=staging)
        with os.fdopen(fd, "wb") as out:
            out.write(event.encoded_dataset())
        path, owned = Path(name), True
    return Incoming.read(path, owned=owned, sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""))


class StudyReceipt:
    """Instances of one study arriving into ``directory``: thread-safe counts and file list."""

    def __init__(self, study_instance_uid: str, directory: Path, *, max_bytes: int) -> None:
        self.study_instance_uid = study_instance_uid
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._files: dict[str, Path] = {}
        self._series: dict[str, set[str]] = {}
        self.refused_oversize = 0
        self.errors: list[str] = []
        self._arrivals = 0

    @property
    def received(self) -> int:
        """Distinct instances written (a re-sent instance counts once)."""
        with self._cond:
            return len(self._files)

    @property
    def refused(self) -> int:
        with self._cond:
            return self.refused_oversize + len(self.errors)

    @property
    def files(self) -> tuple[Path, ...]:
        with self._cond:
            return tuple(sorted(self._files.values()))

    def per_series(self) -> dict[str, frozenset[str]]:
        """File names received per SeriesInstanceUID."""
        with self._cond:
            return {uid: frozenset(names) for uid, names in self._series.items()}

    def accept(self, item: Incoming) -> int:
        """Move the staged file into place; the C-STORE status to answer."""
        if item.size > self.max_bytes:
            item.discard()
            self.record_oversize()
            log.warning(
                "refused an instance of %.0f MB of study %s: larger than receiver.max_instance_mb",
                item.size / 2**20, phi_hash(self.study_instance_uid),
            )
            return STATUS_OUT_OF_RESOURCES
        name = instance_file_name(item.sop_instance_uid)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.move(str(item.path), str(self.directory / name))
        except OSError as exc:
            item.discard()
            self.record_error(f"{type(exc).__name__}: {exc.strerror or exc}")
            log.error("cannot store an instance of study %s: %s", phi_hash(self.study_instance_uid), exc)
            return STATUS_OUT_OF_RESOURCES
        self.record(name, item.series_instance_uid)
        return 0x0000

    # The three outcomes of accept(), public so that a receiver in another process (see
    # dqr_xnat.adapters.receivers) can report what it did with an instance of this study.

    def record(self, name: str, series_instance_uid: str) -> None:
        """Count an instance that is now at ``directory / name``."""
        with self._cond:
            self._files[name] = self.directory / name
            self._series.setdefault(series_instance_uid, set()).add(name)
            self._arrivals += 1
            self._cond.notify_all()

    def record_oversize(self) -> None:
        with self._cond:
            self.refused_oversize += 1

    def record_error(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)

    def wait_idle(self, done: Callable[[], bool], *, idle: float = SETTLE_IDLE_SECONDS) -> None:
        """Wait until ``done()`` or until no instance arrived for ``idle`` seconds."""
        with self._cond:
            while not done():
                before = self._arrivals
                self._cond.wait(idle)
                if self._arrivals == before:
                    return


def _store_handler(
    lookup: Callable[[str], StudyReceipt | None], staging: Path, who: str,
    on_unreadable: Callable[[], None] | None = None,
) -> Callable[[evt.Event], int]:
    """An EVT_C_STORE handler routing each instance to the receipt of its study."""

    def on_store(event: evt.Event) -> int:
        try:
            item = _stage(event, staging)
        except (InvalidDicomError, OSError, ValueError, KeyError) as exc:
            log.warning("%s: refused an unreadable instance from %s: %s", who,
                        event.assoc.requestor.ae_title, type(exc).__name__)
            if on_unreadable is not None:
                on_unreadable()
            return STATUS_CANNOT_UNDERSTAND
        receipt = lookup(item.study_instance_uid)
        if receipt is None:
            item.discard()
            log.warning(
                "%s: refused an instance of study %s from %s: not a study being retrieved",
                who, phi_hash(item.study_instance_uid), event.assoc.requestor.ae_title,
            )
            return STATUS_NOT_AUTHORISED
        return receipt.accept(item)

    return on_store


# ------------------------------------------------------------------------------------------
# Storage SCP


class StorageSCP:
    """Our C-MOVE destination: accepts only configured PACS, and only studies being retrieved.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :meth:`expect` registers a
    study for the duration of its retrieval. Files land as ``<directory>/<SOPInstanceUID>.dcm``
    (see :func:`instance_file_name`). ``refused_unexpected``, ``refused_unreadable`` and ``rejected_associations`` count
    what was turned away.
    """

    def __init__(self, config: ReceiverConfig, allowed: Iterable[PacsConfig], staging_root: Path) -> None:
        self.config = config
        self.allowed_ae_titles = tuple(sorted({p.ae_title.strip() for p in allowed}))
        if not self.allowed_ae_titles:
            raise ValueError("StorageSCP needs at least one PACS allowed to send to it")
        self.staging_root = Path(staging_root)
        self._lock = threading.Lock()
        self._expected: dict[str, StudyReceipt] = {}
        self._server: Any = None
        self._own_tempdir: str | None = None
        self.refused_unexpected = 0
        self.refused_unreadable = 0
        self.rejected_associations = 0

    @property
    def ae_title(self) -> str:
        return self.config.ae_title

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS chose for port 0)."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StorageSCP:
        if self._server is not None:
            return self
        self.staging_root.mkdir(parents=True, exist_ok=True)
        self._use_staging_for_tempfiles()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.allowed_ae_titles)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:  # no 128-context limit on the acceptor side
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        ae.maximum_pdu_size = 0  # unlimited receive PDU: 10-15 % faster (pacs-notes §3)
        handlers = [
            (evt.EVT_CONN_OPEN, _nodelay),
            (evt.EVT_C_STORE, _store_handler(self._receipt_for, self.staging_root, "receiver",
                                             self._on_unreadable)),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = self._serve(ae, handlers)
        except OSError as exc:
            self._restore_tempdir()
            raise PacsError(
                f"cannot listen on {self.config.host}:{self.config.port} as {self.config.ae_title}: "
                f"{exc.strerror or exc}; check receiver.host/port in the configuration"
            ) from exc
        log.info("receiver %s listening on %s:%d", self.ae_title, self.config.host, self.port)
        return self

    def _serve(self, ae: AE, handlers: list[Any]) -> Any:
        """Start the server thread; a hook, so a worker process can serve a socket shared by several."""
        return ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)

    def problem(self) -> str | None:
        """Why the receiver cannot take C-MOVEs now, for /health; None when it can."""
        return None if self.running else f"receiver {self.ae_title} is not listening"

    def stop(self) -> None:
        """Stop listening and abort associations still open (pynetdicom's shutdown leaves them).

        Only established ones: a connection that has not sent its A-ASSOCIATE-RQ yet (a health
        check's bare TCP connect) cannot be aborted (pynetdicom raises InvalidEventError in its
        reactor thread); it ends with its close or pynetdicom's ARTIM timer.
        """
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            for assoc in list(server.ae.active_associations):
                if assoc.is_established:
                    assoc.abort()
        self._restore_tempdir()

    @contextmanager
    def expect(self, study_instance_uid: str, directory: Path) -> Iterator[StudyReceipt]:
        """Accept instances of this study into ``directory`` while the block runs."""
        receipt = self._new_receipt(study_instance_uid, directory)
        with self._lock:
            if study_instance_uid in self._expected:
                raise RetriablePacsError(
                    f"study {phi_hash(study_instance_uid)} is already being retrieved by another job; "
                    "it will be tried again"
                )
            self._expected[study_instance_uid] = receipt
        try:
            yield receipt
        finally:
            with self._lock:
                self._expected.pop(study_instance_uid, None)

    def _new_receipt(self, study_instance_uid: str, directory: Path) -> StudyReceipt:
        return StudyReceipt(study_instance_uid, directory, max_bytes=self.config.max_instance_mb * 2**20)

    def _receipt_for(self, study_instance_uid: str) -> StudyReceipt | None:
        with self._lock:
            receipt = self._expected.get(study_instance_uid)
            if receipt is None:
                self.refused_unexpected += 1
            return receipt

    def _on_unreadable(self) -> None:
        with self._lock:
            self.refused_unreadable += 1

    def _on_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self.rejected_associations += 1
        requestor = event.assoc.requestor
        log.warning(
            "receiver %s refused an association from AE '%s' at %s:%s: only %s may send to it",
            self.ae_title, requestor.ae_title, requestor.address, requestor.port,
            ", ".join(self.allowed_ae_titles),
        )

    def _use_staging_for_tempfiles(self) -> None:
        """Make pynetdicom's chunked temp files land on the staging filesystem (rename, not copy).

        pynetdicom creates them with tempfile's default directory; only when that is on another
        filesystem and nobody has chosen one yet do we point it at the staging root.
        """
        incoming = self.staging_root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        chosen = tempfile.tempdir  # read first: gettempdir() below caches its answer into it
        if os.stat(tempfile.gettempdir()).st_dev == os.stat(incoming).st_dev:
            return
        if chosen is None:
            tempfile.tempdir = self._own_tempdir = str(incoming)
        else:
            log.warning("temporary files are on another filesystem than %s: instances will be copied",
                        self.staging_root)

    def _restore_tempdir(self) -> None:
        if self._own_tempdir is not None and tempfile.tempdir == self._own_tempdir:
            tempfile.tempdir = None
        self._own_tempdir = None


# ------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True)
class _SubOps:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0

    @staticmethod
    def of(status: Dataset | None, fallback: _SubOps | None = None) -> _SubOps:
        fallback = fallback or _SubOps()

        def get(keyword: str, default: int) -> int:
            value = status.get(keyword) if status is not None else None
            try:
                return int(value) if value not in (None, "") else default
            except (TypeError, ValueError):
                return default

        return _SubOps(
            completed=get("NumberOfCompletedSuboperations", fallback.completed),
            failed=get("NumberOfFailedSuboperations", fallback.failed),
            warning=get("NumberOfWarningSuboperations", fallback.warning),
            remaining=get("NumberOfRemainingSuboperations", fallback.remaining),
        )


class _ResponseWatch:
    """Watches the DIMSE responses reaching one association, whoever takes them off the queue.

    pynetdicom 3.0 has a race (pynetdicom#875): the association's reactor thread can take a
    response off the DIMSE queue before the send_c_*() generator does, and drops it ("Received
    unexpected C-FIND service message"); measured about 1 C-FIND in 300 on a 2-core machine.
    A lost *pending* C-FIND answer would silently drop a study: :attr:`pending_find` counts them
    as they arrive (public EVT_DIMSE_RECV event) so the caller can compare. A lost *final*
    response would leave the generator waiting for the whole DIMSE timeout: if nobody has taken
    it after :attr:`grace` seconds, the association is aborted, which ends the wait at once.
    """

    grace = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending_find = 0
        self.lost_final = False
        self._finals_arrived = 0
        self._finals_taken = 0
        self._timer: threading.Timer | None = None

    def on_message(self, event: evt.Event) -> None:
        command = event.message.command_set
        field = command.get("CommandField")
        if field is None or not field & 0x8000:  # a request (C-STORE of a C-GET): not ours to count
            return
        if command.get("Status") in (0xFF00, 0xFF01):
            if field == 0x8020:
                with self._lock:
                    self.pending_find += 1
            return
        timer = threading.Timer(self.grace, self._check, args=(event.assoc,))
        timer.daemon = True
        with self._lock:
            self._finals_arrived += 1
            self._timer = timer
        timer.start()

    def took_final(self) -> None:
        """The generator has the final response: no need to watch any longer."""
        with self._lock:
            self._finals_taken += 1
        self.close()

    def close(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _check(self, assoc: Association) -> None:
        with self._lock:
            lost = self._finals_taken < self._finals_arrived
            self.lost_final = self.lost_final or lost
        if lost:
            log.warning("a final DIMSE response was lost inside pynetdicom (#875); aborting the association")
            assoc.abort()

    def no_response(self, what: str, timeout: float) -> str:
        """Why a generator ended without a final response, for the error message."""
        if self.lost_final:
            return f"the final answer to {what} arrived but was lost inside pynetdicom (#875)"
        return f"no answer to {what} within {timeout:g} s, or the association was aborted"


@dataclass
class _Retrieval:
    """What one retrieve() call knows across its attempts."""

    study_uid: str
    directory: Path
    chosen: tuple[str, ...] | None  # series the caller asked for (None = whole study)
    expected: int | None
    series_counts: dict[str, int] | None = None  # announced instances per series
    sop_classes: set[str] = field(default_factory=set)
    request: tuple[str, ...] | None = None  # series to request in this attempt (None = all chosen)
    files: dict[str, Path] = field(default_factory=dict)
    per_series: dict[str, set[str]] = field(default_factory=dict)
    attempts: int = 0


class PacsClient:
    """Query and retrieve from one configured PACS.

    Every public method opens its own association(s), holding a slot of ``limiter`` (default
    :data:`PROCESS_LIMITER`) for each, and retries transient failures per :data:`RETRY_TABLE`.
    ``event_handlers`` are extra pynetdicom handlers bound to every association we open
    (instrumentation; e.g. counting EVT_ESTABLISHED).
    """

    def __init__(
        self,
        config: PacsConfig,
        *,
        limiter: AssociationLimiter | None = None,
        event_handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.limiter: AssociationLimiter = limiter or PROCESS_LIMITER
        self.event_handlers = tuple(event_handlers)
        self._sleep = sleep
        self.settle_idle = SETTLE_IDLE_SECONDS

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def address(self) -> str:
        """``AE@host:port``: how messages name the PACS."""
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}"

    def _error(self, cls: type[PacsError], message: str) -> PacsError:
        return cls(message, pacs=self.config.name)

    # -- public operations --------------------------------------------------------------

    def echo(self) -> float:
        """C-ECHO; the round trip in milliseconds, association set-up and release included."""
        return self._retrying("echo", self._echo_once)

    def find_studies(self, identifier: Mapping[str, str]) -> list[StudyInfo]:
        """One study-level C-FIND (Study Root); answers merged by StudyInstanceUID.

        ``identifier`` is one of :func:`dqr_xnat.stages.queries.build_queries`' identifiers
        (criteria plus return keys mapped to ""). SpecificCharacterSet is sent when a value is
        not ASCII. Nothing is verified here: see :mod:`dqr_xnat.stages.verify`.
        """
        return self._retrying("find", lambda: self._find_studies_once(identifier))

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of one study (series-level C-FIND), merged by SeriesInstanceUID."""
        return self._retrying("find", lambda: self._find_series_once(study_uid))

    def count_instances(self, study_uid: str, series_uids: Sequence[str] | None = None) -> int:
        """Instances of a study (or of the given series) by IMAGE-level C-FIND, one per series.

        The fallback for PACS that return no NumberOf*RelatedInstances (dcmqrscp, qrscp).
        """
        return self._retrying("find", lambda: len(self._list_instances(study_uid, series_uids)))

    def retrieve(
        self,
        study_uid: str,
        directory: Path,
        *,
        series_uids: Sequence[str] | None = None,
        expected: int | None = None,
        receiver: StorageSCP | None = None,
    ) -> RetrieveResult:
        """Bring every instance of the study (or of ``series_uids``) into ``directory``.

        By C-MOVE to ``receiver`` (which must be running; the destination is its AE title) or by
        C-GET, per ``config.retrieve``; always keyed by StudyInstanceUID (and SeriesInstanceUIDs at
        SERIES level). ``expected`` is the instance count to insist on; without it the PACS's
        announced count is looked up (see module docstring).

        Raises
        ------
        IncompleteRetrieveError
            Fewer instances arrived than announced (after the retries).
        RetriablePacsError
            The PACS could not be reached, timed out or aborted (after the retries).
        PacsError
            The PACS refused in a way retrying cannot fix (e.g. unknown move destination).
        """
        chosen = tuple(dict.fromkeys(series_uids)) if series_uids is not None else None
        if chosen == ():
            raise ValueError("retrieve: series_uids is empty; pass None for the whole study")
        if self.config.retrieve is RetrieveMethod.C_MOVE and (receiver is None or not receiver.running):
            raise ValueError("retrieve by C-MOVE needs a running StorageSCP as receiver")
        state = _Retrieval(study_uid, Path(directory), chosen, expected)
        state.directory.mkdir(parents=True, exist_ok=True)
        return self._retrying("retrieve", lambda: self._retrieve_attempt(state, receiver))

    # -- retries ----------------------------------------------------------------------------

    def _retrying(self, operation: str, attempt: Callable[[], _T]) -> _T:
        policy = RETRY_TABLE[operation](self.config)
        failures = 0
        while True:
            try:
                return attempt()
            except RetriableError as exc:
                failures += 1
                if failures >= policy.attempts:
                    if failures > 1 and isinstance(exc, PacsError):
                        raise type(exc)(
                            f"{_detail(exc)} (gave up after {failures} attempts)", pacs=exc.pacs
                        ) from exc
                    raise
                delay = policy.delay(failures)
                log.warning("%s on PACS '%s' failed (attempt %d of %d), retrying in %.1f s: %s",
                            operation, self.name, failures, policy.attempts, delay, exc)
                self._sleep(delay)

    # -- associations -----------------------------------------------------------------------

    @contextmanager
    def _association(
        self,
        contexts: Sequence[tuple[str, Sequence[str]]],
        *,
        roles: Sequence[Any] = (),
        handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
        max_pdu: int = 16382,
    ) -> Iterator[tuple[Association, _ResponseWatch]]:
        """An established association holding a limiter slot; released (or aborted) afterwards."""
        t = self.config.timeouts
        ae = AE(ae_title=self.config.calling_ae_title)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = t.acse, t.dimse, t.network
        ae.connection_timeout = t.connect
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        opened = threading.Event()

        def on_open(event: evt.Event) -> None:
            opened.set()
            _nodelay(event)

        watch = _ResponseWatch()
        bound = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_DIMSE_RECV, watch.on_message), *handlers,
                 *self.event_handlers]
        with self.limiter.slot(self.config):
            assoc = ae.associate(
                self.config.host, self.config.port, ae_title=self.config.ae_title,
                ext_neg=list(roles) or None, max_pdu=max_pdu, evt_handlers=bound,
            )
            if not assoc.is_established:
                raise self._association_failure(assoc, opened.is_set())
            try:
                yield assoc, watch
            except PacsError:
                assoc.release()  # the PACS answered, so part politely (a no-op if it aborted)
                raise
            except BaseException:
                assoc.abort()
                raise
            else:
                assoc.release()
            finally:
                watch.close()

    def _association_failure(self, assoc: Association, connected: bool) -> PacsError:
        ours, theirs = self.config.calling_ae_title, self.config.ae_title
        if not connected:
            return self._error(RetriablePacsError, (
                f"cannot connect to {self.address} (connection refused or no answer within "
                f"{self.config.timeouts.connect:g} s): check that the PACS is running, its host and "
                "port in the configuration, and any firewall in between"
            ))
        rsp = assoc.acceptor.primitive
        if assoc.is_rejected and rsp is not None:
            return self._error(RetriablePacsError, (
                f"{self.address} rejected the association ({rsp.result_str}; {rsp.source_str}: "
                f"{rsp.reason_str}): check that the PACS lists our calling AE title '{ours}' (and "
                f"our host) among its known AEs, and that its AE title really is '{theirs}'"
            ))
        if rsp is not None and rsp.result == 0x00:
            return self._error(PacsError, (
                f"{self.address} accepted none of the proposed presentation contexts: it does "
                "not offer the service we asked for"
            ))
        return self._error(RetriablePacsError, (
            f"{self.address} closed or aborted the association during negotiation (no answer "
            f"within {self.config.timeouts.acse:g} s, or an A-ABORT): check the AE titles (ours "
            f"'{ours}', the PACS '{theirs}'), the PACS's list of known AEs, and the PACS's log"
        ))

    def _require_context(self, assoc: Association, sop_class: str, what: str) -> None:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise self._error(PacsError, f"{self.address} does not support {what}")

    # -- operations, one attempt each -------------------------------------------------------

    def _echo_once(self) -> float:
        start = time.perf_counter()
        with self._association([(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as (assoc, watch):
            status = assoc.send_c_echo()
            if not status:
                raise self._error(RetriablePacsError, watch.no_response("C-ECHO", self.config.timeouts.dimse))
            watch.took_final()
            if status.Status != 0x0000:
                raise self._error(PacsError, f"C-ECHO answered with status 0x{status.Status:04X}")
        return (time.perf_counter() - start) * 1000.0

    def _find_studies_once(self, identifier: Mapping[str, str]) -> list[StudyInfo]:
        keys = dict(identifier)
        for key in STUDY_RETURN_KEYS:
            keys.setdefault(key, "")
        answers = self._c_find("STUDY", [keys], needs_specific_character_set(identifier))[0]
        studies = [s for s in map(_study_from, answers) if s is not None]
        if len(studies) < len(answers):
            log.warning("PACS '%s' sent %d study answer(s) without StudyInstanceUID; ignored",
                        self.name, len(answers) - len(studies))
        return merge_studies(studies)

    def _find_series_once(self, study_uid: str) -> list[SeriesInfo]:
        keys = {key: "" for key in SERIES_RETURN_KEYS}
        keys["StudyInstanceUID"] = study_uid
        answers = self._c_find("SERIES", [keys])[0]
        return _merge_series(s for s in map(_series_from, answers) if s is not None)

    def _list_instances(self, study_uid: str, series_uids: Sequence[str] | None) -> dict[str, tuple[str, str]]:
        """SOPInstanceUID -> (SeriesInstanceUID, SOPClassUID or ''), one IMAGE-level C-FIND per series.

        Hierarchical: an IMAGE-level query names its study and series (strict PACS require it).
        """
        if series_uids is None:
            series_uids = [s.series_instance_uid for s in self._find_series_once(study_uid)]
        queries = [
            {"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid, "SOPInstanceUID": "", "SOPClassUID": ""}
            for uid in series_uids
        ]
        listing: dict[str, tuple[str, str]] = {}
        for uid, answers in zip(series_uids, self._c_find("IMAGE", queries)):
            for ds in answers:
                sop = _text(ds, "SOPInstanceUID").strip()
                if sop:
                    listing[sop] = (uid, _text(ds, "SOPClassUID").strip())
        return listing

    def _c_find(
        self, level: str, queries: Sequence[Mapping[str, str]], charset: str | None = None
    ) -> list[list[Dataset]]:
        """Run C-FINDs on one association; the answers of each query, in order."""
        results: list[list[Dataset]] = []
        contexts = [(FIND_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        with self._association(contexts) as (assoc, watch):
            self._require_context(assoc, FIND_MODEL, "Study Root C-FIND")
            for keys in queries:
                results.append(self._one_find(assoc, watch, query_dataset(level, keys, charset), level))
        return results

    def _one_find(
        self, assoc: Association, watch: _ResponseWatch, request: Dataset, level: str
    ) -> list[Dataset]:
        answers: list[Dataset] = []
        before, pending = watch.pending_find, 0
        for status, identifier in assoc.send_c_find(request, FIND_MODEL):
            if not status:
                what = f"a {level}-level C-FIND"
                raise self._error(RetriablePacsError, watch.no_response(what, self.config.timeouts.dimse))
            code = int(status.Status)
            category = code_to_category(code)
            if category == "Pending":
                pending += 1
                if identifier is not None:
                    answers.append(identifier)
                continue
            watch.took_final()
            if category in ("Success", "Warning"):
                if category == "Warning":
                    log.warning("PACS '%s': C-FIND ended with warning 0x%04X", self.name, code)
                if watch.pending_find - before > pending:
                    raise self._error(RetriablePacsError, (
                        f"{watch.pending_find - before - pending} {level}-level C-FIND answer(s) arrived but "
                        "were lost inside pynetdicom (its reactor race, pynetdicom#875); the query is repeated"
                    ))
                return answers
            elif 0xA700 <= code <= 0xA7FF:
                raise self._error(RetriablePacsError, f"C-FIND refused: out of resources (0x{code:04X})")
            else:
                hint = " (the PACS cannot process this query: an unsupported key or value?)" if code >= 0xC000 else ""
                raise self._error(PacsError, f"C-FIND failed with status 0x{code:04X} ({category}){hint}")
        return answers

    # -- retrieval ----------------------------------------------------------------------------

    def _retrieve_attempt(self, state: _Retrieval, receiver: StorageSCP | None) -> RetrieveResult:
        state.attempts += 1
        if state.expected is None:
            state.expected = self._announced_instances(state)
        if state.attempts > 1:
            self._narrow(state)
        if self.config.retrieve is RetrieveMethod.C_MOVE:
            assert receiver is not None
            with receiver.expect(state.study_uid, state.directory) as receipt:
                status, subops = self._c_move(state, receiver.ae_title)
                if status and code_to_category(int(status.Status)) != "Failure":
                    receipt.wait_idle(lambda: self._missing(state, receipt) == 0, idle=self.settle_idle)
        else:
            max_mb = receiver.config.max_instance_mb if receiver else ReceiverConfig().max_instance_mb
            receipt = StudyReceipt(state.study_uid, state.directory, max_bytes=max_mb * 2**20)
            staging = receiver.staging_root if receiver else state.directory
            status, subops = self._c_get(state, receipt, staging)
        self._collect(state, receipt)
        self._judge(state, receipt, status, subops, receiver)
        return RetrieveResult(
            study_instance_uid=state.study_uid,
            directory=state.directory,
            files=tuple(sorted(state.files.values())),
            expected=state.expected,
            completed=subops.completed,
            failed=subops.failed,
            warning=subops.warning,
            status=int(status.Status) if status else None,
        )

    def _announced_instances(self, state: _Retrieval) -> int | None:
        """What the PACS says the study (or the chosen series) holds; None if it will not say."""
        try:
            if state.chosen is None:
                found = self._find_studies_once({"StudyInstanceUID": state.study_uid})
                if found and found[0].number_of_instances:
                    return found[0].number_of_instances
            series = self._find_series_once(state.study_uid)
            wanted = [s for s in series if state.chosen is None or s.series_instance_uid in state.chosen]
            if wanted and all(s.number_of_instances is not None for s in wanted):
                state.series_counts = {s.series_instance_uid: int(s.number_of_instances or 0) for s in wanted}
            else:
                uids = list(state.chosen) if state.chosen is not None else [s.series_instance_uid for s in series]
                listing = self._list_instances(state.study_uid, uids)
                state.sop_classes = {cls for _series, cls in listing.values() if cls}
                state.series_counts = {uid: 0 for uid in uids}
                for series_uid, _cls in listing.values():
                    state.series_counts[series_uid] = state.series_counts.get(series_uid, 0) + 1
            return sum(state.series_counts.values())
        except RetriableError:
            raise
        except PacsError as exc:  # e.g. no IMAGE-level C-FIND: fall back to sub-operation counts
            log.warning("PACS '%s': cannot learn the instance count of study %s (%s); relying on "
                        "the sub-operation counts", self.name, phi_hash(state.study_uid), exc)
            return None

    def _narrow(self, state: _Retrieval) -> None:
        """Before a retry: request only the series that are short, when their counts are known.

        The counts come from the first attempt's look-up, else from one SERIES-level C-FIND now
        (Orthanc gives them); without them the whole study (or chosen series) is requested again.
        """
        if state.series_counts is None:
            series = self._find_series_once(state.study_uid)
            wanted = [s for s in series if state.chosen is None or s.series_instance_uid in state.chosen]
            if wanted and all(s.number_of_instances is not None for s in wanted):
                state.series_counts = {s.series_instance_uid: int(s.number_of_instances or 0) for s in wanted}
        if state.series_counts is None:
            state.request = None
            return
        short = tuple(uid for uid, n in state.series_counts.items() if len(state.per_series.get(uid, ())) < n)
        state.request = short or None

    def _requests(self, state: _Retrieval) -> list[Dataset]:
        """One STUDY-level identifier, or one SERIES-level identifier per series.

        One per series rather than a UID list: list-of-UID matching is standard, but pynetdicom's
        qrscp fails a C-MOVE keyed on a SeriesInstanceUID list (and reports it as 0xA801).
        """
        series = state.request or state.chosen
        if series:
            return [query_dataset("SERIES", {"StudyInstanceUID": state.study_uid, "SeriesInstanceUID": uid})
                    for uid in series]
        return [query_dataset("STUDY", {"StudyInstanceUID": state.study_uid})]

    def _c_move(self, state: _Retrieval, destination: str) -> tuple[Dataset | None, _SubOps]:
        contexts = [(MOVE_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        with self._association(contexts) as (assoc, watch):
            self._require_context(assoc, MOVE_MODEL, "Study Root C-MOVE")
            return self._follow_all(
                watch, (assoc.send_c_move(request, destination, MOVE_MODEL) for request in self._requests(state))
            )

    def _c_get(self, state: _Retrieval, receipt: StudyReceipt, staging: Path) -> tuple[Dataset | None, _SubOps]:
        """C-GET with storage contexts (SCP role) for the SOP classes seen, then common ones (<= 127)."""
        defaults = (cx.abstract_syntax for cx in StoragePresentationContexts)
        classes = list(dict.fromkeys([*sorted(state.sop_classes), *defaults]))[:MAX_GET_STORAGE_CONTEXTS]
        contexts = [(GET_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        contexts += [(uid, GET_TRANSFER_SYNTAXES) for uid in classes]
        roles = [build_role(uid, scp_role=True) for uid in classes]
        study_uid = state.study_uid
        handler = _store_handler(lambda study: receipt if study == study_uid else None, staging,
                                 f"C-GET from {self.name}")
        with self._association(
            contexts, roles=roles, handlers=[(evt.EVT_C_STORE, handler)], max_pdu=0
        ) as (assoc, watch):
            self._require_context(assoc, GET_MODEL, "Study Root C-GET")
            return self._follow_all(
                watch, (assoc.send_c_get(request, GET_MODEL) for request in self._requests(state))
            )

    @classmethod
    def _follow_all(
        cls, watch: _ResponseWatch, operations: Iterator[Iterator[tuple[Dataset, Dataset | None]]]
    ) -> tuple[Dataset | None, _SubOps]:
        """Run the operations in turn; stop at the first that fails. Counts are summed."""
        total = _SubOps()
        final: Dataset | None = None
        for responses in operations:
            status, subops = cls._follow(watch, responses)
            total = _SubOps(total.completed + subops.completed, total.failed + subops.failed,
                            total.warning + subops.warning, subops.remaining)
            if status is None or code_to_category(int(status.Status)) not in ("Success", "Warning"):
                return status, total
            if final is None or code_to_category(int(final.Status)) == "Success":
                final = status  # a warning, once seen, is what the whole retrieval reports
        return final, total

    @staticmethod
    def _follow(
        watch: _ResponseWatch, responses: Iterator[tuple[Dataset, Dataset | None]]
    ) -> tuple[Dataset | None, _SubOps]:
        """Consume C-MOVE/C-GET responses: the final status (None = none came) and sub-op counts."""
        last = _SubOps()
        for status, _identifier in responses:
            if not status:
                return None, last
            if code_to_category(int(status.Status)) == "Pending":
                last = _SubOps.of(status, last)
                continue
            watch.took_final()
            return status, _SubOps.of(status, last)
        return None, last

    @staticmethod
    def _collect(state: _Retrieval, receipt: StudyReceipt) -> None:
        for path in receipt.files:
            state.files[path.name] = path
        for series_uid, names in receipt.per_series().items():
            state.per_series.setdefault(series_uid, set()).update(names)

    @staticmethod
    def _missing(state: _Retrieval, receipt: StudyReceipt) -> int:
        """Announced instances not on disk yet, counting this attempt's arrivals."""
        have = len(set(state.files) | {p.name for p in receipt.files})
        return max(0, (state.expected or 0) - have)

    def _judge(
        self,
        state: _Retrieval,
        receipt: StudyReceipt,
        status: Dataset | None,
        subops: _SubOps,
        receiver: StorageSCP | None,
    ) -> None:
        """Raise unless every announced instance of the study is on disk."""
        op = "C-MOVE" if self.config.retrieve is RetrieveMethod.C_MOVE else "C-GET"
        total, now = len(state.files), receipt.received
        expected = state.expected
        counts = f"completed={subops.completed} failed={subops.failed} warning={subops.warning}"
        progress = f"{total} of {expected if expected is not None else '?'} instance(s) arrived"
        if receipt.refused_oversize:
            raise self._error(PacsError, (
                f"{receipt.refused_oversize} instance(s) were refused for being larger than "
                f"receiver.max_instance_mb; raise the limit if such instances are legitimate"
            ))
        if receipt.errors:
            raise self._error(IncompleteRetrieveError, (
                f"our receiver could not write {len(receipt.errors)} instance(s) ({receipt.errors[0]}); "
                f"{progress}"
            ))
        if status is None:
            raise self._error(RetriablePacsError, (
                f"{op} got no final response (no answer within {self.config.timeouts.dimse:g} s, or the "
                f"association was aborted); {progress}"
            ))
        code = int(status.Status)
        category = code_to_category(code)
        if category in ("Failure", "Cancel", "Unknown"):
            raise self._retrieve_failure(op, code, category, now, progress, counts, receiver)
        announced = expected if expected is not None else subops.completed + subops.warning + subops.failed
        if now < subops.completed + subops.warning:
            raise self._error(IncompleteRetrieveError, (
                f"{op} status 0x{code:04X}: the PACS reports {subops.completed + subops.warning} "
                f"instance(s) sent but only {now} arrived; {progress}"
            ))
        if total < announced or (expected is None and subops.failed):
            raise self._error(IncompleteRetrieveError, f"{op} status 0x{code:04X} ({counts}): {progress}")
        if total == 0:
            raise self._error(PacsError, (
                f"{op} status 0x{code:04X} but no instance arrived: the PACS does not (or no longer) "
                f"hold study {phi_hash(state.study_uid)}" + (" or the chosen series" if state.chosen else "")
            ))
        if category == "Warning":
            log.warning("PACS '%s': %s of study %s ended with warning 0x%04X (%s); all instances arrived",
                        self.name, op, phi_hash(state.study_uid), code, counts)

    def _retrieve_failure(
        self, op: str, code: int, category: str, arrived_now: int, progress: str, counts: str,
        receiver: StorageSCP | None,
    ) -> PacsError:
        dest = (
            f"AE '{receiver.ae_title}', host {receiver.config.host}, port {receiver.port}"
            if receiver is not None else ""
        )
        if code == 0xA801:
            return self._error(PacsError, (
                f"{op} refused with 0xA801 (move destination unknown): register our receiver at the "
                f"PACS as {dest}"
            ))
        if 0xA700 <= code <= 0xA7FF:
            hint = f" (for C-MOVE this also means it could not connect to our receiver, {dest})" if dest else ""
            return self._error(RetriablePacsError, (
                f"{op} failed with 0x{code:04X}: the PACS is out of resources for the sub-operations"
                f"{hint}; {counts}; {progress}"
            ))
        if arrived_now:
            return self._error(IncompleteRetrieveError, (
                f"{op} failed with 0x{code:04X} ({category}) part-way; {counts}; {progress}"
            ))
        if code >= 0xC000 and op == "C-MOVE":
            return self._error(PacsError, (
                f"C-MOVE failed with 0x{code:04X} and nothing arrived. Orthanc-like PACS answer this "
                f"both when the destination is not among their known modalities (register our receiver "
                f"as {dest}) and when a sub-operation failed (e.g. the PACS cannot connect to that "
                "host and port, or the study is gone): check the PACS's modality list and log"
            ))
        if code >= 0xC000:
            return self._error(PacsError, (
                f"C-GET failed with 0x{code:04X} and nothing arrived: the study may be gone, or it "
                "holds SOP classes we did not offer; check the PACS's log, or use c-move for this PACS"
            ))
        return self._error(PacsError, f"{op} failed with status 0x{code:04X} ({category}); {progress}")
