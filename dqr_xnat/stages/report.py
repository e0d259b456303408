"""The per-row report a job writes back into the project: CSV for people, JSON for programs (pure).

Decisions:

* One line per (row, study): a row that matched three studies has three lines; a row without
  studies (no-match, error) has one.
* Patient name and ID columns exist only when the project's admins allow them
  (``show_identity``); otherwise they are left out entirely, in both renderings. The study is
  identified by a hash of its UID (:func:`dqr_xnat.logs.phi_hash`), which is stable but reveals
  nothing.
* Spreadsheet formula injection (OWASP "CSV Injection"): in the CSV, a cell starting with
  ``= + - @``, TAB, CR or LF gets a leading ``'`` so a spreadsheet shows it as text instead of
  running it. Plain numbers (``-5``, ``+49``, ``-19991231``) are left alone: a spreadsheet reads
  them as numbers, never as formulas, and quoting them would corrupt legitimate data. The JSON
  twin is for programs and carries the values unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

from dqr_xnat.logs import phi_hash
from dqr_xnat.model import RowMatch

IDENTITY_COLUMNS = ("patient_name", "patient_id")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class ReportLine:
    """One line of the report: a CSV row and (if any) one of its studies."""

    line: int
    status: str
    reason: str = ""
    study_date: str = ""
    modalities: str = ""
    accession: str = ""
    series_expected: int | None = None
    instances_expected: int | None = None
    instances_received: int | None = None
    instances_uploaded: int | None = None
    project: str = ""
    subject: str = ""
    session: str = ""
    prearchive_url: str = ""
    study_uid_hash: str = ""
    patient_name: str = ""
    patient_id: str = ""


def columns(*, show_identity: bool) -> tuple[str, ...]:
    """The report's columns in order; the identity columns only when allowed."""
    names = tuple(f.name for f in fields(ReportLine))
    return names if show_identity else tuple(n for n in names if n not in IDENTITY_COLUMNS)


def safe_cell(value: object) -> str:
    """The CSV text of a value, defused against formula injection (see module docstring)."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def _record(line: ReportLine, names: tuple[str, ...]) -> dict[str, Any]:
    data = asdict(line)
    return {name: data[name] for name in names}


def render_csv(lines: Iterable[ReportLine], *, show_identity: bool) -> str:
    """The report as RFC 4180 CSV text (CRLF line ends, header row first)."""
    names = columns(show_identity=show_identity)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(names)
    for line in lines:
        record = _record(line, names)
        writer.writerow([safe_cell(record[name]) for name in names])
    return buffer.getvalue()


def render_json(job_info: Mapping[str, Any], lines: Iterable[ReportLine], *, show_identity: bool) -> str:
    """The report as one JSON object: ``{"job": {...job_info}, "lines": [...]}``.

    Counts that are unknown are ``null``; values are not quote-prefixed (not for spreadsheets).
    """
    names = columns(show_identity=show_identity)
    document = {"job": dict(job_info), "lines": [_record(line, names) for line in lines]}
    return json.dumps(document, ensure_ascii=False, indent=2, default=str) + "\n"


def lines_for_match(match: RowMatch, *, project: str = "") -> list[ReportLine]:
    """The first report lines of a decided row, before anything is retrieved.

    The pipeline later replaces status, counts and XNAT fields with :func:`dataclasses.replace`.
    """
    if not match.studies:
        return [ReportLine(line=match.line, status=match.status.value, reason=match.message,
                           project=project)]
    return [
        ReportLine(
            line=match.line,
            status=match.status.value,
            reason=match.message,
            study_date=study.study_date,
            modalities="\\".join(study.modalities),
            accession=study.accession_number,
            series_expected=study.number_of_series,
            instances_expected=study.number_of_instances,
            project=project,
            study_uid_hash=phi_hash(study.study_instance_uid),
            patient_name=study.patient_name,
            patient_id=study.patient_id,
        )
        for study in match.studies
    ]
