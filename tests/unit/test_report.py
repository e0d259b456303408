"""The per-row report: CSV safe for spreadsheets, JSON twin, identity only when allowed."""

import csv
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqr_xnat.logs import phi_hash
from dqr_xnat.model import RowMatch, RowStatus, StudyInfo
from dqr_xnat.stages.report import ReportLine, columns, lines_for_match, render_csv, render_json, safe_cell

LINE = ReportLine(
    line=2,
    status="done",
    reason="uploaded to the prearchive",
    study_date="20230111",
    modalities="CT\\MR",
    accession="ACC0101",
    series_expected=3,
    instances_expected=90,
    instances_received=90,
    instances_uploaded=90,
    project="P1",
    subject="Subj001",
    session="Subj001_MR1",
    prearchive_url="/data/prearchive/projects/P1/20240101_120000123/Subj001_MR1",
    study_uid_hash="0123456789ab",
    patient_name="MÜLLER^HANS",
    patient_id="PID0001",
)


def parse(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_without_identity_has_no_patient_columns():
    text = render_csv([LINE], show_identity=False)
    assert "MÜLLER" not in text and "PID0001" not in text
    (row,) = parse(text)
    assert "patient_name" not in row and "patient_id" not in row
    assert row["line"] == "2" and row["session"] == "Subj001_MR1"
    assert row["instances_expected"] == "90" and row["modalities"] == "CT\\MR"


def test_csv_with_identity_shows_them_last():
    text = render_csv([LINE], show_identity=True)
    header = text.splitlines()[0].split(",")
    assert header[-2:] == ["patient_name", "patient_id"]
    (row,) = parse(text)
    assert (row["patient_name"], row["patient_id"]) == ("MÜLLER^HANS", "PID0001")


def test_columns():
    assert columns(show_identity=False)[:3] == ("line", "status", "reason")
    assert len(columns(show_identity=True)) == len(columns(show_identity=False)) + 2


def test_csv_uses_crlf_and_quotes_commas():
    text = render_csv([ReportLine(line=3, status="error", reason='bad, "quoted" value')], show_identity=False)
    assert text.count("\r\n") == 2 and text.endswith("\r\n")
    assert parse(text)[0]["reason"] == 'bad, "quoted" value'


def test_unknown_counts_are_empty_cells():
    (row,) = parse(render_csv([ReportLine(line=4, status="no-match")], show_identity=False))
    assert row["instances_expected"] == "" and row["series_expected"] == ""


@pytest.mark.parametrize(
    "value, cell",
    [
        ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("@SUM(1+1)", "'@SUM(1+1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("\n=1", "'\n=1"),
        ("-abc", "'-abc"),  # a legal XNAT label, but text starting with '-' is still defused
        # plain numbers are data, not formulas: left alone
        ("-19991231", "-19991231"),
        ("-5", "-5"),
        ("+49", "+49"),
        ("-1.5", "-1.5"),
        # harmless text untouched
        ("DOE^JOHN", "DOE^JOHN"),
        ("a=b", "a=b"),
        ("", ""),
        (None, ""),
        (90, "90"),
    ],
)
def test_formula_injection_is_defused(value, cell):
    assert safe_cell(value) == cell


def test_hostile_values_reach_the_csv_defused():
    hostile = ReportLine(line=5, status="matched", accession="=1+1", subject="@x", patient_name="+A")
    (row,) = parse(render_csv([hostile], show_identity=True))
    assert (row["accession"], row["subject"], row["patient_name"]) == ("'=1+1", "'@x", "'+A")


@given(st.text())
def test_no_csv_cell_ever_starts_a_formula(text):
    cell = safe_cell(text)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n")) or cell.lstrip("+-").replace(".", "", 1).isdigit()


def test_json_twin_keeps_values_and_hides_identity():
    doc = json.loads(render_json({"job": "j1", "file": "batch.csv"}, [LINE], show_identity=False))
    assert doc["job"] == {"job": "j1", "file": "batch.csv"}
    (line,) = doc["lines"]
    assert "patient_name" not in line and "patient_id" not in line
    assert line["instances_uploaded"] == 90 and line["line"] == 2


def test_json_with_identity_and_raw_values():
    hostile = ReportLine(line=5, status="matched", accession="=1+1", patient_name="MÜLLER^HANS")
    text = render_json({}, [hostile], show_identity=True)
    assert "MÜLLER^HANS" in text  # UTF-8, not escaped
    (line,) = json.loads(text)["lines"]
    assert line["accession"] == "=1+1"  # JSON is for programs: unchanged
    assert line["patient_name"] == "MÜLLER^HANS" and line["instances_expected"] is None


def test_lines_for_match_one_per_study():
    studies = (
        StudyInfo("1.2.3", patient_name="DOE^JOHN", patient_id="PID1", accession_number="A1",
                  study_date="20230101", modalities=("CT", "MR"), number_of_series=3, number_of_instances=90),
        StudyInfo("1.2.4", study_date="20230202"),
    )
    match = RowMatch(line=7, status=RowStatus.AMBIGUOUS, message="2 studies match ...", studies=studies)
    lines = lines_for_match(match, project="P1")
    assert [l.study_uid_hash for l in lines] == [phi_hash("1.2.3"), phi_hash("1.2.4")]
    first = lines[0]
    assert (first.line, first.status, first.reason, first.project) == (7, "ambiguous", "2 studies match ...", "P1")
    assert (first.modalities, first.accession, first.series_expected, first.instances_expected) == ("CT\\MR", "A1", 3, 90)
    assert (first.patient_name, first.patient_id) == ("DOE^JOHN", "PID1")
    assert "1.2.3" not in render_csv(lines, show_identity=True)


def test_lines_for_match_without_studies():
    (line,) = lines_for_match(RowMatch(line=3, status=RowStatus.NO_MATCH, message="no study matches"))
    assert (line.line, line.status, line.reason, line.study_uid_hash) == (3, "no-match", "no study matches", "")
