"""Apply a row's relabel plan to one pydicom dataset (pure: no file IO).

The plan maps RELABEL_KEYWORDS to new values (csv-language.md). Decisions:

* ``""`` empties the element but keeps it present: all six are Type 2 in the common IODs (present,
  may be empty), so removing them would make the instance invalid.
* An absent element is created with its dictionary VR.
* PatientID relabeled: OtherPatientIDsSequence, OtherPatientIDs, IssuerOfPatientID and
  IssuerOfPatientIDQualifiersSequence are removed, because they carry or qualify the ORIGINAL ID
  (CT_small.dcm holds such a sequence): kept, they would leak it into XNAT beside the new one.
  PatientName relabeled: OtherPatientNames is removed for the same reason. Relabeling is not
  de-identification: every other element is left exactly as it was.
* Retired group-length elements (gggg,0000) of a changed group are removed, since the new values
  would make them wrong; pydicom does not recompute them.
* A non-ASCII new value that the dataset's SpecificCharacterSet cannot encode switches the dataset
  to ``ISO_IR 192`` (UTF-8); all its text elements are decoded with the old character set first so
  pydicom re-encodes them correctly. ASCII values never change the character set.
* Values are checked against their VR before anything changes (:func:`check_relabel_value`);
  a bad value raises RelabelError naming the attribute and the limit.
"""

from __future__ import annotations

import datetime
import re
from typing import Iterable, Mapping

import pydicom.charset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import MAX_VALUE_LEN

from dqr_xnat.errors import RelabelError
from dqr_xnat.model import RELABEL_KEYWORDS

UTF8_CHARSET = "ISO_IR 192"
_DEFAULT_CODEC = pydicom.charset.python_encoding["ISO_IR 6"]  # pydicom's name for ASCII

#: Elements removed with a relabel of the key, because they carry the original identity.
IDENTITY_COMPANIONS: Mapping[str, tuple[str, ...]] = {
    "PatientID": (
        "OtherPatientIDsSequence",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
    ),
    "PatientName": ("OtherPatientNames",),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PN_GROUP_MAX = 64


def _check_pn(value: str) -> str | None:
    groups = value.split("=")
    if len(groups) > 3:
        return "a person name has at most 3 component groups separated by '='"
    for group in groups:
        if len(group) > _PN_GROUP_MAX:
            return f"each name component group may hold at most {_PN_GROUP_MAX} characters"
        if group.count("^") > 4:
            return "a person name has at most 5 components separated by '^'"
    return None


def _check_date(value: str) -> str | None:
    try:
        if re.fullmatch(r"\d{8}", value):
            datetime.datetime.strptime(value, "%Y%m%d")
            return None
    except ValueError:
        pass
    return "must be one real date written YYYYMMDD"


def check_relabel_value(keyword: str, value: str) -> str | None:
    """Why ``value`` cannot be written into ``keyword``, or None if it can ("" always can)."""
    if keyword not in RELABEL_KEYWORDS:
        return f"{keyword} cannot be relabeled (only {', '.join(RELABEL_KEYWORDS)})"
    if not value:
        return None
    vr = dictionary_VR(tag_for_keyword(keyword))
    problem: str | None = None
    if "\\" in value:
        problem = "must be one value (a backslash would make it several)"
    elif _CONTROL.search(value):
        problem = "must not contain control characters (tabs, line breaks)"
    elif vr == "DA":
        problem = _check_date(value)
    elif vr == "PN":
        problem = _check_pn(value)
    elif vr in MAX_VALUE_LEN and len(value) > MAX_VALUE_LEN[vr]:
        problem = f"may hold at most {MAX_VALUE_LEN[vr]} characters (VR {vr}), not {len(value)}"
    return f"{keyword} '{value}': {problem}" if problem else None


def check_plan(plan: Mapping[str, str]) -> list[str]:
    """Every problem of a relabel plan, one message each (empty list: the plan can be applied)."""
    return [msg for key, value in plan.items() if (msg := check_relabel_value(key, value))]


def _charset_names(ds: Dataset) -> list[str]:
    raw = ds.get("SpecificCharacterSet")
    if raw is None:
        return []
    names = [raw] if isinstance(raw, str) else list(raw)
    return [str(n).strip() for n in names if str(n).strip()]


def can_encode(charset_names: list[str], values: Iterable[str]) -> bool:
    """True when one single-byte/UTF-8 character set in the dataset can encode every value.

    Code-extension sets (several values, ISO 2022 escapes) count as unable: switching to UTF-8 is
    simpler and always correct.
    """
    needed = [v for v in values if not v.isascii()]
    if not needed:
        return True
    if len(charset_names) != 1:
        return False
    codec = pydicom.charset.python_encoding.get(charset_names[0])
    if codec is None or codec == _DEFAULT_CODEC:  # the default repertoire is ASCII only
        return False
    try:
        for value in needed:
            value.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _ensure_charset(ds: Dataset, values: Iterable[str]) -> None:
    names = _charset_names(ds)
    if can_encode(names, values):
        return
    codecs = {pydicom.charset.python_encoding.get(n) for n in names}
    if codecs - {_DEFAULT_CODEC}:
        ds.decode()  # text now held as str; written again in UTF-8 below
    ds.SpecificCharacterSet = UTF8_CHARSET


def relabel_dataset(ds: Dataset, plan: Mapping[str, str]) -> None:
    """Write the plan's values into ``ds`` in place (see the module docstring for the rules).

    Raises
    ------
    RelabelError
        A value does not fit its attribute; ``ds`` is left unchanged.
    """
    problems = check_plan(plan)
    if problems:
        raise RelabelError("cannot relabel: " + "; ".join(problems))
    if not plan:
        return
    _ensure_charset(ds, plan.values())
    for keyword, value in plan.items():
        setattr(ds, keyword, value)
        for companion in IDENTITY_COMPANIONS.get(keyword, ()):
            if companion in ds:
                delattr(ds, companion)
    for group in {Tag(tag_for_keyword(k)).group for k in plan}:
        if Tag(group, 0) in ds:
            del ds[Tag(group, 0)]
