"""Read a user's import CSV into typed query rows, finding every error in one pass.

This module implements docs/csv-language.md. It is pure: bytes in, :class:`ParsedCsv` out, no disk,
no network, and it never raises on any input (a user's file must always get an answer listing
what to fix, not a traceback).

Decisions the contract leaves open, made here on purpose:

- **Line numbers** are physical lines (``\\r\\n``, ``\\r`` or ``\\n`` each end one; header = its own
  line). Every error of a row names the line on which that row *starts*, even when a quoted cell
  spans several lines; ``CsvRow.line`` is the same number.
- **Columns** in errors are the header as the user wrote it (trimmed). ``column`` is None for
  errors about the file or the header, and for row errors that belong to no column (no search
  criteria, values in cells without a header).
- **Encoding**: UTF-8 (an optional BOM is dropped), else Windows-1252. A file starting with a
  UTF-16 BOM, a UTF-8 BOM followed by invalid UTF-8, or bytes Windows-1252 leaves undefined is
  rejected with one error naming the line of the first bad byte; ``encoding`` is then "unknown".
- **Header**: matching ignores case and surrounding whitespace only. Unknown headers get the
  closest known header as a suggestion; common synonyms and DICOM keywords (``PatientID``,
  ``Birth Date``) get their proper header. Header errors do not stop row checks, so one pass
  shows everything; rows are still reported but the file is invalid. An empty header cell is
  allowed only when no row has a value under it.
- **A header without any row** is an error ("nothing to import" is almost always a mistake).
- **Lists** (``A\\B``): each item is trimmed and empty items are errors; the query value is the
  trimmed items joined by ``\\``.
- **Wildcards** are allowed where the contract lists them (Accession Number, Patient ID, Patient
  Name, Last/First Name). Modality takes codes only (uppercase, as DICOM CS requires: ``mr`` is an
  error that shows ``MR``; ``MRI`` and ``PET`` get ``MR`` and ``PT``). Study Instance UID takes
  full UIDs only.
- **Last Name / First Name** take one name part each: no ``\\``, ``^`` or ``=`` (use Patient Name
  for lists and full names).
- **DICOM limits** are checked on every value: SH 16 (Accession Number, Study ID), LO 64
  (Patient ID), PN 64 per component group with at most 5 components and 3 groups, CS 16
  (Modality), UI 64. Control and invisible characters (including line breaks) are errors.
  Non-ASCII letters are allowed; the query stage declares the character set.
- **Session is written to StudyID and AccessionNumber (VR SH, 16 characters)**, while an XNAT
  label may have 64. A Session longer than 16 characters is a row error, *unless* the same row
  overrides both with Relabel Study ID and Relabel Accession Number, so the long value is written
  to no DICOM element. We never truncate silently: a truncated label could collide with another.
- **``""``** empties an attribute in relabel columns only. In a search column it is an error
  (leave the cell blank for no criterion); Subject and Session cannot be emptied (use the Relabel
  columns).
- **Relabel values** are single values: a backslash is an error there. ``*`` and ``?`` in a
  relabel value are ordinary characters.
- **Messages quote the user's cell values** (that is how a user finds the mistake): they belong
  in the user's report, never in a log.
- **Numbers Excel reformatted** (``2.5E+07``) in Accession Number, Patient ID or Study Instance
  UID are errors, since the original digits are lost.
- **max_rows**: when the file has more data rows, one file-level error; only the first max_rows
  rows are checked (the rest are counted, so the message can say how many there are).
"""

from __future__ import annotations

import calendar
import csv
import difflib
import io
import logging
import re
import traceback
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Callable, Iterator, Sequence

from pydicom.uid import RE_VALID_UID
from pydicom.valuerep import MAX_VALUE_LEN

from dqr_xnat.model import QUERY_KEYWORDS, RELABEL_KEYWORDS, CsvProblem, CsvRow, ParsedCsv

log = logging.getLogger(__name__)

#: The value that empties an attribute in a relabel column (written ``""""""`` in the raw file).
EMPTY_MARKER = '""'
LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PN_GROUP_MAX = 64
SESSION_MAX = MAX_VALUE_LEN["SH"]


class CellError(ValueError):
    """One cell's problem; the message is what the user reads after 'line N, column "X": '."""


# ------------------------------------------------------------------------------------------
# Values shown in messages


def show(value: str) -> str:
    """Quote a user value for a message, making invisible characters visible and long ones short."""
    if len(value) > 60:
        value = value[:57] + "..."
    out = []
    for ch in value:
        if ch.isprintable():
            out.append(ch)
        elif ch in "\r\n\t":
            out.append({"\r": "\\r", "\n": "\\n", "\t": "\\t"}[ch])
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "'" + "".join(out) + "'"


_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def check_characters(value: str) -> None:
    """Reject control and invisible characters: no PACS would match them, nor XNAT show them."""
    if value.isprintable():
        return
    for pos, ch in enumerate(value, 1):
        if unicodedata.category(ch) not in _BAD_CATEGORIES:
            continue
        if ch in "\r\n":
            raise CellError(
                f"{show(value)} contains a line break (an unclosed quote?); "
                "put the value on one line"
            )
        raise CellError(
            f"{show(value)} contains an invisible or control character "
            f"(U+{ord(ch):04X} at position {pos}); retype the value"
        )


# ------------------------------------------------------------------------------------------
# Dates


def _calendar_date(text: str) -> date | None:
    """The date of an 8-digit YYYYMMDD string, or None when it is not a real calendar date."""
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


_TIME_SUFFIX = re.compile(r"[ T][0-9]{1,2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?( ?[AaPp][Mm])?$")
_DATE_FORMATS = (
    "%Y-%m-%d", "%Y/%m/%d", "%Y.%m.%d", "%d.%m.%Y", "%d-%m-%Y",
    "%d %b %Y", "%d-%b-%Y", "%d %B %Y", "%b %d, %Y", "%B %d, %Y", "%b %d %Y", "%B %d %Y",
)  # fmt: skip
_SLASH_DATE = re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4})")
_EXCEL_SERIAL = re.compile(r"[0-9]{5}(\.0+)?")
_EIGHT_DIGITS_FLOAT = re.compile(r"([0-9]{8})\.0+")
_SCIENTIFIC = re.compile(r"[0-9](\.[0-9]+)?[eE]\+?[0-9]+")
_EXCEL_SCIENTIFIC = re.compile(r"[0-9](\.[0-9]+)?E\+[0-9]+")  # how Excel shows a long number


def _ymd(d: date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _slash_candidates(text: str) -> list[str]:
    """``1/31/2021`` is month-first (US Excel), ``31/1/2021`` day-first: keep whichever is real."""
    m = _SLASH_DATE.fullmatch(text)
    if not m:
        return []
    a, b, year = int(m[1]), int(m[2]), int(m[3])
    found: list[str] = []
    for month, day in ((a, b), (b, a)):
        try:
            value = _ymd(date(year, month, day))
        except ValueError:
            continue
        if value not in found:
            found.append(value)
    return found


def infer_dates(text: str) -> list[str]:
    """The YYYYMMDD forms a differently written date may mean (empty when we cannot tell)."""
    text = _TIME_SUFFIX.sub("", text.strip())
    if m := _EIGHT_DIGITS_FLOAT.fullmatch(text):
        return [m[1]] if _calendar_date(m[1]) else []
    if _EXCEL_SERIAL.fullmatch(text):
        return [_ymd(date(1899, 12, 30) + timedelta(days=int(float(text))))]
    if _SCIENTIFIC.fullmatch(text):
        number = float(text)
        digits = f"{int(number)}" if number.is_integer() else ""
        return [digits] if len(digits) == 8 and _calendar_date(digits) else []
    if found := _slash_candidates(text):
        return found
    for fmt in _DATE_FORMATS:
        try:
            return [_ymd(datetime.strptime(text, fmt).date())]
        except ValueError:
            continue
    return []


_RANGE_SEPARATORS = tuple(
    re.compile(p) for p in (r"\s+-\s+", r"\s*[\u2013\u2014]\s*", r"\s+to\s+", r"\s*-\s*")
)


def _infer_range(text: str) -> str | None:
    """``2021-01-01 - 2021-01-31``, ``20210101 to 20210131`` ... as a DICOM range, if clear."""
    for separator in _RANGE_SEPARATORS:
        parts = separator.split(text)
        if len(parts) == 2 and any(p.strip() for p in parts):
            if (found := _range_of(parts)) is not None:
                return found
    return None


def _range_of(parts: list[str]) -> str | None:
    out = []
    for part in parts:
        if not part.strip():
            out.append("")
            continue
        found = [part.strip()] if _is_date8(part.strip()) else infer_dates(part)
        if len(found) != 1:
            return None
        out.append(found[0])
    if out[0] and out[1] and out[0] > out[1]:
        out.reverse()
    return f"{out[0]}-{out[1]}"


def _is_date8(text: str) -> bool:
    return len(text) == 8 and text.isascii() and text.isdigit() and _calendar_date(text) is not None


def _not_a_date(text: str, *, allow_range: bool) -> CellError:
    """Explain a date we cannot read, showing the YYYYMMDD form when it can be inferred."""
    found = infer_dates(text)
    if len(found) == 1 and _EXCEL_SERIAL.fullmatch(text):
        return CellError(
            f"{show(text)} is not a date in YYYYMMDD form; if Excel turned the date into this "
            f"number, write {found[0]}"
        )
    if len(found) == 1:
        return CellError(f"{show(text)} is not a date in YYYYMMDD form; write {found[0]}")
    if len(found) == 2:
        return CellError(
            f"{show(text)} is not a date in YYYYMMDD form; write {found[0]} if it is "
            f"month/day/year or {found[1]} if it is day/month/year"
        )
    if allow_range and (as_range := _infer_range(text)):
        return CellError(f"{show(text)} is not a date range in DICOM form; write {as_range}")
    if _SCIENTIFIC.fullmatch(text.strip()):
        return CellError(
            f"{show(text)} is a number Excel reformatted and the date's digits are lost; "
            "format the column as text and type the date as YYYYMMDD"
        )
    if allow_range:
        return CellError(
            f"{show(text)} is not a date in YYYYMMDD form (e.g. 20210131) nor a range "
            "(20210101-20210131, 20210101- or -20210131)"
        )
    return CellError(f"{show(text)} is not a date in YYYYMMDD form (e.g. 20210131)")


def _check_date8(text: str) -> None:
    if _calendar_date(text) is None:
        raise CellError(f"{show(text)} is not a real calendar date (YYYYMMDD)")


_DATE8_RE = re.compile(r"[0-9]{8}")
_RANGE_RE = re.compile(r"([0-9]{8})?-([0-9]{8})?")
_YEAR_WILDCARD = re.compile(r"([0-9]{4})([0-9]{2})?\*")


def _wildcard_date(text: str) -> CellError:
    m = _YEAR_WILDCARD.fullmatch(text)
    hint = "use a range such as 20210101-20210131"
    if m and 1 <= int(m[1]) and (m[2] is None or 1 <= int(m[2]) <= 12):
        year, month = int(m[1]), int(m[2] or 0)
        first = f"{year:04d}{month or 1:02d}01"
        last_month = month or 12
        last = f"{year:04d}{last_month:02d}{calendar.monthrange(year, last_month)[1]:02d}"
        hint = f"write {first}-{last}"
    return CellError(f"wildcards (* ?) are not allowed in a date ({show(text)}); {hint}")


def check_date_or_range(text: str) -> str:
    """A Study Date or DOB search value: one date or an A-B / A- / -B range."""
    check_characters(text)
    if "*" in text or "?" in text:
        raise _wildcard_date(text)
    if "\\" in text:
        raise CellError(
            f"a list of dates ({show(text)}) is not allowed; "
            "use one date or a range (20210101-20210131), or one row per date"
        )
    if _DATE8_RE.fullmatch(text):
        _check_date8(text)
        return text
    m = _RANGE_RE.fullmatch(text)
    if m is None:
        raise _not_a_date(text, allow_range=True)
    start, end = m[1], m[2]
    if not start and not end:
        raise CellError("'-' alone is not a range; put a date on at least one side (20210101-)")
    for part in (start, end):
        if part:
            _check_date8(part)
    if start and end and start > end:
        raise CellError(f"the range {show(text)} ends before it starts; write {end}-{start}")
    return text


def check_single_date(text: str) -> str:
    """A relabel date: exactly one YYYYMMDD date."""
    check_characters(text)
    if _DATE8_RE.fullmatch(text):
        _check_date8(text)
        return text
    if "*" in text or "?" in text or "\\" in text:
        raise CellError(f"{show(text)} is not one date; a relabel date is one YYYYMMDD date")
    if _RANGE_RE.fullmatch(text):
        raise CellError(f"{show(text)} is a range; a relabel date is one YYYYMMDD date")
    raise _not_a_date(text, allow_range=False)


# ------------------------------------------------------------------------------------------
# Strings, names, codes, UIDs


def split_list(text: str) -> list[str]:
    """Split a backslash list, trimming items; an empty item is an error, not a silent wildcard."""
    if "\\" not in text:
        return [text]
    items = [item.strip() for item in text.split("\\")]
    if "" in items:
        raise CellError(
            f"{show(text)} has an empty value in its \\ list; remove the extra backslash"
        )
    return items


def _check_length(item: str, limit: int, what: str) -> None:
    if len(item) > limit:
        raise CellError(
            f"{show(item)} has {len(item)} characters; DICOM allows at most {limit} in {what}"
        )


def _check_not_excel_number(item: str) -> None:
    if _EXCEL_SCIENTIFIC.fullmatch(item):
        raise CellError(
            f"{show(item)} looks like a number Excel reformatted, which loses digits; "
            "format the column as text and type the value again"
        )


def string_checker(vr: str, what: str) -> Callable[[str], str]:
    """A search check for a wildcard-capable SH/LO string list (Accession Number, Patient ID)."""
    limit = MAX_VALUE_LEN[vr]

    def check(text: str) -> str:
        check_characters(text)
        items = split_list(text)
        for item in items:
            _check_not_excel_number(item)
            _check_length(item, limit, f"{what} (VR {vr})")
        return "\\".join(items)

    return check


def check_person_name(item: str) -> None:
    """PN limits: at most 3 '='-groups of at most 5 '^'-components, 64 characters per group."""
    groups = item.split("=")
    if len(groups) > 3:
        raise CellError(f"{show(item)} has more than 3 '='-separated name groups")
    for group in groups:
        if group.count("^") > 4:
            raise CellError(f"{show(item)} has more than 5 '^'-separated name parts")
        _check_length(group, PN_GROUP_MAX, "a person name (VR PN)")


def check_patient_name(text: str) -> str:
    check_characters(text)
    items = split_list(text)
    for item in items:
        check_person_name(item)
    return "\\".join(items)


def check_name_part(text: str) -> str:
    """Last Name / First Name: one name part, wildcards allowed."""
    check_characters(text)
    for ch, why in (("\\", "a list"), ("^", "a full name"), ("=", "a full name")):
        if ch in text:
            raise CellError(f"{show(text)} contains '{ch}'; for {why} use the Patient Name column")
    _check_length(text, PN_GROUP_MAX - 2, "a name part (VR PN)")
    return text


_MODALITY_RE = re.compile(r"[A-Z0-9_]{1,16}")
_MODALITY_MISTAKES = {"MRI": "MR", "PET": "PT", "XRAY": "CR", "X-RAY": "CR", "CAT": "CT"}


def exact_list(text: str, column: str, hint: str) -> list[str]:
    """The items of a list whose values must be exact: wildcards are errors, not patterns."""
    check_characters(text)
    if "*" in text or "?" in text:
        raise CellError(f"wildcards are not allowed in {column} ({show(text)}); {hint}")
    return split_list(text)


def check_modality(text: str) -> str:
    """Modality codes (DICOM CS): uppercase letters, digits, underscore; no wildcards."""
    items = exact_list(text, "Modality", "list codes such as MR\\CT")
    fixed = [_MODALITY_MISTAKES.get(item.upper(), item.upper()) for item in items]
    for item in fixed:
        if not _MODALITY_RE.fullmatch(item):
            raise CellError(
                f"{show(item)} is not a modality code (uppercase letters, digits and _, "
                "at most 16), e.g. MR or CT"
            )
    if fixed != items:
        suggestion = "\\".join(fixed)
        what = "a DICOM modality code" if len(items) == 1 else "a list of DICOM modality codes"
        raise CellError(f"{show(text)} is not {what}; write {suggestion}")
    return "\\".join(items)


def _uid_problem(item: str) -> str | None:
    if len(item) > MAX_VALUE_LEN["UI"]:
        return f"has {len(item)} characters; a UID has at most {MAX_VALUE_LEN['UI']}"
    if RE_VALID_UID.fullmatch(item):
        return None
    if not item or item.strip("0123456789.") or not item.isascii():
        return "is not a UID; a UID has only digits and dots, e.g. 1.2.840.113619.2.55.3"
    for component in item.split("."):
        if not component:
            return "has an empty component (two dots in a row, or a dot at an end)"
        if len(component) > 1 and component.startswith("0"):
            return f"has a component with a leading zero ({component}), which DICOM forbids"
    return "is not a valid UID"  # pragma: no cover - the cases above are exhaustive


def check_uid(text: str) -> str:
    """Study Instance UIDs: full UIDs only, a backslash list allowed."""
    items = exact_list(text, "Study Instance UID", "give the full UID")
    for item in items:
        _check_not_excel_number(item)
        if problem := _uid_problem(item):
            raise CellError(f"{show(item)} {problem}")
    return "\\".join(items)


# ------------------------------------------------------------------------------------------
# Relabel values


def check_label(text: str) -> str:
    """Subject / Session: a legal XNAT label, else show the label XNAT would make of it."""
    if text == EMPTY_MARKER:
        raise CellError(
            "a label cannot be emptied; to empty the DICOM elements use the Relabel columns "
            '(e.g. Relabel Patient Name = "")'
        )
    if LABEL_RE.fullmatch(text):
        return text
    legal = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64]
    raise CellError(
        f"{show(text)} is not a legal XNAT label (letters A-Z a-z, digits, '_' and '-', at most "
        f"64 characters); write {legal}"
    )


def relabel_string_checker(vr: str, what: str) -> Callable[[str], str]:
    """A single-valued SH/LO relabel value."""
    limit = MAX_VALUE_LEN[vr]

    def check(text: str) -> str:
        check_characters(text)
        _check_single(text)
        _check_length(text, limit, f"{what} (VR {vr})")
        return text

    return check


def _check_single(text: str) -> None:
    if "\\" in text:
        raise CellError(f"{show(text)} contains '\\'; a relabel value is one value, not a list")


def check_relabel_name(text: str) -> str:
    check_characters(text)
    _check_single(text)
    check_person_name(text)
    return text


# ------------------------------------------------------------------------------------------
# Columns


@dataclass(frozen=True)
class Column:
    """One known header: what it queries or writes, and how its cells are checked."""

    name: str
    search: bool
    check: Callable[[str], str]
    keyword: str | None  # the DICOM keyword for simple columns; None when handled specially


COLUMNS: tuple[Column, ...] = (
    Column("Accession Number", True, string_checker("SH", "Accession Number"), "AccessionNumber"),
    Column("Study Date", True, check_date_or_range, "StudyDate"),
    Column("Patient ID", True, string_checker("LO", "Patient ID"), "PatientID"),
    Column("Patient Name", True, check_patient_name, "PatientName"),
    Column("Last Name", True, check_name_part, None),
    Column("First Name", True, check_name_part, None),
    Column("DOB", True, check_date_or_range, "PatientBirthDate"),
    Column("Modality", True, check_modality, "ModalitiesInStudy"),
    Column("Study Instance UID", True, check_uid, "StudyInstanceUID"),
    Column("Subject", False, check_label, None),
    Column("Session", False, check_label, None),
    Column("Relabel Patient ID", False, relabel_string_checker("LO", "Patient ID"), "PatientID"),
    Column(
        "Relabel Accession Number",
        False,
        relabel_string_checker("SH", "Accession Number"),
        "AccessionNumber",
    ),
    Column("Relabel Study ID", False, relabel_string_checker("SH", "Study ID"), "StudyID"),
    Column("Relabel Patient Name", False, check_relabel_name, "PatientName"),
    Column("Relabel Study Date", False, check_single_date, "StudyDate"),
    Column("Relabel Patient Birth Date", False, check_single_date, "PatientBirthDate"),
)
BY_KEY: dict[str, Column] = {c.name.casefold(): c for c in COLUMNS}
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
SEARCH_HEADERS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.search)


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.casefold())


#: Synonyms and DICOM keywords users write; only used to suggest the right header.
_SYNONYMS: dict[str, str] = {
    _squash(k): v
    for k, v in {
        "Accession": "Accession Number", "Acc": "Accession Number", "Accession No": "Accession Number",
        "MRN": "Patient ID", "PID": "Patient ID", "Name": "Patient Name",
        "PatientBirthDate": "DOB", "Patient Birth Date": "DOB", "Birth Date": "DOB",
        "Date of Birth": "DOB", "Birthdate": "DOB", "ModalitiesInStudy": "Modality",
        "Modalities": "Modality", "StudyInstanceUID": "Study Instance UID", "Study UID": "Study Instance UID",
        "Surname": "Last Name", "Family Name": "Last Name", "Given Name": "First Name",
        "Date": "Study Date", "Subject Label": "Subject", "Session Label": "Session",
        "Experiment": "Session", "Study ID": "Relabel Study ID",
    }.items()
}  # fmt: skip
_SQUASHED: dict[str, str] = {_squash(c.name): c.name for c in COLUMNS}


def suggest_header(text: str) -> str | None:
    """The known header a user most likely meant."""
    squashed = _squash(text)
    if squashed in _SQUASHED:
        return _SQUASHED[squashed]
    if squashed in _SYNONYMS:
        return _SYNONYMS[squashed]
    close = difflib.get_close_matches(squashed, list(_SQUASHED), n=1, cutoff=0.6)
    return _SQUASHED[close[0]] if close else None


# ------------------------------------------------------------------------------------------
# Header


@dataclass
class Header:
    """The header row: which column each cell index feeds (None = no usable header there)."""

    line: int
    names: tuple[str, ...]  # as written, trimmed
    slots: list[Column | None]
    blank: set[int]  # indexes of empty header cells
    errors: list[CsvProblem]

    def present(self, search: bool) -> list[str]:
        return [
            self.names[i] for i, c in enumerate(self.slots) if c is not None and c.search == search
        ]


def read_header(record: Sequence[str], line: int) -> Header:
    """Match header cells to known columns, collecting every header problem."""
    names = tuple(cell.strip() for cell in record)
    header = Header(line, names, [], set(), [])
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        column = BY_KEY.get(name.casefold()) if name else None
        if not name:
            header.blank.add(index)
        elif column is None:
            header.errors.append(CsvProblem(line, None, _unknown_header(name)))
        elif column.name in seen:
            header.errors.append(
                CsvProblem(
                    line,
                    None,
                    f"column {show(column.name)} appears twice (cells {seen[column.name] + 1} and "
                    f"{index + 1}); keep one",
                )
            )
            column = None
        else:
            seen[column.name] = index
        header.slots.append(column)
    _check_header_set(header, seen)
    return header


def _unknown_header(name: str) -> str:
    for sep, label in ((";", "';'"), ("\t", "tabs")):
        if sep in name and any(p.strip().casefold() in BY_KEY for p in name.split(sep)):
            return (
                f"unknown column {show(name)}; the file seems to separate cells with {label}, but "
                "it must use commas (in Excel: save as 'CSV UTF-8 (Comma delimited)')"
            )
    if (suggestion := suggest_header(name)) is not None:
        return f"unknown column {show(name)}; did you mean {show(suggestion)}?"
    return f"unknown column {show(name)}; known columns are: {', '.join(c.name for c in COLUMNS)}"


def _check_header_set(header: Header, seen: dict[str, int]) -> None:
    line = header.line
    if not any(name in seen for name in SEARCH_HEADERS):
        header.errors.append(
            CsvProblem(
                line,
                None,
                "no search column; the header needs at least one of: " + ", ".join(SEARCH_HEADERS),
            )
        )
    if "Patient Name" in seen and ("Last Name" in seen or "First Name" in seen):
        header.errors.append(
            CsvProblem(
                line,
                None,
                "use either Patient Name or Last Name/First Name, not both; "
                "Patient Name takes LAST^FIRST",
            )
        )
        for old in ("Last Name", "First Name"):
            if old in seen:
                header.slots[seen[old]] = None


# ------------------------------------------------------------------------------------------
# Rows


def _patient_name(last: str | None, first: str | None) -> str:
    """DQR's older pair: one alone means Last^* or *^First."""
    return f"{last or '*'}^{first or '*'}"


class RowBuilder:
    """Turns one record into a CsvRow or a list of problems."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.slots = header.slots
        self.width = len(header.slots)
        self.search_names = header.present(search=True)
        #: the header as the user wrote it, by known column name
        self.written = {c.name: header.names[i] for i, c in enumerate(header.slots) if c}

    def build(self, record: Sequence[str], line: int) -> tuple[CsvRow | None, list[CsvProblem]]:
        errors: list[CsvProblem] = []
        checked: dict[str, str] = {}
        has_search = False
        for column, text in self._collect(record, line, errors):
            has_search = has_search or column.search
            try:
                checked[column.name] = self._check_cell(column, text)
            except CellError as exc:
                errors.append(CsvProblem(line, self.written[column.name], str(exc)))
        if not has_search:
            if not self.search_names:  # already a header error; a row without query is no row
                return None, errors
            errors.append(CsvProblem(line, None, self._no_criteria()))
        self._check_session_length(checked, line, errors)
        self._check_name_pair(checked, line, errors)
        if errors:
            return None, errors
        return _make_row(line, checked), []

    def _collect(
        self, record: Sequence[str], line: int, errors: list[CsvProblem]
    ) -> list[tuple[Column, str]]:
        """The non-blank trimmed cells under known columns; values without a header are errors."""
        cells: list[tuple[Column, str]] = []
        orphans: list[int] = []
        for index, cell in enumerate(record):
            text = cell.strip()
            if not text:
                continue
            column = self.slots[index] if index < self.width else None
            if column is not None:
                cells.append((column, text))
            elif index >= self.width or index in self.header.blank:
                orphans.append(index + 1)
        if orphans:
            errors.append(CsvProblem(line, None, self._orphans(orphans)))
        return cells

    def _orphans(self, cells: list[int]) -> str:
        which = ", ".join(str(c) for c in cells)
        noun = "cell" if len(cells) == 1 else "cells"
        return (
            f"{noun} {which} of this row {'has a value' if len(cells) == 1 else 'have values'} but "
            f"no column header (the header on line {self.header.line} has {self.width} cells); "
            "add a header or remove the value"
        )

    @staticmethod
    def _check_cell(column: Column, raw: str) -> str:
        if raw == EMPTY_MARKER and column.name not in ("Subject", "Session"):
            if column.search:
                raise CellError(
                    '"" empties an attribute only in relabel columns; '
                    "leave the cell blank for no search criterion"
                )
            return ""
        return column.check(raw)

    def _no_criteria(self) -> str:
        return (
            "no search criteria: this row has values but none in a search column ("
            + ", ".join(self.search_names)
            + "); fill at least one"
        )

    def _check_session_length(
        self, checked: dict[str, str], line: int, errors: list[CsvProblem]
    ) -> None:
        session = checked.get("Session")
        overridden = "Relabel Study ID" in checked and "Relabel Accession Number" in checked
        if session is None or len(session) <= SESSION_MAX or overridden:
            return
        errors.append(
            CsvProblem(
                line,
                self.written["Session"],
                f"{show(session)} has {len(session)} characters, but Session is written into "
                f"StudyID and AccessionNumber, which DICOM limits to {SESSION_MAX} (VR SH); use a "
                "shorter label, or give both Relabel Study ID and Relabel Accession Number",
            )
        )

    def _check_name_pair(
        self, checked: dict[str, str], line: int, errors: list[CsvProblem]
    ) -> None:
        """Last^First must fit one PN component group once combined."""
        if "Last Name" not in checked or "First Name" not in checked:
            return
        try:
            check_person_name(_patient_name(checked["Last Name"], checked["First Name"]))
        except CellError as exc:
            errors.append(CsvProblem(line, self.written["Last Name"], f"with First Name: {exc}"))


def _make_row(line: int, checked: dict[str, str]) -> CsvRow:
    query: dict[str, str] = {}
    relabel: dict[str, str] = {}
    subject, session = checked.get("Subject"), checked.get("Session")
    if subject is not None:
        relabel.update(PatientName=subject, PatientID=subject)
    if session is not None:
        relabel.update(StudyID=session, AccessionNumber=session)
    for name, value in checked.items():
        column = BY_NAME[name]
        if column.keyword is not None:
            (query if column.search else relabel)[column.keyword] = value
    if "Last Name" in checked or "First Name" in checked:
        query["PatientName"] = _patient_name(checked.get("Last Name"), checked.get("First Name"))
    return CsvRow(
        line=line,
        query={k: query[k] for k in QUERY_KEYWORDS if k in query},
        relabel={k: relabel[k] for k in RELABEL_KEYWORDS if k in relabel},
        subject=subject,
        session=session,
    )


# ------------------------------------------------------------------------------------------
# Decoding and records

UTF8_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _line_of(data: bytes, offset: int) -> int:
    return len(_LINE_END.findall(data, 0, offset)) + 1


def decode(data: bytes) -> tuple[str | None, str, CsvProblem | None]:
    """UTF-8 (BOM dropped), else Windows-1252; else one error naming the first bad byte's line."""
    save_as = "save it again as 'CSV UTF-8 (Comma delimited)'"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        problem = CsvProblem(None, None, f"the file is UTF-16 ('Unicode text'); {save_as}")
        return None, "unknown", problem
    try:
        return data.decode("utf-8-sig"), "utf-8", None
    except UnicodeDecodeError as exc:
        utf8_error = exc
    if data.startswith(UTF8_BOM):
        bad = utf8_error.start + len(UTF8_BOM)
        return None, "unknown", CsvProblem(
            _line_of(data, bad),
            None,
            f"the file starts with a UTF-8 byte-order mark but byte 0x{data[bad]:02X} is not "
            f"valid UTF-8; {save_as}",
        )
    try:
        return data.decode("cp1252"), "windows-1252", None
    except UnicodeDecodeError as exc:
        return None, "unknown", CsvProblem(
            _line_of(data, exc.start),
            None,
            f"the file is neither UTF-8 nor Windows-1252 (byte 0x{data[exc.start]:02X} fits "
            f"neither); {save_as}",
        )


def records(text: str, errors: list[CsvProblem]) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, cells) per record; a record the csv module rejects ends the file."""
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            errors.append(
                CsvProblem(line + 1, None, f"this line cannot be read as CSV ({exc}); fix it")
            )
            return
        yield line + 1, record
        line = reader.line_num


# ------------------------------------------------------------------------------------------
# Entry point


def parse_csv(data: bytes, file: str = "<csv>", *, max_rows: int | None = None) -> ParsedCsv:
    """Validate a whole import CSV in one pass; never raises.

    Parameters
    ----------
    data : the file's bytes, as attached by the user.
    file : the name used in the result (and by callers in their messages).
    max_rows : when given, more data rows than this is one file-level error.
    """
    try:
        return _parse(data, file, max_rows)
    except Exception as exc:  # the contract: any input gets an answer, never a traceback
        # the exception text may quote a cell (PHI): log only its type and where it happened
        where = "".join(traceback.format_tb(exc.__traceback__))
        log.error("CSV parser failed on %s with %s at:\n%s", file, type(exc).__name__, where)
        message = f"internal error while reading the file ({type(exc).__name__}); please report it"
        problem = CsvProblem(None, None, message)
        return ParsedCsv(file=file, encoding="unknown", rows=(), errors=(problem,))


def _parse(data: bytes, file: str, max_rows: int | None) -> ParsedCsv:
    text, encoding, problem = decode(data)
    if text is None:
        assert problem is not None
        return ParsedCsv(file=file, encoding=encoding, rows=(), errors=(problem,))
    errors: list[CsvProblem] = []
    rows: list[CsvRow] = []
    header: Header | None = None
    builder: RowBuilder | None = None
    count = 0
    for line, record in records(text, errors):
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = read_header(record, line)
            errors.extend(header.errors)
            builder = RowBuilder(header)
            continue
        count += 1
        if max_rows is not None and count > max_rows:
            continue
        assert builder is not None
        row, row_errors = builder.build(record, line)
        errors.extend(row_errors)
        if row is not None:
            rows.append(row)
    errors.extend(_file_problems(header, count, max_rows))
    errors.sort(key=lambda e: e.line or 0)
    names = header.names if header else ()
    return ParsedCsv(
        file=file, encoding=encoding, rows=tuple(rows), errors=tuple(errors), header=names
    )


def _file_problems(header: Header | None, count: int, max_rows: int | None) -> list[CsvProblem]:
    if header is None:
        return [
            CsvProblem(
                None,
                None,
                "the file is empty; its first line must be a header such as "
                "'Accession Number,Subject,Session', followed by one row per query",
            )
        ]
    if count == 0:
        return [CsvProblem(None, None, "the file has a header but no rows; add one row per query")]
    if max_rows is not None and count > max_rows:
        return [
            CsvProblem(
                None,
                None,
                f"the file has {count} rows but at most {max_rows} are allowed; split it into "
                f"files of at most {max_rows} rows",
            )
        ]
    return []
