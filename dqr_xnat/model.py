"""Typed values that cross stage boundaries.

Every stage takes and returns these frozen dataclasses; none of them holds a network handle,
a file handle or a pydicom object, so the pure stages stay pure and the job store can persist them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

#: DICOM keywords a CSV row may search on, in a stable order.
QUERY_KEYWORDS: tuple[str, ...] = (
    "AccessionNumber",
    "StudyDate",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "ModalitiesInStudy",
    "StudyInstanceUID",
)

#: DICOM keywords a CSV row may rewrite, in a stable order.
RELABEL_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "PatientBirthDate",
)

#: Relabel keys that set the session label (a row with one of these must not label two studies alike).
SESSION_RELABEL_KEYWORDS: frozenset[str] = frozenset({"StudyID", "AccessionNumber"})


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------------------------
# CSV


@dataclass(frozen=True)
class CsvProblem:
    """One error in a CSV file. ``line`` is the physical line (header = 1); None = whole file."""

    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        if self.column is not None:
            where += f', column "{self.column}"'
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class CsvRow:
    """One valid query row.

    ``query`` maps DICOM keywords (QUERY_KEYWORDS) to DICOM matching strings as the CSV gave them
    (trimmed): ``20210101-``, ``DOE^J*``, ``A1\\A2``. ``relabel`` maps RELABEL_KEYWORDS to the new
    value; the empty string empties the element. ``subject``/``session`` are the Subject/Session
    cells if given (already valid XNAT labels).
    """

    line: int
    query: Mapping[str, str]
    relabel: Mapping[str, str] = field(default_factory=dict)
    subject: str | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "query", _frozen(self.query))
        object.__setattr__(self, "relabel", _frozen(self.relabel))

    @property
    def relabels_session(self) -> bool:
        """True when the row fixes the session label, so several matches would collide."""
        return bool(SESSION_RELABEL_KEYWORDS & set(self.relabel))

    def to_json(self) -> dict[str, object]:
        return {"line": self.line, "query": dict(self.query), "relabel": dict(self.relabel)}


@dataclass(frozen=True)
class ParsedCsv:
    """The result of reading one CSV: valid rows plus every problem found, in one pass."""

    file: str
    encoding: str
    rows: tuple[CsvRow, ...]
    errors: tuple[CsvProblem, ...]
    header: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "valid": self.valid,
            "encoding": self.encoding,
            "errors": [
                {"line": e.line, "column": e.column, "message": e.message} for e in self.errors
            ],
            "rows": [r.to_json() for r in self.rows],
        }


# --------------------------------------------------------------------------------------------
# PACS


class RetrieveMethod(str, enum.Enum):
    C_MOVE = "c-move"
    C_GET = "c-get"


@dataclass(frozen=True)
class StudyInfo:
    """One study as a PACS described it at study level (merged over duplicate answers).

    Counts and modalities are None/empty when the PACS did not return them.
    """

    study_instance_uid: str
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    modalities: tuple[str, ...] = ()
    number_of_series: int | None = None
    number_of_instances: int | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, from a SERIES-level C-FIND."""

    series_instance_uid: str
    series_number: str = ""
    series_description: str = ""
    modality: str = ""
    number_of_instances: int | None = None


@dataclass(frozen=True)
class SeriesFilter:
    """Include/exclude glob patterns (fnmatch, case-insensitive) on SeriesDescription and Modality.

    A series is kept when it matches any include pattern (or there are none) and no exclude
    pattern. Patterns apply to the description; ``modality_*`` apply to Modality.

    ``also_include``/``also_modality_include`` are a second include list ANDed with the first: a
    narrowing (project owners' settings, project_settings.py) can only keep fewer series than the
    admins' includes, and two OR-lists of globs cannot be merged into one. Empty = no second test.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    modality_include: tuple[str, ...] = ()
    modality_exclude: tuple[str, ...] = ()
    also_include: tuple[str, ...] = ()
    also_modality_include: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetrieveResult:
    """What a retrieval put on disk: one Part-10 file per instance under ``directory``."""

    study_instance_uid: str
    directory: Path
    files: tuple[Path, ...]
    expected: int | None
    completed: int
    failed: int
    warning: int
    status: int | None

    @property
    def received(self) -> int:
        return len(self.files)


# --------------------------------------------------------------------------------------------
# Matching and outcomes


class RowStatus(str, enum.Enum):
    """Outcome of one CSV row (csv-language.md, 'How many studies a row may match')."""

    MATCHED = "matched"
    NO_MATCH = "no-match"
    AMBIGUOUS = "ambiguous"
    DUPLICATE = "duplicate"
    ERROR = "error"


class StudyState(str, enum.Enum):
    """Where one study stands in the pipeline; persisted in the job store."""

    PENDING = "pending"  # matched, waiting to be retrieved
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"  # all instances on disk
    RELABELED = "relabeled"  # relabeled copy on disk, ready to upload
    UPLOADING = "uploading"  # upload sent; must check XNAT before sending again
    DONE = "done"  # in the prearchive of the right project
    SKIPPED = "skipped"  # already landed by an earlier job, or duplicate
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED, StudyState.CANCELED)


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # e.g. outside the PACS availability window
    DONE = "done"  # every row final, none failed
    FAILED = "failed"  # every row final, some failed (or the file was invalid)
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELED)


class JobMode(str, enum.Enum):
    PREVIEW = "preview"  # queries only
    IMPORT = "import"


@dataclass(frozen=True)
class RowMatch:
    """The decision for one row after querying: which studies to import and why."""

    line: int
    status: RowStatus
    message: str
    studies: tuple[StudyInfo, ...] = ()
    dropped: int = 0  # candidates the PACS returned that failed our own check
    duplicate_of: int | None = None  # the earlier line that already claims the study
    # session-label suffix per StudyInstanceUID when the project allows _1, _2 ...
    session_suffix: Mapping[str, str] = field(default_factory=dict)
    # criteria the PACS could not check and that must be verified on the retrieved DICOM
    unverified: tuple[str, ...] = ()


@dataclass(frozen=True)
class XnatLabels:
    """Project, subject and session labels for one study in XNAT."""

    project: str
    subject: str
    session: str
    fallback: str | None = None  # which fallback gave the session label, if any


@dataclass(frozen=True)
class UploadResult:
    """Where a study landed in XNAT."""

    prearchive_url: str  # e.g. /data/prearchive/projects/P/20240101_120000123/SESS
    project: str
    status: str  # READY, CONFLICT, ERROR, RECEIVING ...
    instances: int
