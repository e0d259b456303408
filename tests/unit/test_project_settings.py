"""Project owners' settings entry: narrowing only, every problem reported, admin values kept."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dqr_xnat.config import ProjectConfig
from dqr_xnat.model import SeriesFilter, SeriesInfo
from dqr_xnat.project_settings import (
    MAX_SETTINGS_BYTES,
    SETTINGS_PROBLEMS_FILE,
    describe_settings,
    effective_settings,
    render_settings_problems,
)
from dqr_xnat.stages.verify import filter_series, series_kept

ADMIN = ProjectConfig(
    name="NEURO01",
    pacs=("hospital", "research"),
    series=SeriesFilter(include=("T1*", "T2*"), exclude=("*scout*",)),
    multiple_matches="suffix",
    report_patient_identity=True,
    max_rows=100,
    max_studies=200,
)
STRICT = ProjectConfig(name="NEURO02", pacs=("hospital",))  # ambiguous, no identity, no series filter

SERIES = (
    SeriesInfo("1", series_description="T1_MPRAGE", modality="MR"),
    SeriesInfo("2", series_description="T1_SE", modality="MR"),
    SeriesInfo("3", series_description="T2_FLAIR", modality="MR"),
    SeriesInfo("4", series_description="T1 scout", modality="MR"),
    SeriesInfo("5", series_description="T2_dose", modality="SR"),
    SeriesInfo("6", series_description="DWI", modality="MR"),
)


def uids(series: tuple[SeriesInfo, ...]) -> list[str]:
    return [s.series_instance_uid for s in series]


# ------------------------------------------------------------------------------------------
# Nothing to narrow


@pytest.mark.parametrize("contents", [None, "", "# only a comment\n", "---\n", "pacs:\nmax_rows: ~\n"])
def test_absent_or_empty_entry_keeps_the_admin_settings(contents: str | None) -> None:
    assert effective_settings(ADMIN, contents) == (ADMIN, [])


# ------------------------------------------------------------------------------------------
# Narrowing that is allowed


def test_every_key_narrows() -> None:
    contents = """
pacs: [research]
series:
  include: ["*MPRAGE*", "*FLAIR*"]
  exclude: ["*dose*"]
  modality_include: [mr]
  modality_exclude: [SR]
multiple_matches: ambiguous
report_patient_identity: false
max_rows: 10
max_studies: 20
"""
    result, problems = effective_settings(ADMIN, contents)
    assert problems == []
    assert result == ProjectConfig(
        name="NEURO01",
        pacs=("research",),
        series=SeriesFilter(include=("T1*", "T2*"), exclude=("*scout*", "*dose*"), modality_include=("mr",),
                            modality_exclude=("SR",), also_include=("*MPRAGE*", "*FLAIR*")),
        multiple_matches="ambiguous", report_patient_identity=False, max_rows=10, max_studies=20,
    )
    assert result.default_pacs == "research"


def test_pacs_order_chooses_the_default_and_repeats_are_dropped() -> None:
    result, problems = effective_settings(ADMIN, "pacs: [research, hospital, research]")
    assert problems == [] and result.pacs == ("research", "hospital") and result.default_pacs == "research"


def test_json_is_accepted_and_equal_values_are_no_change() -> None:
    contents = json.dumps({"pacs": ["hospital"], "multiple_matches": "suffix", "report_patient_identity": True,
                           "max_rows": 100, "max_studies": 200})
    result, problems = effective_settings(ADMIN, contents)
    assert problems == [] and result == ProjectConfig(**{**ADMIN.__dict__, "pacs": ("hospital",)})


def test_owner_includes_and_with_admin_includes() -> None:
    result, _ = effective_settings(ADMIN, "series: {include: ['*MPRAGE*', '*FLAIR*']}")
    kept, dropped = filter_series(SERIES, result.series)
    assert uids(kept) == ["1", "3"]  # T1*/T2* (admin) AND *MPRAGE*/*FLAIR* (owner)
    assert uids(dropped) == ["2", "4", "5", "6"]
    assert uids(filter_series(SERIES, ADMIN.series)[0]) == ["1", "2", "3", "5"]


def test_owner_includes_alone_when_the_admins_gave_none() -> None:
    result, _ = effective_settings(STRICT, "series: {include: 'DWI', modality_include: [MR]}")
    assert result.series == SeriesFilter(include=("DWI",), modality_include=("MR",))
    assert uids(filter_series(SERIES, result.series)[0]) == ["6"]


def test_owner_modality_include_ands_with_admin_modality_include() -> None:
    admin = ProjectConfig(name="P", pacs=("hospital",), series=SeriesFilter(modality_include=("MR", "SR")))
    result, _ = effective_settings(admin, "series: {modality_include: [SR]}")
    assert result.series.also_modality_include == ("SR",)
    assert uids(filter_series(SERIES, result.series)[0]) == ["5"]


def test_owner_excludes_add_to_admin_excludes() -> None:
    result, _ = effective_settings(ADMIN, "series: {exclude: ['*FLAIR*'], modality_exclude: [sr]}")
    assert uids(filter_series(SERIES, result.series)[0]) == ["1", "2"]


# ------------------------------------------------------------------------------------------
# Widening is refused, key by key


@pytest.mark.parametrize(("admin", "contents", "problem"), [
    (ADMIN, "pacs: [hospital, other]",
     "pacs[1]: 'other' is not allowed for this project by the admins (allowed: hospital, research); "
     "ignored, with the rest of 'pacs'"),
    (ADMIN, "pacs: []", "pacs: must list at least one PACS (allowed: hospital, research); "
     "ignored (the admins' setting applies)"),
    (ADMIN, "pacs: {a: 1}", "pacs: must be a list of PACS names, not dict; ignored (the admins' setting applies)"),
    (STRICT, "multiple_matches: suffix",
     "multiple_matches: 'suffix' is not allowed for this project by the admins (they chose 'ambiguous': a row "
     "matching several studies imports none); ignored"),
    (ADMIN, "multiple_matches: first",
     "multiple_matches: must be one of ambiguous, suffix, not 'first'; ignored (the admins' setting applies)"),
    (STRICT, "report_patient_identity: yes",
     "report_patient_identity: true is not allowed for this project by the admins (reports do not show patient "
     "names and IDs); ignored"),
    (ADMIN, "report_patient_identity: maybe",
     "report_patient_identity: must be true or false, not 'maybe'; ignored (the admins' setting applies)"),
    (ADMIN, "max_rows: 101", "max_rows: 101 is above the admins' limit of 100 for this project; ignored (100 applies)"),
    (ADMIN, "max_studies: 0",
     "max_studies: must be a whole number of at least 1, not 0; ignored (the admins' setting applies)"),
    (ADMIN, "max_studies: true",
     "max_studies: must be a whole number of at least 1, not True; ignored (the admins' setting applies)"),
    (ADMIN, "max_rows: 5.5",
     "max_rows: must be a whole number of at least 1, not 5.5; ignored (the admins' setting applies)"),
    (ADMIN, "series: [T1*]", "series: must be a mapping with the keys include, exclude, modality_include, "
     "modality_exclude, not a list; ignored (the admins' setting applies)"),
    (ADMIN, "series: {include: [1, 2]}",
     "series.include: must be a list of patterns (e.g. [\"T1*\", \"*FLAIR*\"]), not a list; ignored (the "
     "admins' setting applies)"),
    (ADMIN, "series: {exclude: ['*a*', ' ']}",
     "series.exclude[1]: an empty pattern matches nothing useful; 'series.exclude' ignored (the admins' "
     "setting applies)"),
])
def test_a_widening_or_invalid_key_is_ignored_with_a_problem(admin: ProjectConfig, contents: str,
                                                              problem: str) -> None:
    assert effective_settings(admin, contents) == (admin, [problem])


def test_one_bad_key_does_not_stop_the_good_ones() -> None:
    result, problems = effective_settings(ADMIN, "max_rows: 500\npacs: [research]\nmax_studies: 5\n")
    assert problems == ["max_rows: 500 is above the admins' limit of 100 for this project; ignored (100 applies)"]
    assert (result.max_rows, result.pacs, result.max_studies) == (100, ("research",), 5)


def test_unknown_keys_get_a_suggestion_in_entry_order() -> None:
    result, problems = effective_settings(ADMIN, "max_row: 5\nseries: {includes: [x], exclude: [y]}\nfoo: 1\n")
    assert problems == [
        "max_row: unknown key (did you mean 'max_rows'?); ignored",
        "series.includes: unknown key (did you mean 'include'?); ignored",
        "foo: unknown key (known: pacs, series, multiple_matches, report_patient_identity, max_rows, "
        "max_studies); ignored",
    ]
    assert result == ProjectConfig(**{**ADMIN.__dict__,
                                      "series": SeriesFilter(include=("T1*", "T2*"), exclude=("*scout*", "y"))})


@pytest.mark.parametrize(("contents", "problem"), [
    ("pacs: [hospital\nmax_rows: 5\n", "line 2, column 9: not valid YAML (expected ',' or ']', but got ':')"),
    ("max_rows: 5\nmax_rows: 6\n", "line 2, column 1: not valid YAML (duplicate key 'max_rows')"),
    ("max_rows: !!python/object:os.system 5\n", "line 1, column 11: not valid YAML (could not determine a "
     "constructor for the tag 'tag:yaml.org,2002:python/object:os.system')"),
    ("\tpacs: [a]\n", "line 1, column 1: not valid YAML (found character '\\t' that cannot start any token)"),
])
def test_invalid_yaml_names_line_and_column_and_applies_nothing(contents: str, problem: str) -> None:
    result, problems = effective_settings(ADMIN, contents)
    assert result == ADMIN
    assert problems == [problem + ": nothing in the entry was applied (the admins' settings apply)"]


def test_not_a_mapping_or_too_large_applies_nothing() -> None:
    assert effective_settings(ADMIN, "- pacs\n")[1] == [
        "the entry must be a YAML mapping with the keys pacs, series, multiple_matches, report_patient_identity, "
        "max_rows, max_studies; it is a list: nothing in it was applied (the admins' settings apply)"]
    huge = "max_rows: 5\n" + "#" * MAX_SETTINGS_BYTES
    assert effective_settings(ADMIN, huge) == (ADMIN, [
        f"the entry is {len(huge)} bytes; the limit is {MAX_SETTINGS_BYTES}: nothing in it was applied "
        "(the admins' settings apply)"])


# ------------------------------------------------------------------------------------------
# Never wider, whatever the entry says


ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 500) | st.sampled_from(
        ["hospital", "research", "other", "suffix", "ambiguous", "T1*", "*", "", "MR", "SR", "*FLAIR*"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["include", "exclude", "modality_include", "modality_exclude", "x"]), inner, max_size=4),
    max_leaves=12,
)
ENTRIES = st.dictionaries(
    st.sampled_from(["pacs", "series", "multiple_matches", "report_patient_identity", "max_rows", "max_studies",
                     "pacs_", "other"]), ANY_VALUE, max_size=8)
SERIES_SAMPLES = st.builds(SeriesInfo, st.just("u"), series_description=st.sampled_from(
    ["T1_MPRAGE", "T2_FLAIR", "T1 scout", "DWI", "", "t1"]), modality=st.sampled_from(["MR", "SR", "CT", ""]))


@settings(max_examples=300, deadline=None)
@given(entry=ENTRIES, admin=st.sampled_from([ADMIN, STRICT]), series=st.lists(SERIES_SAMPLES, max_size=6))
def test_an_entry_never_widens_the_admin_settings(entry: dict[str, Any], admin: ProjectConfig,
                                                  series: list[SeriesInfo]) -> None:
    result, problems = effective_settings(admin, yaml.safe_dump(entry))
    assert result.name == admin.name
    assert result.pacs and set(result.pacs) <= set(admin.pacs)
    assert result.max_rows <= admin.max_rows and result.max_studies <= admin.max_studies
    assert admin.report_patient_identity or not result.report_patient_identity
    assert result.multiple_matches == admin.multiple_matches or result.multiple_matches == "ambiguous"
    for one in series:
        assert series_kept(one, admin.series) or not series_kept(one, result.series)
    assert all(isinstance(p, str) and ": " in p for p in problems)


# ------------------------------------------------------------------------------------------
# Reporting the problems to the project


def test_problems_file_lists_problems_settings_in_force_and_how_to_fix() -> None:
    result, problems = effective_settings(ADMIN, "pacs: [other]\nmax_rows: 5\n")
    text = render_settings_problems("NEURO01", problems, result)
    assert SETTINGS_PROBLEMS_FILE == "settings.problems.txt"
    assert text.startswith("dqr-xnat settings of project NEURO01: 1 problem(s)\n")
    assert "/data/projects/NEURO01/config/dqr-xnat/settings" in text and "curl -u OWNER -X PUT" in text
    assert "  - pacs[0]: 'other' is not allowed for this project by the admins" in text
    assert text.endswith("\n".join(f"  {line}" for line in describe_settings(result)) + "\n")
    assert "  max_rows: 5\n" in text and "  pacs: hospital, research (default hospital)\n" in text
    assert "Settings in force" not in render_settings_problems("NEURO01", problems)
