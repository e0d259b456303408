"""Our own C-FIND matching, the 0/1/N row policy, and series filtering (pure).

Every candidate a PACS returns is checked here against the row's criteria, so a PACS that ignores
a key (dcmqrscp ignores ModalitiesInStudy), matches differently (Orthanc matches PN
case-insensitively) or lacks list matching can never flood XNAT with studies the row did not ask
for. A criterion whose value the PACS did not return is "unverified": it must be checked on the
retrieved DICOM (:func:`check_dataset_values`) before anything is uploaded.

Matching follows DICOM PS3.4 C.2.2.2 on every PACS:

* single value matching, exact and **case-sensitive**; leading/trailing spaces are insignificant.
  Decision: the standard lets a PACS match PN case-insensitively, and Orthanc does while dcmqrscp
  does not. The only behaviour we can deliver identically on every PACS is the strict one, so
  Orthanc's extra case-insensitive matches are filtered out (``DOE*`` does not match ``doe^lower``);
* ``*`` (any run, also empty) and ``?`` (exactly one character) anywhere in a string value; never in
  UIDs (UI values match exactly);
* a backslash list is an OR of its values;
* DA (and TM/DT) values: ``A``, ``A-B``, ``A-``, ``-B`` with inclusive bounds; ``2023-01-10`` and
  ``2023.01.10`` stored values (old ACR-NEMA style) are read as ``20230110``;
* a multi-valued attribute (ModalitiesInStudy, VM 1-n) matches when ANY of its values matches;
* PN: trailing empty components and groups are insignificant (``DOE^JOHN^^`` is ``DOE^JOHN``), and a
  pattern without ``=`` also matches a value whose alphabetic (or any single) component group matches,
  so ``DOE^JOHN`` finds ``DOE^JOHN=ドウ^ジョン``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

from dqr_xnat.model import CsvRow, RowMatch, RowStatus, SeriesFilter, SeriesInfo, StudyInfo

MATCH_POLICIES = ("ambiguous", "suffix")

#: StudyInfo attribute holding each query keyword's value as the PACS returned it.
_STUDY_FIELDS: Mapping[str, str] = {
    "AccessionNumber": "accession_number",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyID": "study_id",
    "StudyDescription": "study_description",
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "StudyInstanceUID": "study_instance_uid",
}

Value = str | Sequence[str]


# --------------------------------------------------------------------------------------------
# Single values


@functools.lru_cache(maxsize=256)
def _vr_vm(keyword: str) -> tuple[str, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"'{keyword}' is not a DICOM keyword")
    return dictionary_VR(tag), dictionary_VM(tag)


@functools.lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


def _string_matches(pattern: str, value: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return _wildcard_regex(pattern).fullmatch(value) is not None
    return pattern == value


def normalise_pn(text: str) -> str:
    """A PN value without padding, trailing empty components or trailing empty groups."""
    groups = ["^".join(c.strip() for c in g.split("^")).rstrip("^") for g in text.strip().split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _pn_matches(pattern: str, value: str) -> bool:
    pattern, value = normalise_pn(pattern), normalise_pn(value)
    if _string_matches(pattern, value):
        return True
    if "=" in pattern or "=" not in value:
        return False
    return any(group and _string_matches(pattern, group) for group in value.split("="))


def _normalise_date(value: str) -> str:
    value = value.strip()
    if re.fullmatch(r"\d{4}[-.]\d{2}[-.]\d{2}", value):
        return value[:4] + value[5:7] + value[8:]
    return value


def _range_matches(pattern: str, value: str) -> bool:
    value = _normalise_date(value)
    if "-" not in pattern:
        return _string_matches(pattern, value)
    if not value or not value[0].isdigit():
        return False
    low, high = (part.strip() for part in pattern.split("-", 1))
    # Compare on the bound's length so a partial TM bound ("1015") covers "101500".
    return (not low or value[: len(low)] >= low) and (not high or value[: len(high)] <= high)


def _single_matches(vr: str, pattern: str, value: str) -> bool:
    """One alternative of the pattern against one value of the attribute."""
    if vr == "PN":
        return _pn_matches(pattern, value)
    if vr in ("DA", "TM", "DT"):
        return _range_matches(pattern, value)
    if vr == "UI":
        return pattern.rstrip("\0") == value.strip().rstrip("\0")  # UIDs are padded with NUL
    return _string_matches(pattern, value.strip())


def value_matches(keyword: str, pattern: str, value: Value) -> bool:
    """Does ``value`` (as stored or returned) match the C-FIND matching string ``pattern``?

    ``value`` may be a sequence for a multi-valued attribute (or a ``\\``-joined string when the
    keyword's VM allows several values): any value matching is enough. A blank pattern is
    universal matching.
    """
    pattern = pattern.strip()
    if not pattern:
        return True
    vr, vm = _vr_vm(keyword)
    if isinstance(value, str):
        values = value.split("\\") if vm != "1" else [value]
    else:
        values = list(value) or [""]
    alternatives = [alt.strip() for alt in pattern.split("\\")]
    return any(_single_matches(vr, alt, v) for alt in alternatives for v in values)


# --------------------------------------------------------------------------------------------
# Studies


@dataclass(frozen=True)
class StudyCheck:
    """Our check of one candidate: ``ok`` unless a returned value contradicts a criterion.

    ``unverified`` lists criteria whose value the PACS did not return; an ``ok`` study with
    unverified keys must pass :func:`check_dataset_values` on its DICOM before upload.
    """

    ok: bool
    failed: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()


def _is_empty(value: Value | None) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return not any(v.strip() for v in value)


def _study_value(
    keyword: str, study: StudyInfo, series: Sequence[SeriesInfo] | None
) -> Value | None:
    if keyword == "ModalitiesInStudy":
        if study.modalities:
            return study.modalities
        if series is not None:
            return tuple(dict.fromkeys(s.modality for s in series if s.modality.strip()))
        return None
    field = _STUDY_FIELDS.get(keyword)
    return getattr(study, field) if field else None


def check_study(
    query: Mapping[str, str],
    study: StudyInfo,
    series: Sequence[SeriesInfo] | None = None,
) -> StudyCheck:
    """Check a PACS candidate against the row's criteria, using what the PACS returned.

    ModalitiesInStudy is checked on ``study.modalities``, else on the series' Modality values
    when ``series`` (a SERIES-level answer) is given, else it is unverified.
    """
    failed: list[str] = []
    unverified: list[str] = []
    for keyword, pattern in query.items():
        if not pattern.strip():
            continue
        value = _study_value(keyword, study, series)
        if _is_empty(value):
            if not value_matches(keyword, pattern, ""):
                unverified.append(keyword)
        elif not value_matches(keyword, pattern, value):  # type: ignore[arg-type]
            failed.append(keyword)
    return StudyCheck(ok=not failed, failed=tuple(failed), unverified=tuple(unverified))


def check_dataset_values(query: Mapping[str, str], values: Mapping[str, Value]) -> tuple[str, ...]:
    """The criteria that the retrieved DICOM does not meet (empty tuple: all met).

    ``values`` maps keywords to the value read from the files. A sequence holds the distinct
    values seen across the study's instances: for a multi-valued attribute (ModalitiesInStudy,
    which falls back to the instances' ``Modality`` values) any value matching is enough; for any
    other attribute EVERY instance must match. A keyword missing from ``values`` counts as empty,
    so a criterion nobody read can never pass by accident.
    """
    failing: list[str] = []
    for keyword, pattern in query.items():
        if not pattern.strip():
            continue
        raw = values.get(keyword)
        if raw is None and keyword == "ModalitiesInStudy":
            raw = values.get("Modality")
        seen = [raw] if isinstance(raw, str) else list(raw or [""])
        _vr, vm = _vr_vm(keyword)
        if vm != "1" or keyword == "ModalitiesInStudy":
            ok = value_matches(keyword, pattern, seen)
        else:
            ok = all(value_matches(keyword, pattern, v) for v in seen)
        if not ok:
            failing.append(keyword)
    return tuple(failing)


# --------------------------------------------------------------------------------------------
# The 0/1/N policy


def study_order(study: StudyInfo) -> tuple[bool, str, bool, str, str]:
    """Study date, then time, then UID; studies without a date (or time) come after those with."""
    date, time = study.study_date.strip(), study.study_time.strip()
    return (not date, date, not time, time, study.study_instance_uid)


def _studies(count: int) -> str:
    return "1 study" if count == 1 else f"{count} studies"


def _lines(lines: Sequence[int]) -> str:
    ordered = sorted(set(lines))
    return ("line " if len(ordered) == 1 else "lines ") + ", ".join(map(str, ordered))


def _dropped_note(dropped: int) -> str:
    if not dropped:
        return ""
    return (
        f"; the PACS also returned {_studies(dropped)} that did not meet the row's criteria "
        "on our check (dropped)"
    )


def decide_row(
    row: CsvRow,
    candidates: Sequence[StudyInfo],
    claimed: Mapping[str, int],
    *,
    multiple_matches: str = "ambiguous",
    dropped: int = 0,
    unverified: Sequence[str] = (),
) -> RowMatch:
    """Decide one row from its verified candidates (csv-language.md, "How many studies...").

    ``claimed`` maps StudyInstanceUID to the earlier line that imports it (not modified here: the
    caller adds the studies of a MATCHED row). Studies already claimed are never imported again.
    Decision for a row whose studies are only partly claimed: the policy applies to the unclaimed
    ones alone (they are the only ones this row would label), the message names the lines that
    already import the others, and ``duplicate_of`` is the first of those lines.
    """
    if multiple_matches not in MATCH_POLICIES:
        raise ValueError(f"multiple_matches must be one of {MATCH_POLICIES}, not {multiple_matches!r}")
    unique = {s.study_instance_uid: s for s in reversed(candidates)}
    ordered = sorted(unique.values(), key=study_order)
    taken = [s for s in ordered if s.study_instance_uid in claimed]
    free = [s for s in ordered if s.study_instance_uid not in claimed]
    taken_lines = [claimed[s.study_instance_uid] for s in taken]
    first_claim = min(taken_lines) if taken_lines else None
    note = _dropped_note(dropped)
    result = functools.partial(
        RowMatch, line=row.line, dropped=dropped, unverified=tuple(unverified)
    )
    if not ordered:
        return result(status=RowStatus.NO_MATCH, message="no study matches" + note)
    if not free:
        what = "the matching study is" if len(taken) == 1 else f"all {len(taken)} matching studies are"
        return result(
            status=RowStatus.DUPLICATE,
            message=f"{what} already imported by {_lines(taken_lines)}; not imported again" + note,
            studies=tuple(taken),
            duplicate_of=first_claim,
        )
    if taken:
        one = len(taken) == 1
        note = (
            f"; {_studies(len(taken))} more {'matches' if one else 'match'} but "
            f"{'is' if one else 'are'} already imported by {_lines(taken_lines)}" + note
        )
    result = functools.partial(result, studies=tuple(free), duplicate_of=first_claim)
    count = _studies(len(free))
    if len(free) == 1:
        return result(status=RowStatus.MATCHED, message="1 study matches" + note)
    if not row.relabels_session:
        return result(
            status=RowStatus.MATCHED,
            message=f"{count} match; all are imported, each labeled from its own DICOM" + note,
        )
    if multiple_matches == "suffix":
        return result(
            status=RowStatus.MATCHED,
            message=f"{count} match and the row sets the session label; imported with session "
            f"suffixes _1 to _{len(free)} in study date order" + note,
            session_suffix={s.study_instance_uid: f"_{i}" for i, s in enumerate(free, start=1)},
        )
    return result(
        status=RowStatus.AMBIGUOUS,
        message=f"{count} match and the row sets the session label (Session, Relabel Study ID or "
        "Relabel Accession Number), so they would all get the same session; nothing imported. "
        "Narrow the search (e.g. add Study Date or Modality) or ask the admins for the suffix "
        "policy" + note,
    )


def decide_rows(
    rows: Sequence[CsvRow],
    candidates: Mapping[int, Sequence[StudyInfo]],
    *,
    multiple_matches: str = "ambiguous",
    dropped: Mapping[int, int] | None = None,
    errors: Mapping[int, str] | None = None,
) -> list[RowMatch]:
    """Decide every row in line order: the first row to match a study imports it.

    ``candidates`` maps each row's line to its verified candidates; ``errors`` maps a line whose
    query failed to its message (status ERROR). A row in neither is a caller bug (ValueError).
    """
    claimed: dict[str, int] = {}
    matches: list[RowMatch] = []
    for row in sorted(rows, key=lambda r: r.line):
        if errors and row.line in errors:
            matches.append(RowMatch(row.line, RowStatus.ERROR, errors[row.line]))
            continue
        if row.line not in candidates:
            raise ValueError(f"line {row.line}: no query result and no error was given")
        match = decide_row(
            row,
            candidates[row.line],
            claimed,
            multiple_matches=multiple_matches,
            dropped=(dropped or {}).get(row.line, 0),
        )
        if match.status is RowStatus.MATCHED:
            for study in match.studies:
                claimed[study.study_instance_uid] = row.line
        matches.append(match)
    return matches


# --------------------------------------------------------------------------------------------
# Series


def _glob_any(value: str, patterns: Sequence[str]) -> bool:
    folded = value.strip().casefold()
    return any(fnmatch.fnmatchcase(folded, p.casefold()) for p in patterns)


def series_kept(series: SeriesInfo, rules: SeriesFilter) -> bool:
    """The SeriesFilter rule: each include list (if any) has a matching pattern and no exclude does."""
    for patterns in (rules.include, rules.also_include):
        if patterns and not _glob_any(series.series_description, patterns):
            return False
    for patterns in (rules.modality_include, rules.also_modality_include):
        if patterns and not _glob_any(series.modality, patterns):
            return False
    return not (
        _glob_any(series.series_description, rules.exclude)
        or _glob_any(series.modality, rules.modality_exclude)
    )


def filter_series(
    series: Sequence[SeriesInfo], rules: SeriesFilter
) -> tuple[tuple[SeriesInfo, ...], tuple[SeriesInfo, ...]]:
    """Split a study's series into (kept, dropped), keeping their order."""
    kept = tuple(s for s in series if series_kept(s, rules))
    dropped = tuple(s for s in series if not series_kept(s, rules))
    return kept, dropped
