"""XNAT project, subject and session labels by DQR's dqrObjectIdentifier rules (pure).

Rules (dqr-behaviour.md), applied to the DICOM as it is after relabeling:

* project: the project that owns the CSV, never read from DICOM; must be a legal project ID;
* subject: PatientName mapped to label characters;
* session: StudyID, else AccessionNumber (newer DQR), else a deterministic fallback;
* label characters: every character outside ``[A-Za-z0-9_-]`` becomes ``_``, one per Python
  character (code point), as XNAT's toLabelChars does (``MÜLLER`` -> ``M_LLER``).

Decisions beyond DQR, recorded in :attr:`XnatLabels.fallback` as comma-separated codes:

* PatientName is first normalised as a DICOM PN: trailing empty components and groups carry no
  meaning, so ``DOE^JOHN^^`` and ``DOE^JOHN`` land in the same subject ``DOE_JOHN``;
* session fallback ``session:AccessionNumber`` when StudyID is blank (DQR's own fallback, still
  reported), ``session:StudyInstanceUID`` when both are blank: ``study_`` + the first 10 hex
  characters of SHA-1(StudyInstanceUID), stable across runs and machines;
* subject fallback when PatientName is blank: ``subject:PatientID``, the PatientID mapped to label
  characters; ``subject:StudyInstanceUID`` when that is blank too: ``subject_`` + 10 hex of
  SHA-1(StudyInstanceUID);
* labels longer than 64 characters are cut to 64; a session suffix (``_1``) is kept whole and the
  base is cut to make room, so suffixed sessions stay distinct.
"""

from __future__ import annotations

import hashlib
import re

from dqr_xnat.config import PROJECT_RE
from dqr_xnat.errors import LabelError
from dqr_xnat.model import XnatLabels
from dqr_xnat.stages.verify import normalise_pn

MAX_LABEL = 64
LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ILLEGAL = re.compile(r"[^A-Za-z0-9_-]")


def to_label_chars(text: str) -> str:
    """Replace each character outside ``[A-Za-z0-9_-]`` with ``_`` (XNAT's toLabelChars)."""
    return _ILLEGAL.sub("_", text)


def nearest_label(text: str) -> str:
    """The legal label closest to ``text``: label characters, cut to 64, never empty."""
    return to_label_chars(text.strip())[:MAX_LABEL] or "_"


def validate_label(label: str, what: str) -> str:
    """Return ``label`` if it is a legal XNAT label, else raise LabelError naming ``what``."""
    if LABEL_RE.fullmatch(label):
        return label
    if not label:
        raise LabelError(f"{what} label is empty; XNAT labels need 1 to 64 characters")
    if len(label) > MAX_LABEL:
        reason = f"is {len(label)} characters long (at most {MAX_LABEL})"
    else:
        reason = "contains characters other than letters, digits, '_' and '-'"
    raise LabelError(f"{what} label '{label}' {reason}; nearest legal label: '{nearest_label(label)}'")


def validate_project(project: str) -> str:
    """Return ``project`` if it is a legal XNAT project ID, else raise LabelError."""
    if PROJECT_RE.fullmatch(project):
        return project
    raise LabelError(
        f"project ID '{project}' is not a legal XNAT project ID (letters, digits, '_' and '-' only)"
    )


def uid_label(prefix: str, uid: str) -> str:
    """``prefix`` + the first 10 hex characters of SHA-1(uid): a stable stand-in label."""
    return prefix + hashlib.sha1(uid.encode("ascii", "replace")).hexdigest()[:10]


def _fit(base: str, suffix: str = "") -> str:
    return base[: MAX_LABEL - len(suffix)] + suffix


def _subject(patient_name: str, patient_id: str, uid: str) -> tuple[str, str | None]:
    name = to_label_chars(normalise_pn(patient_name))
    if name:
        return name, None
    pid = to_label_chars(patient_id.strip())
    if pid:
        return pid, "subject:PatientID"
    return uid_label("subject_", uid), "subject:StudyInstanceUID"


def _session(study_id: str, accession_number: str, uid: str) -> tuple[str, str | None]:
    if study_id.strip():
        return to_label_chars(study_id.strip()), None
    if accession_number.strip():
        return to_label_chars(accession_number.strip()), "session:AccessionNumber"
    return uid_label("study_", uid), "session:StudyInstanceUID"


def make_labels(
    project: str,
    *,
    patient_name: str,
    study_id: str,
    accession_number: str,
    study_instance_uid: str,
    patient_id: str = "",
    suffix: str = "",
) -> XnatLabels:
    """The labels XNAT's dqrObjectIdentifier would give this (relabeled) study; never empty.

    Raises
    ------
    LabelError
        The project ID, the suffix or the StudyInstanceUID (needed for the fallbacks) is illegal.
    """
    validate_project(project)
    if suffix and not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", suffix):
        raise LabelError(f"session suffix '{suffix}' must be 1 to 16 label characters")
    if not study_instance_uid.strip():
        raise LabelError("a study without StudyInstanceUID cannot be labeled")
    subject, subject_fallback = _subject(patient_name, patient_id, study_instance_uid)
    session, session_fallback = _session(study_id, accession_number, study_instance_uid)
    fallbacks = [f for f in (subject_fallback, session_fallback) if f]
    return XnatLabels(
        project=project,
        subject=validate_label(_fit(subject), "subject"),
        session=validate_label(_fit(session, suffix), "session"),
        fallback=", ".join(fallbacks) or None,
    )
