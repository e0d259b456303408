"""Our own matching, the 0/1/N row policy, duplicates across rows, and series filtering.

The PACS quirks of pacs-notes §2 appear here as inputs: Orthanc's case-insensitive PN answers,
dcmqrscp's ignored ModalitiesInStudy (all studies back, no modalities returned), qrscp returning
keys empty, duplicate answers for one study.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqr_xnat.model import CsvRow, RowStatus, SeriesFilter, SeriesInfo, StudyInfo
from dqr_xnat.stages.verify import (
    StudyCheck,
    check_dataset_values,
    check_study,
    decide_row,
    decide_rows,
    filter_series,
    normalise_pn,
    study_order,
    value_matches,
)

# --------------------------------------------------------------------------------------------
# value_matches


@pytest.mark.parametrize(
    "keyword, pattern, value, expected",
    [
        # single value matching: exact, case-sensitive, padding insignificant
        ("AccessionNumber", "ACC0101", "ACC0101", True),
        ("AccessionNumber", "ACC0101", "ACC0102", False),
        ("AccessionNumber", "acc0101", "ACC0101", False),
        ("AccessionNumber", "ACC0101", "ACC0101 ", True),
        ("AccessionNumber", "ACC01", "ACC0101", False),
        ("PatientID", "PID0001", "PID0001", True),
        # wildcards
        ("AccessionNumber", "ACC01*", "ACC0101", True),
        ("AccessionNumber", "ACC01*", "ACC01", True),
        ("AccessionNumber", "ACC01*", "ACC0201", False),
        ("PatientID", "PID000?", "PID0003", True),
        ("PatientID", "PID000?", "PID00031", False),
        ("PatientID", "PID000?", "PID000", False),
        ("PatientID", "*01", "PID0001", True),
        ("PatientID", "P*D*1", "PID0001", True),
        ("PatientID", "*", "", True),
        ("PatientID", "?", "", False),
        # regex metacharacters are literal
        ("PatientID", "A.B", "AxB", False),
        ("PatientID", "A+B(1)", "A+B(1)", True),
        ("PatientID", "[AB]", "A", False),
        # wildcards are case-sensitive too (dcmqrscp; Orthanc's extra answers are filtered)
        ("PatientName", "DOE*", "doe^lower", False),
        ("PatientName", "doe*", "doe^lower", True),
        ("PatientName", "doe*", "DOE^JOHN", False),
        ("PatientName", "DOE*", "DOE^JOHN", True),
        ("PatientName", "*JANE", "DOE^JANE", True),
        ("PatientName", "M*LLER*", "MÜLLER^HANS", True),
        ("PatientName", "MÜLLER^HANS", "MÜLLER^HANS", True),
        ("PatientName", "M?LLER^HANS", "MÜLLER^HANS", True),
        ("PatientName", "O'BRIEN^PAT", "O'BRIEN^PAT", True),
        # PN: trailing empty components and groups are insignificant
        ("PatientName", "DOE^JOHN", "DOE^JOHN^^", True),
        ("PatientName", "DOE^JOHN^^", "DOE^JOHN", True),
        ("PatientName", "DOE^JOHN", "DOE^JOHN^^^==", True),
        ("PatientName", "DOE^JOHN", "DOE^JOHN^A", False),
        ("PatientName", "DOE^J*", "DOE^JOHN^^", True),
        ("PatientName", "DOE", "DOE^JOHN", False),
        # PN component groups: a pattern without '=' may match one group
        ("PatientName", "DOE^JOHN", "DOE^JOHN=ドウ^ジョン", True),
        ("PatientName", "ドウ^ジョン", "DOE^JOHN=ドウ^ジョン", True),
        ("PatientName", "*JOHN", "DOE^JOHN=ドウ^ジョン", True),
        ("PatientName", "DOE^JOHN=ドウ^ジョン", "DOE^JOHN=ドウ^ジョン", True),
        ("PatientName", "DOE^JOHN=X", "DOE^JOHN=ドウ^ジョン", False),
        # lists are OR
        ("AccessionNumber", "ACC0101\\ACC0200", "ACC0200", True),
        ("AccessionNumber", "ACC0101\\ACC0200", "ACC0300", False),
        ("PatientName", "DOE^JOHN\\SMITH^ALICE", "SMITH^ALICE", True),
        ("PatientName", "X*\\*ALICE", "SMITH^ALICE", True),
        # dates: exact and ranges, inclusive
        ("StudyDate", "20230110", "20230110", True),
        ("StudyDate", "20230110", "20230111", False),
        ("StudyDate", "20230110-20230112", "20230110", True),
        ("StudyDate", "20230110-20230112", "20230112", True),
        ("StudyDate", "20230110-20230112", "20230113", False),
        ("StudyDate", "20230110-20230112", "20230109", False),
        ("StudyDate", "20230201-", "20230201", True),
        ("StudyDate", "20230201-", "20991231", True),
        ("StudyDate", "20230201-", "20230131", False),
        ("StudyDate", "-20230111", "20230111", True),
        ("StudyDate", "-20230111", "19000101", True),
        ("StudyDate", "-20230111", "20230112", False),
        ("StudyDate", "-19991231", "19991231", True),
        ("PatientBirthDate", "19610101-19621231", "19620315", True),
        ("PatientBirthDate", "19610101-19621231", "19630315", False),
        ("StudyDate", "20230110\\20230211", "20230211", True),
        ("StudyDate", "20230110\\20230211", "20230212", False),
        # old-style stored dates are read as YYYYMMDD
        ("StudyDate", "20230110", "2023-01-10", True),
        ("StudyDate", "20230101-20230131", "2023.01.10", True),
        # a range never matches an empty or malformed value
        ("StudyDate", "20230101-", "", False),
        ("StudyDate", "-20230101", "", False),
        ("StudyDate", "-20230101", "unknown", False),
        ("StudyDate", "20230101", "", False),
        # UIDs match exactly, no wildcards
        ("StudyInstanceUID", "1.2.3", "1.2.3", True),
        ("StudyInstanceUID", "1.2.3", "1.2.30", False),
        ("StudyInstanceUID", "1.2.*", "1.2.3", False),
        ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.4", True),
        ("StudyInstanceUID", "1.2.3", "1.2.3\x00", True),
        # blank pattern is universal
        ("AccessionNumber", "", "anything", True),
        ("StudyDate", "  ", "", True),
    ],
)
def test_value_matches(keyword, pattern, value, expected):
    assert value_matches(keyword, pattern, value) is expected


@pytest.mark.parametrize(
    "pattern, modalities, expected",
    [
        ("MR", ("CT", "MR"), True),
        ("MR", ("CT",), False),
        ("CT\\MR", ("MR",), True),
        ("CT\\MR", ("PT", "SR"), False),
        ("mr", ("MR",), False),  # CS is case-sensitive (Orthanc: mr -> 0 studies)
        ("M?", ("CT", "MR"), True),
        ("MR", (), False),
        ("MR", "CT\\MR", True),  # a backslash-joined string is multi-valued for VM 1-n
        ("MR", "CT", False),
    ],
)
def test_modalities_in_study_matches_if_any_modality_matches(pattern, modalities, expected):
    assert value_matches("ModalitiesInStudy", pattern, modalities) is expected


def test_unknown_keyword_is_a_caller_error():
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        value_matches("AccessionNumbr", "A", "A")


def test_normalise_pn():
    assert normalise_pn(" DOE^JOHN^^ ") == "DOE^JOHN"
    assert normalise_pn("DOE^JOHN^^^==") == "DOE^JOHN"
    assert normalise_pn("DOE^^^^=^^") == "DOE"
    assert normalise_pn("^JOHN") == "^JOHN"
    assert normalise_pn("") == ""


_text = st.text(alphabet=st.characters(blacklist_characters="\\*?=^", blacklist_categories=("Cs",)), min_size=1)


@given(_text.filter(lambda s: s.strip() == s))
def test_a_literal_matches_itself_in_every_string_vr(value):
    for keyword in ("AccessionNumber", "PatientID", "PatientName", "StudyInstanceUID"):
        assert value_matches(keyword, value, value)


@given(_text.filter(lambda s: s.strip() == s), _text.filter(lambda s: s.strip() == s))
def test_a_literal_never_matches_another_literal(a, b):
    assert value_matches("PatientID", a, b) is (a == b)


@given(st.dates().map(lambda d: d.strftime("%Y%m%d")), st.dates().map(lambda d: d.strftime("%Y%m%d")),
       st.dates().map(lambda d: d.strftime("%Y%m%d")))
def test_date_ranges_agree_with_date_comparison(low, high, value):
    assert value_matches("StudyDate", f"{low}-{high}", value) is (low <= value <= high)
    assert value_matches("StudyDate", f"{low}-", value) is (low <= value)
    assert value_matches("StudyDate", f"-{high}", value) is (value <= high)


@given(st.text(alphabet="AB", max_size=6), st.text(alphabet="AB", max_size=6))
def test_star_prefix_matches_exactly_the_values_starting_with_it(prefix, value):
    assert value_matches("PatientID", prefix + "*", value) is value.startswith(prefix)


# --------------------------------------------------------------------------------------------
# check_study

STUDY = StudyInfo(
    study_instance_uid="1.2.3",
    patient_name="DOE^JOHN",
    patient_id="PID0001",
    patient_birth_date="19610215",
    accession_number="ACC0101",
    study_date="20230111",
    study_time="101500",
    study_id="S1",
    modalities=("CT", "MR"),
    number_of_series=3,
    number_of_instances=90,
)


def test_a_study_meeting_every_criterion_is_ok():
    query = {
        "AccessionNumber": "ACC01*", "StudyDate": "20230101-20230131", "PatientID": "PID0001",
        "PatientName": "DOE^J*", "PatientBirthDate": "19610215", "ModalitiesInStudy": "MR",
        "StudyInstanceUID": "1.2.3\\9.9",
    }
    assert check_study(query, STUDY) == StudyCheck(ok=True)


def test_every_failing_key_is_named():
    check = check_study({"AccessionNumber": "ACC02*", "PatientID": "PID0001", "StudyDate": "-20221231"}, STUDY)
    assert not check.ok
    assert check.failed == ("AccessionNumber", "StudyDate")
    assert check.unverified == ()


def test_orthanc_case_insensitive_answer_is_dropped():
    lower = StudyInfo("1.2.9", patient_name="doe^lower", modalities=("CT",))
    assert check_study({"PatientName": "DOE*"}, lower).failed == ("PatientName",)


def test_dcmqrscp_ignored_modality_is_checked_on_the_series_answer():
    # dcmqrscp returns every study for ModalitiesInStudy=MR and no modalities at all.
    ct_only = StudyInfo("1.2.4", patient_id="PID0001")
    series = [SeriesInfo("1.2.4.1", modality="CT"), SeriesInfo("1.2.4.2", modality="CT")]
    assert check_study({"ModalitiesInStudy": "MR"}, ct_only, series).failed == ("ModalitiesInStudy",)
    with_mr = [*series, SeriesInfo("1.2.4.3", modality="MR")]
    assert check_study({"ModalitiesInStudy": "MR"}, ct_only, with_mr) == StudyCheck(ok=True)


def test_modalities_without_series_answer_are_unverified():
    check = check_study({"ModalitiesInStudy": "MR"}, StudyInfo("1.2.4"))
    assert check == StudyCheck(ok=True, unverified=("ModalitiesInStudy",))


def test_series_without_modality_leave_modalities_unverified():
    check = check_study({"ModalitiesInStudy": "MR"}, StudyInfo("1.2.4"), [SeriesInfo("1.2.4.1")])
    assert check.unverified == ("ModalitiesInStudy",)


def test_study_level_modalities_win_over_series():
    series = [SeriesInfo("s", modality="CT")]
    assert check_study({"ModalitiesInStudy": "MR"}, STUDY, series).ok


def test_values_the_pacs_did_not_return_are_unverified_not_failed():
    # pynetdicom's qrscp returns keys it does not index as empty.
    bare = StudyInfo("1.2.5", patient_id="PID0001")
    query = {"PatientID": "PID0001", "AccessionNumber": "ACC*", "PatientBirthDate": "19610101-"}
    check = check_study(query, bare)
    assert check.ok and check.failed == ()
    assert check.unverified == ("AccessionNumber", "PatientBirthDate")


def test_a_star_criterion_is_met_by_an_empty_value():
    assert check_study({"AccessionNumber": "*"}, StudyInfo("1.2.5")) == StudyCheck(ok=True)


def test_keys_the_study_info_does_not_hold_are_unverified():
    check = check_study({"ReferringPhysicianName": "X*"}, STUDY)
    assert check.unverified == ("ReferringPhysicianName",)


def test_failed_and_unverified_together():
    check = check_study({"PatientID": "OTHER", "ModalitiesInStudy": "MR"}, StudyInfo("1", patient_id="PID1"))
    assert (check.ok, check.failed, check.unverified) == (False, ("PatientID",), ("ModalitiesInStudy",))


# --------------------------------------------------------------------------------------------
# check_dataset_values


def test_dataset_values_all_met():
    values = {"AccessionNumber": "ACC0101", "PatientName": "DOE^JOHN^^", "Modality": "MR"}
    assert check_dataset_values({"AccessionNumber": "ACC*", "PatientName": "DOE^JOHN"}, values) == ()


def test_dataset_values_name_the_failing_keys():
    values = {"AccessionNumber": "ACC0101", "StudyDate": "20230111"}
    assert check_dataset_values({"AccessionNumber": "X*", "StudyDate": "20230111"}, values) == ("AccessionNumber",)


def test_modalities_from_instance_modality_values_any_of():
    query = {"ModalitiesInStudy": "MR"}
    assert check_dataset_values(query, {"Modality": ["CT", "MR"]}) == ()
    assert check_dataset_values(query, {"Modality": ["CT", "CT"]}) == ("ModalitiesInStudy",)
    assert check_dataset_values(query, {"ModalitiesInStudy": ("PT", "MR")}) == ()
    assert check_dataset_values(query, {"Modality": "MR"}) == ()


def test_instances_that_disagree_must_all_match_for_single_valued_keys():
    query = {"AccessionNumber": "ACC01*"}
    assert check_dataset_values(query, {"AccessionNumber": ["ACC0101", "ACC0102"]}) == ()
    assert check_dataset_values(query, {"AccessionNumber": ["ACC0101", "ACC0299"]}) == ("AccessionNumber",)


def test_a_criterion_nobody_read_fails():
    assert check_dataset_values({"PatientBirthDate": "19610215"}, {}) == ("PatientBirthDate",)
    assert check_dataset_values({"ModalitiesInStudy": "MR"}, {}) == ("ModalitiesInStudy",)
    assert check_dataset_values({"PatientBirthDate": "19610215"}, {"PatientBirthDate": []}) == ("PatientBirthDate",)


def test_blank_criteria_are_ignored_on_datasets():
    assert check_dataset_values({"AccessionNumber": ""}, {}) == ()


# --------------------------------------------------------------------------------------------
# The 0/1/N policy


def study(uid, date="20230110", time="", **kw):
    return StudyInfo(uid, study_date=date, study_time=time, **kw)


def row(line=2, relabel=None, query=None):
    return CsvRow(line=line, query=query or {"PatientID": "PID1"}, relabel=relabel or {})


SESSION = {"StudyID": "S1", "AccessionNumber": "S1"}


def test_zero_candidates_is_no_match():
    match = decide_row(row(), [], {})
    assert match.status is RowStatus.NO_MATCH
    assert match.studies == () and match.message == "no study matches"


def test_no_match_mentions_dropped_candidates():
    match = decide_row(row(), [], {}, dropped=5)
    assert match.status is RowStatus.NO_MATCH and match.dropped == 5
    assert "5 studies" in match.message and "dropped" in match.message


def test_one_candidate_is_matched():
    match = decide_row(row(relabel=SESSION), [study("1")], {})
    assert match.status is RowStatus.MATCHED
    assert [s.study_instance_uid for s in match.studies] == ["1"]
    assert match.session_suffix == {} and match.duplicate_of is None


def test_several_without_session_relabel_are_all_matched():
    match = decide_row(row(relabel={"PatientName": "SUBJ", "PatientID": "SUBJ"}), [study("2"), study("1", "20220101")], {})
    assert match.status is RowStatus.MATCHED
    assert [s.study_instance_uid for s in match.studies] == ["1", "2"]  # study date order
    assert "2 studies match; all are imported" in match.message
    assert match.session_suffix == {}


@pytest.mark.parametrize("relabel", [{"StudyID": "S"}, {"AccessionNumber": "S"}, SESSION])
def test_several_with_session_relabel_are_ambiguous(relabel):
    match = decide_row(row(relabel=relabel), [study("1"), study("2"), study("3")], {})
    assert match.status is RowStatus.AMBIGUOUS
    assert len(match.studies) == 3  # candidates listed for the user
    assert "3 studies match and the row sets the session label" in match.message
    assert "Narrow the search (e.g. add Study Date or Modality)" in match.message
    assert "suffix policy" in match.message


def test_suffix_policy_numbers_by_date_then_time_then_uid():
    candidates = [
        study("9", "20230105", "120000"),
        study("8", "20230105", "080000"),
        study("7", ""),  # no date: last
        study("5", "20220101"),
        study("4", "20230105", "080000"),  # same date and time as "8": UID decides
    ]
    match = decide_row(row(relabel=SESSION), candidates, {}, multiple_matches="suffix")
    assert match.status is RowStatus.MATCHED
    assert [s.study_instance_uid for s in match.studies] == ["5", "4", "8", "9", "7"]
    assert match.session_suffix == {"5": "_1", "4": "_2", "8": "_3", "9": "_4", "7": "_5"}
    assert "_1 to _5" in match.message


def test_suffix_policy_is_not_used_without_collision():
    match = decide_row(row(), [study("1"), study("2")], {}, multiple_matches="suffix")
    assert match.status is RowStatus.MATCHED and match.session_suffix == {}
    match = decide_row(row(relabel=SESSION), [study("1")], {}, multiple_matches="suffix")
    assert match.session_suffix == {}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="multiple_matches"):
        decide_row(row(), [], {}, multiple_matches="first")


def test_duplicate_answers_for_one_study_count_once():
    match = decide_row(row(relabel=SESSION), [study("1"), study("1")], {})
    assert match.status is RowStatus.MATCHED and len(match.studies) == 1


def test_all_claimed_is_duplicate_of_first_line():
    match = decide_row(row(line=5), [study("1"), study("2")], {"1": 3, "2": 2})
    assert match.status is RowStatus.DUPLICATE
    assert match.duplicate_of == 2
    assert "all 2 matching studies are already imported by lines 2, 3" in match.message
    assert len(match.studies) == 2


def test_one_claimed_study_is_duplicate():
    match = decide_row(row(line=4), [study("1")], {"1": 2})
    assert match.status is RowStatus.DUPLICATE and match.duplicate_of == 2
    assert match.message.startswith("the matching study is already imported by line 2")


def test_partly_claimed_decides_on_the_unclaimed_studies():
    match = decide_row(row(line=4, relabel=SESSION), [study("1"), study("2")], {"1": 2})
    assert match.status is RowStatus.MATCHED
    assert [s.study_instance_uid for s in match.studies] == ["2"]
    assert match.duplicate_of == 2
    assert "1 study more matches but is already imported by line 2" in match.message


def test_partly_claimed_can_still_be_ambiguous():
    match = decide_row(row(line=4, relabel=SESSION), [study("1"), study("2"), study("3")], {"1": 2})
    assert match.status is RowStatus.AMBIGUOUS
    assert [s.study_instance_uid for s in match.studies] == ["2", "3"]


def test_decide_row_does_not_modify_claimed():
    claimed = {}
    decide_row(row(), [study("1")], claimed)
    assert claimed == {}


def test_unverified_and_dropped_are_carried():
    match = decide_row(row(), [study("1")], {}, dropped=2, unverified=["ModalitiesInStudy"])
    assert match.dropped == 2 and match.unverified == ("ModalitiesInStudy",)
    assert "2 studies that did not meet the row's criteria" in match.message


def test_decide_rows_first_row_wins_and_later_rows_are_duplicates():
    rows = [row(2, SESSION, {"AccessionNumber": "A"}), row(3, {}, {"PatientID": "P"}), row(4, {}, {"AccessionNumber": "A"})]
    a, b = study("A", "20230101"), study("B", "20230202")
    matches = decide_rows(rows, {2: [a], 3: [a, b], 4: [a]})
    assert [m.status for m in matches] == [RowStatus.MATCHED, RowStatus.MATCHED, RowStatus.DUPLICATE]
    assert [s.study_instance_uid for s in matches[1].studies] == ["B"]
    assert matches[1].duplicate_of == 2
    assert matches[2].duplicate_of == 2


def test_decide_rows_in_line_order_whatever_the_input_order():
    a = study("A")
    matches = decide_rows([row(7), row(3)], {3: [a], 7: [a]})
    assert [(m.line, m.status) for m in matches] == [(3, RowStatus.MATCHED), (7, RowStatus.DUPLICATE)]


def test_ambiguous_rows_claim_nothing():
    a, b = study("A"), study("B")
    matches = decide_rows([row(2, SESSION), row(3, SESSION)], {2: [a, b], 3: [a]})
    assert [m.status for m in matches] == [RowStatus.AMBIGUOUS, RowStatus.MATCHED]


def test_duplicate_rows_claim_nothing_new_and_no_match_rows_pass_through():
    a = study("A")
    matches = decide_rows([row(2), row(3), row(4)], {2: [a], 3: [], 4: [a]})
    assert [m.status for m in matches] == [RowStatus.MATCHED, RowStatus.NO_MATCH, RowStatus.DUPLICATE]


def test_decide_rows_with_suffix_policy():
    matches = decide_rows([row(2, SESSION)], {2: [study("B", "20230202"), study("A", "20230101")]},
                          multiple_matches="suffix")
    assert matches[0].session_suffix == {"A": "_1", "B": "_2"}


def test_decide_rows_errors_and_dropped():
    matches = decide_rows([row(2), row(3)], {3: [study("A")]}, errors={2: "PACS 'p': timeout"}, dropped={3: 1})
    assert (matches[0].status, matches[0].message) == (RowStatus.ERROR, "PACS 'p': timeout")
    assert matches[1].dropped == 1


def test_decide_rows_refuses_a_row_without_result():
    with pytest.raises(ValueError, match="line 2"):
        decide_rows([row(2)], {})


def test_study_order_puts_undated_last():
    assert sorted([study("b", ""), study("a", "20200101")], key=study_order)[0].study_instance_uid == "a"


# --------------------------------------------------------------------------------------------
# Series filter

SERIES = (
    SeriesInfo("1", "1", "T1 MPRAGE", "MR", 176),
    SeriesInfo("2", "2", "Dose Report", "SR", 1),
    SeriesInfo("3", "3", "Patient Protocol", "CT", 1),
    SeriesInfo("4", "4", "", "OT", 1),
    SeriesInfo("5", "5", "t2 flair", "MR", 40),
)


def uids(series):
    return [s.series_instance_uid for s in series]


def test_no_rules_keep_everything():
    kept, dropped = filter_series(SERIES, SeriesFilter())
    assert uids(kept) == ["1", "2", "3", "4", "5"] and dropped == ()


def test_exclude_description_case_insensitive():
    kept, dropped = filter_series(SERIES, SeriesFilter(exclude=("*DOSE*", "patient protocol")))
    assert uids(kept) == ["1", "4", "5"] and uids(dropped) == ["2", "3"]


def test_include_description():
    kept, _ = filter_series(SERIES, SeriesFilter(include=("t1*", "T2*")))
    assert uids(kept) == ["1", "5"]


def test_include_star_keeps_series_without_description():
    kept, _ = filter_series(SERIES, SeriesFilter(include=("*",), exclude=("*report*",)))
    assert uids(kept) == ["1", "3", "4", "5"]


def test_modality_include_and_exclude():
    assert uids(filter_series(SERIES, SeriesFilter(modality_include=("mr",)))[0]) == ["1", "5"]
    assert uids(filter_series(SERIES, SeriesFilter(modality_exclude=("SR", "O?")))[0]) == ["1", "3", "5"]


def test_all_rules_combine():
    rules = SeriesFilter(include=("*",), exclude=("*flair*",), modality_include=("MR", "CT"),
                         modality_exclude=("CT",))
    kept, dropped = filter_series(SERIES, rules)
    assert uids(kept) == ["1"] and uids(dropped) == ["2", "3", "4", "5"]
