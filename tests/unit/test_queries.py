"""C-FIND identifiers for a row: lists split into one query per value, return keys, charset."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqr_xnat.stages.queries import (
    MAX_QUERIES_PER_ROW,
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    build_queries,
    needs_specific_character_set,
    series_query,
    split_values,
)


def criteria(identifier):
    """The keys sent with a matching value (everything else is a return key with "")."""
    return {k: v for k, v in identifier.items() if v != ""}


def test_return_keys_are_the_ones_the_adapter_needs():
    assert STUDY_RETURN_KEYS == (
        "StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
        "StudyDate", "StudyTime", "StudyID", "StudyDescription", "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    )
    assert SERIES_RETURN_KEYS == (
        "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
        "NumberOfSeriesRelatedInstances",
    )


def test_single_values_give_one_identifier_with_every_return_key():
    (ident,) = build_queries({"AccessionNumber": "ACC01*", "StudyDate": "20230101-20230131"})
    assert set(ident) == set(STUDY_RETURN_KEYS)
    assert criteria(ident) == {"AccessionNumber": "ACC01*", "StudyDate": "20230101-20230131"}


@pytest.mark.parametrize("value", ["DOE^J*", "-19991231", "20230201-", "PID000?", "M*LLER*"])
def test_wildcards_and_ranges_pass_through_unchanged(value):
    key = "StudyDate" if value[0] in "-2" else "PatientName"
    (ident,) = build_queries({key: value})
    assert ident[key] == value


def test_list_is_split_into_one_query_per_value():
    idents = build_queries({"AccessionNumber": "ACC0101\\ACC0200", "PatientID": "PID1"})
    assert [criteria(i) for i in idents] == [
        {"AccessionNumber": "ACC0101", "PatientID": "PID1"},
        {"AccessionNumber": "ACC0200", "PatientID": "PID1"},
    ]


def test_lists_in_two_keys_give_the_cartesian_product():
    idents = build_queries({"PatientName": "DOE^JOHN\\SMITH^ALICE", "ModalitiesInStudy": "CT\\MR\\PT"})
    got = {(i["PatientName"], i["ModalitiesInStudy"]) for i in idents}
    assert len(idents) == 6
    assert got == {(n, m) for n in ("DOE^JOHN", "SMITH^ALICE") for m in ("CT", "MR", "PT")}


def test_uid_lists_are_split_too():
    # A PACS that takes "a\b" as one literal UID would silently lose both studies.
    idents = build_queries({"StudyInstanceUID": "1.2.3\\1.2.4"})
    assert [i["StudyInstanceUID"] for i in idents] == ["1.2.3", "1.2.4"]


def test_list_values_are_trimmed_and_deduplicated():
    idents = build_queries({"AccessionNumber": " A1 \\A2\\A1"})
    assert [i["AccessionNumber"] for i in idents] == ["A1", "A2"]


def test_blank_criteria_are_universal_and_not_sent():
    (ident,) = build_queries({"AccessionNumber": "A1", "PatientID": "  "})
    assert criteria(ident) == {"AccessionNumber": "A1"}


def test_empty_alternative_is_refused_because_it_would_match_everything():
    with pytest.raises(ValueError, match="empty value in its backslash list"):
        build_queries({"AccessionNumber": "A1\\"})


def test_too_many_queries_raise_a_clear_error():
    values = "\\".join(f"A{i}" for i in range(17))
    ids = "\\".join(f"P{i}" for i in range(16))
    with pytest.raises(ValueError) as err:
        build_queries({"AccessionNumber": values, "PatientID": ids})
    assert "272 PACS queries" in str(err.value)
    assert f"limit of {MAX_QUERIES_PER_ROW}" in str(err.value)
    assert "split the row" in str(err.value)


def test_cap_is_inclusive_and_configurable():
    values = "\\".join(f"A{i}" for i in range(MAX_QUERIES_PER_ROW))
    assert len(build_queries({"AccessionNumber": values})) == MAX_QUERIES_PER_ROW
    with pytest.raises(ValueError):
        build_queries({"AccessionNumber": "A\\B\\C"}, max_queries=2)


def test_identifiers_are_independent_dicts():
    a, b = build_queries({"AccessionNumber": "A\\B"})
    a["PatientName"] = "X"
    assert b["PatientName"] == ""


def test_series_query_asks_every_series_of_one_study():
    ident = series_query("1.2.3")
    assert ident["StudyInstanceUID"] == "1.2.3"
    assert set(ident) == set(SERIES_RETURN_KEYS) | {"StudyInstanceUID"}


def test_split_values():
    assert split_values("A\\ B") == ["A", "B"]
    assert split_values("A") == ["A"]


@pytest.mark.parametrize(
    "identifier, expected",
    [
        ({"PatientName": "DOE^JOHN", "PatientID": ""}, None),
        ({"PatientName": "MÜLLER^HANS"}, "ISO_IR 192"),
        ({"PatientName": "", "StudyDescription": "Schädel"}, "ISO_IR 192"),
        ({"AccessionNumber": "日本"}, "ISO_IR 192"),
        ({}, None),
    ],
)
def test_specific_character_set_only_for_non_ascii(identifier, expected):
    assert needs_specific_character_set(identifier) == expected


@given(st.lists(st.text(alphabet="AB12^*", min_size=1, max_size=4), min_size=1, max_size=5, unique=True))
def test_every_listed_value_gets_exactly_one_query(values):
    idents = build_queries({"PatientName": "\\".join(values)})
    assert sorted(i["PatientName"] for i in idents) == sorted(v.strip() for v in values)
