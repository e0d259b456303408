"""Turn one CSV row's criteria into the C-FIND identifiers to send (pure).

Many PACS do not implement multiple-value matching (dcmqrscp supports backslash lists only for
UIDs and answers 0 studies otherwise; pynetdicom's qrscp indexes few keys). So every backslash
list is split into one query per value, and a row with lists in several keys becomes the cartesian
product of its values. The union of the answers, merged by StudyInstanceUID, is then exactly what
standard multiple-value matching would have returned, on every PACS.

Decision: UID lists are split too. List-of-UID matching is required by the standard, but a PACS
that treats ``uidA\\uidB`` as one literal UID would answer "no match" and silently lose studies;
one C-FIND per UID costs a few milliseconds. The cap (:data:`MAX_QUERIES_PER_ROW`) keeps a row
from hammering the PACS; the caller turns the ValueError into a row error.

The row's ``query`` mapping itself stays the criteria for :mod:`dqr_xnat.stages.verify`: the
identifiers built here are only what we ask the PACS, never what we trust.
"""

from __future__ import annotations

import itertools
from typing import Mapping

#: Study-level keys asked back with every study-level C-FIND.
STUDY_RETURN_KEYS: tuple[str, ...] = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)

#: Series-level keys asked back with every series-level C-FIND.
SERIES_RETURN_KEYS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "NumberOfSeriesRelatedInstances",
)

#: At most this many C-FINDs for one row (product of the list lengths).
MAX_QUERIES_PER_ROW = 256

#: The character set we declare whenever a query value is not plain ASCII.
UTF8_CHARSET = "ISO_IR 192"


def split_values(value: str) -> list[str]:
    """The alternatives of a DICOM matching string (``A\\B`` -> ``["A", "B"]``), trimmed."""
    return [part.strip() for part in value.split("\\")]


def build_queries(
    query: Mapping[str, str],
    *,
    return_keys: tuple[str, ...] = STUDY_RETURN_KEYS,
    max_queries: int = MAX_QUERIES_PER_ROW,
) -> list[dict[str, str]]:
    """The study-level C-FIND identifiers for one row: one per combination of listed values.

    Each identifier maps every return key to ``""`` (asked back) and each criterion to one single
    matching value (wildcards and date ranges pass through unchanged). QueryRetrieveLevel and
    SpecificCharacterSet are left to the caller (see :func:`needs_specific_character_set`).
    Blank criteria are universal matching and are not sent as criteria.

    Raises
    ------
    ValueError
        A list holds an empty alternative (``A\\\\`` would silently match everything), or the row
        needs more than ``max_queries`` C-FINDs.
    """
    alternatives: list[tuple[str, list[str]]] = []
    for key, value in query.items():
        if not value.strip():
            continue
        values = split_values(value)
        if any(not v for v in values):
            raise ValueError(
                f"{key} '{value}' has an empty value in its backslash list; "
                "remove the extra backslash"
            )
        alternatives.append((key, list(dict.fromkeys(values))))
    count = 1
    for _key, values in alternatives:
        count *= len(values)
    if count > max_queries:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in alternatives if len(v) > 1)
        raise ValueError(
            f"the row needs {count} PACS queries ({sizes} listed values), more than the limit of "
            f"{max_queries}; split the row into several rows or list fewer values"
        )
    base = {key: "" for key in return_keys}
    keys = [key for key, _values in alternatives]
    identifiers = []
    for combination in itertools.product(*(values for _key, values in alternatives)):
        identifier = dict(base)
        identifier.update(zip(keys, combination))
        identifiers.append(identifier)
    return identifiers


def series_query(study_instance_uid: str) -> dict[str, str]:
    """The series-level C-FIND identifier listing every series of one study."""
    identifier = {key: "" for key in SERIES_RETURN_KEYS}
    identifier["StudyInstanceUID"] = study_instance_uid
    return identifier


def needs_specific_character_set(identifier: Mapping[str, str]) -> str | None:
    """``"ISO_IR 192"`` when any value is not ASCII, else None.

    Without SpecificCharacterSet, pydicom encodes values as Latin-1 and each PACS guesses
    differently (pacs-notes §2: ``MÜLLER^HANS`` matches nothing on dcmqrscp or on Orthanc with
    ``DefaultEncoding: Utf8``); with ISO_IR 192 declared, both match.
    """
    if any(not value.isascii() for value in identifier.values()):
        return UTF8_CHARSET
    return None
