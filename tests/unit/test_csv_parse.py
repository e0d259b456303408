"""Every rule of docs/csv-language.md, checked on parse_csv (pure: bytes in, ParsedCsv out)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from dqr_xnat.model import QUERY_KEYWORDS, RELABEL_KEYWORDS, CsvProblem, ParsedCsv
from dqr_xnat.stages.csv_parse import parse_csv

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


def parse(text: str, **kwargs: object) -> ParsedCsv:
    return parse_csv(text.encode("utf-8"), "t.csv", **kwargs)  # type: ignore[arg-type]


def table(*rows: list[str]) -> str:
    """CSV text with proper quoting, so tests state values, not escaping."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def the_error(parsed: ParsedCsv) -> CsvProblem:
    assert len(parsed.errors) == 1, parsed.errors
    return parsed.errors[0]


def search_cell(header: str, value: str) -> ParsedCsv:
    return parse(table([header], [value]))


def relabel_cell(header: str, value: str) -> ParsedCsv:
    return parse(table(["Accession Number", header], ["A1", value]))


def only_row_query(parsed: ParsedCsv) -> dict[str, str]:
    assert parsed.valid, parsed.errors
    (row,) = parsed.rows
    return dict(row.query)


def only_row_relabel(parsed: ParsedCsv) -> dict[str, str]:
    assert parsed.valid, parsed.errors
    (row,) = parsed.rows
    return dict(row.relabel)


# ------------------------------------------------------------------------------------------
# The examples of csv-language.md


def test_example_accession_subject_session() -> None:
    parsed = parse("Accession Number,Subject,Session\n25175352,Subj001,Subj001_MR1\n")
    assert parsed.to_json() == {
        "file": "t.csv",
        "valid": True,
        "encoding": "utf-8",
        "errors": [],
        "rows": [
            {
                "line": 2,
                "query": {"AccessionNumber": "25175352"},
                "relabel": {
                    "PatientName": "Subj001",
                    "PatientID": "Subj001",
                    "StudyID": "Subj001_MR1",
                    "AccessionNumber": "Subj001_MR1",
                },
            }
        ],
    }
    assert parsed.rows[0].subject == "Subj001"
    assert parsed.rows[0].session == "Subj001_MR1"


def test_example_modality_date() -> None:
    parsed = parse("Modality,Study Date,Subject,Session\nMR,20171128,Subj001,Subj001_MR1\n")
    assert [r.to_json() for r in parsed.rows] == [
        {
            "line": 2,
            "query": {"StudyDate": "20171128", "ModalitiesInStudy": "MR"},
            "relabel": {
                "PatientName": "Subj001",
                "PatientID": "Subj001",
                "StudyID": "Subj001_MR1",
                "AccessionNumber": "Subj001_MR1",
            },
        }
    ]
    assert parsed.valid


def test_example_date_range_and_name() -> None:
    parsed = parse("Study Date,Patient Name\n20210101-20210131,DOE^J*\n-19991231,\n")
    assert parsed.valid
    assert [r.to_json() for r in parsed.rows] == [
        {"line": 2, "query": {"StudyDate": "20210101-20210131", "PatientName": "DOE^J*"}, "relabel": {}},
        {"line": 3, "query": {"StudyDate": "-19991231"}, "relabel": {}},
    ]


@pytest.mark.parametrize(
    "name", ["accession-subject-session.csv", "modality-date.csv", "date-range-name.csv", "mixed.csv"]
)
def test_bundled_examples_are_valid(name: str) -> None:
    parsed = parse_csv((EXAMPLES / name).read_bytes(), name)
    assert parsed.valid, parsed.errors
    assert parsed.rows


def test_bundled_error_example_lists_every_error() -> None:
    parsed = parse_csv((EXAMPLES / "with-errors.csv").read_bytes(), "with-errors.csv")
    assert not parsed.rows
    assert [(e.line, e.column) for e in parsed.errors] == [
        (2, "Study Date"),
        (2, "Subject"),
        (3, "Study Date"),
        (3, "Modality"),
        (3, "Session"),
        (4, None),
        (5, None),
        (5, "Study Date"),
    ]


# ------------------------------------------------------------------------------------------
# File: encodings, line ends, line numbers


def test_utf8_bom_is_ignored() -> None:
    parsed = parse_csv(b"\xef\xbb\xbfAccession Number\nA1\n")
    assert parsed.valid and parsed.encoding == "utf-8"
    assert parsed.header == ("Accession Number",)
    assert dict(parsed.rows[0].query) == {"AccessionNumber": "A1"}


def test_utf8_non_ascii_name() -> None:
    parsed = parse("Patient Name\nMÜLLER^JÖRG\n")
    assert parsed.encoding == "utf-8"
    assert only_row_query(parsed) == {"PatientName": "MÜLLER^JÖRG"}


def test_windows_1252_is_read_and_reported() -> None:
    data = "Patient Name,Subject\nMÜLLER^JÖRG,S1\n".encode("cp1252")
    parsed = parse_csv(data)
    assert parsed.encoding == "windows-1252"
    assert only_row_query(parsed) == {"PatientName": "MÜLLER^JÖRG"}


def test_bytes_neither_utf8_nor_windows_1252_name_their_line() -> None:
    parsed = parse_csv(b"Accession Number\nA1\nA\x81\n")
    error = the_error(parsed)
    assert (error.line, error.column) == (3, None)
    assert "neither UTF-8 nor Windows-1252" in error.message and "0x81" in error.message
    assert parsed.encoding == "unknown" and not parsed.rows


def test_utf16_is_rejected_clearly() -> None:
    parsed = parse_csv("Accession Number\nA1\n".encode("utf-16"))
    assert "UTF-16" in the_error(parsed).message
    assert not parsed.valid


def test_bom_followed_by_invalid_utf8_is_rejected() -> None:
    parsed = parse_csv(b"\xef\xbb\xbfAccession Number\r\nA\xe9\r\n")
    error = the_error(parsed)
    assert error.line == 2 and "byte-order mark" in error.message


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_line_ends(end: str) -> None:
    text = end.join(["Accession Number,Study Date", "A1,20210101", "", "A2,2021-01-01", ""])
    parsed = parse(text)
    assert [r.line for r in parsed.rows] == [2]
    assert [(e.line, e.column) for e in parsed.errors] == [(4, "Study Date")]


def test_blank_lines_before_header_count() -> None:
    parsed = parse("\n  \n,,\nAccession Number\nA1\n\nA2\n")
    assert parsed.valid
    assert [r.line for r in parsed.rows] == [5, 7]


def test_blank_rows_are_skipped_silently() -> None:
    parsed = parse("Accession Number,Subject\nA1,S1\n,\n , \n\nA2,S2\n")
    assert parsed.valid
    assert [r.line for r in parsed.rows] == [2, 6]


def test_quoted_multiline_cell_keeps_physical_line_numbers() -> None:
    text = 'Accession Number,Relabel Patient Name\nA1,"DOE\nJOHN"\nA2,\n"A\n3\n",x\nA4,\n'
    parsed = parse(text)
    # the row starting on line 2 spans 2 lines; the row on line 5 spans 3 lines
    assert [r.line for r in parsed.rows] == [4, 8]
    assert [(e.line, e.column) for e in parsed.errors] == [
        (2, "Relabel Patient Name"),
        (5, "Accession Number"),
    ]
    assert "line break" in parsed.errors[0].message


def test_quoted_commas_and_quotes_in_values() -> None:
    parsed = parse('Patient Name,Subject\n"DOE, JOHN^*",S1\n')
    assert only_row_query(parsed) == {"PatientName": "DOE, JOHN^*"}


def test_unclosed_quote_is_reported_on_its_line() -> None:
    parsed = parse('Accession Number\nA1\n"A2\nA3\n')
    error = the_error(parsed)
    assert error.line == 3 and "unclosed quote" in error.message


def test_empty_file() -> None:
    for data in (b"", b"\n\n", b"\xef\xbb\xbf", b" , \r\n"):
        error = the_error(parse_csv(data))
        assert error.line is None and "empty" in error.message


def test_header_without_rows() -> None:
    error = the_error(parse("Accession Number,Subject\n\n,\n"))
    assert error.line is None and "no rows" in error.message


def test_oversized_cell_is_an_error_not_an_exception() -> None:
    parsed = parse("Accession Number\nA1\n\"" + "x" * 200_000 + '"\nA3\n')
    assert not parsed.valid
    assert any(e.line == 3 and "cannot be read as CSV" in e.message for e in parsed.errors)


# ------------------------------------------------------------------------------------------
# Header


def test_header_whitespace_and_case_are_ignored() -> None:
    parsed = parse("  accession NUMBER ,STUDY date\nA1,20210101\n")
    assert only_row_query(parsed) == {"AccessionNumber": "A1", "StudyDate": "20210101"}
    assert parsed.header == ("accession NUMBER", "STUDY date")


def test_errors_name_the_header_as_written() -> None:
    error = the_error(parse("  study DATE \n2021-01-31\n"))
    assert (error.line, error.column) == (2, "study DATE")
    assert str(error) == (
        "line 2, column \"study DATE\": '2021-01-31' is not a date in YYYYMMDD form; write 20210131"
    )


def test_unknown_header_suggests_the_closest() -> None:
    parsed = parse("Acession Number,Subject\nA1,S1\n")
    errors = [e for e in parsed.errors if "unknown" in e.message]
    assert [(e.line, e.column, e.message) for e in errors] == [
        (1, None, "unknown column 'Acession Number'; did you mean 'Accession Number'?")
    ]


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("PatientID", "Patient ID"),
        ("patient_name", "Patient Name"),
        ("Birth Date", "DOB"),
        ("StudyInstanceUID", "Study Instance UID"),
        ("Subjct", "Subject"),
        ("Relabel Patient Nme", "Relabel Patient Name"),
        ("Acc", "Accession Number"),
    ],
)
def test_unknown_header_suggestions(written: str, meant: str) -> None:
    parsed = parse(f"Accession Number,{written}\nA1,x\n")
    assert f"did you mean '{meant}'?" in the_error(parsed).message
    assert not parsed.valid


def test_unknown_header_without_close_match_lists_known_columns() -> None:
    message = the_error(parse("Accession Number,Xyzzy\nA1,\n")).message
    assert "unknown column 'Xyzzy'; known columns are: Accession Number, Study Date" in message


def test_relabel_typo_never_drops_the_relabel_silently() -> None:
    parsed = parse("Accession Number,Relabel Patient Nam\nA1,ANON\n")
    assert not parsed.valid


def test_semicolon_separated_file_gets_a_hint() -> None:
    parsed = parse("Accession Number;Subject\nA1;S1\n")
    assert "';'" in parsed.errors[0].message and "commas" in parsed.errors[0].message


def test_duplicate_header() -> None:
    error = the_error(parse("Accession Number,accession number\nA1,A2\n"))
    assert (error.line, error.column) == (1, None)
    assert "appears twice" in error.message


def test_at_least_one_search_header() -> None:
    parsed = parse("Subject,Session\nS1,E1\nS2,E2\n")
    error = the_error(parsed)  # one header error, no per-row noise
    assert error.line == 1 and "no search column" in error.message
    assert not parsed.rows


def test_patient_name_not_with_last_first_name() -> None:
    error = the_error(parse("Patient Name,Last Name\nDOE^J,DOE\n"))
    assert error.line == 1 and "not both" in error.message


def test_empty_header_cell_is_fine_when_its_column_is_blank() -> None:
    parsed = parse("Accession Number,,Subject,\nA1,,S1,\nA2, ,S2\n")
    assert parsed.valid
    assert [r.line for r in parsed.rows] == [2, 3]


def test_value_under_an_empty_header_cell_is_an_error() -> None:
    error = the_error(parse("Accession Number,,Subject\nA1,oops,S1\n"))
    assert (error.line, error.column) == (2, None)
    assert "cell 2" in error.message and "no column header" in error.message


def test_header_may_follow_leading_blank_lines_and_errors_use_its_line() -> None:
    parsed = parse("\n\nAcession Number\nA1\n")
    assert {e.line for e in parsed.errors} == {3}


# ------------------------------------------------------------------------------------------
# Ragged rows


def test_extra_non_empty_cells_are_an_error_on_that_line() -> None:
    parsed = parse("Accession Number,Subject\nA1,S1\nA2,S2,x,,y\nA3,S3\n")
    error = the_error(parsed)
    assert (error.line, error.column) == (3, None)
    assert "cells 3, 5" in error.message
    assert [r.line for r in parsed.rows] == [2, 4]


def test_extra_empty_cells_are_fine() -> None:
    assert parse("Accession Number,Subject\nA1,S1,,, \n").valid


def test_missing_trailing_cells_are_blank() -> None:
    parsed = parse("Accession Number,Study Date,Subject,Session\nA1\n")
    assert parsed.valid
    assert dict(parsed.rows[0].query) == {"AccessionNumber": "A1"}
    assert dict(parsed.rows[0].relabel) == {}


# ------------------------------------------------------------------------------------------
# Search cells


def test_all_search_cells_and_and_blank_adds_nothing() -> None:
    header = [
        "Accession Number", "Study Date", "Patient ID", "Patient Name", "DOB", "Modality",
        "Study Instance UID",
    ]  # fmt: skip
    parsed = parse(
        table(header, ["A1", "20210101", "P1", "DOE^J", "19700101", "MR", "1.2.3"], ["A2"])
    )
    assert parsed.valid
    assert dict(parsed.rows[0].query) == {
        "AccessionNumber": "A1",
        "StudyDate": "20210101",
        "PatientID": "P1",
        "PatientName": "DOE^J",
        "PatientBirthDate": "19700101",
        "ModalitiesInStudy": "MR",
        "StudyInstanceUID": "1.2.3",
    }
    assert list(parsed.rows[0].query) == list(QUERY_KEYWORDS)
    assert dict(parsed.rows[1].query) == {"AccessionNumber": "A2"}


def test_relabel_without_search_is_no_search_criteria() -> None:
    parsed = parse("Accession Number,Subject,Session\n,S1,E1\nA2,S2,E2\n")
    error = the_error(parsed)
    assert (error.line, error.column) == (2, None)
    assert error.message.startswith("no search criteria")
    assert [r.line for r in parsed.rows] == [3]


def test_values_are_trimmed() -> None:
    parsed = parse(table(["Accession Number", "Subject"], ["  A1 \t", " S1 "]))
    assert only_row_query(parsed) == {"AccessionNumber": "A1"}
    assert parsed.rows[0].subject == "S1"


@pytest.mark.parametrize("header", ["Accession Number", "Patient ID", "Patient Name"])
@pytest.mark.parametrize("value", ["AB*", "A?C", "*B*", "*"])
def test_wildcards_in_string_values(header: str, value: str) -> None:
    parsed = search_cell(header, value)
    assert list(only_row_query(parsed).values()) == [value]


@pytest.mark.parametrize("header", ["Accession Number", "Patient ID", "Patient Name", "Modality"])
def test_backslash_lists(header: str) -> None:
    assert list(only_row_query(search_cell(header, "MR\\CT")).values()) == ["MR\\CT"]
    assert list(only_row_query(search_cell(header, " MR \\ CT ")).values()) == ["MR\\CT"]
    for value in ("MR\\\\CT", "MR\\", "\\CT"):
        assert "empty value" in the_error(search_cell(header, value)).message


@pytest.mark.parametrize("header", ["Accession Number", "Patient ID", "Patient Name", "Study Date"])
def test_empty_marker_is_not_a_search_value(header: str) -> None:
    error = the_error(search_cell(header, '""'))
    assert error.column == header and "leave the cell blank" in error.message


@pytest.mark.parametrize(
    ("header", "limit"), [("Accession Number", 16), ("Patient ID", 64), ("Patient Name", 64)]
)
def test_value_length_limits(header: str, limit: int) -> None:
    assert search_cell(header, "A" * limit).valid
    error = the_error(search_cell(header, "A" * (limit + 1)))
    assert f"at most {limit}" in error.message
    # the limit applies to each value of a list
    assert search_cell(header, "A" * limit + "\\" + "B" * limit).valid


def test_person_name_structure_limits() -> None:
    assert search_cell("Patient Name", "A^B^C^D^E").valid
    assert "5" in the_error(search_cell("Patient Name", "A^B^C^D^E^F")).message
    assert search_cell("Patient Name", "A=B=C").valid
    assert "3" in the_error(search_cell("Patient Name", "A=B=C=D")).message
    assert search_cell("Patient Name", "A" * 64 + "=" + "B" * 64).valid


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("A\tB", "U+0009"),
        ("A\u200bB", "U+200B"),
        ("A\x00B", "U+0000"),
        ("A\x85B", "U+0085"),
        ("A\nB", "line break"),
    ],
)
@pytest.mark.parametrize("header", ["Accession Number", "Patient ID", "Patient Name", "Study Date"])
def test_control_characters_are_rejected(header: str, value: str, words: str) -> None:
    error = the_error(search_cell(header, value))
    assert words in error.message


@pytest.mark.parametrize("header", ["Accession Number", "Patient ID", "Study Instance UID"])
def test_numbers_excel_reformatted_are_rejected(header: str) -> None:
    assert "Excel" in the_error(search_cell(header, "2.51753E+07")).message


# Dates ---------------------------------------------------------------------------------------

DATE_HEADERS = ["Study Date", "DOB"]


@pytest.mark.parametrize("header", DATE_HEADERS)
@pytest.mark.parametrize("value", ["20210131", "20200229", "20210101-20210131", "20210101-", "-20210131", "20210101-20210101"])
def test_valid_dates_and_ranges(header: str, value: str) -> None:
    assert list(only_row_query(search_cell(header, value)).values()) == [value]


@pytest.mark.parametrize("header", DATE_HEADERS)
@pytest.mark.parametrize("value", ["20210229", "20211301", "20210132", "00000101", "20210100"])
def test_dates_must_be_real_calendar_dates(header: str, value: str) -> None:
    error = the_error(search_cell(header, value))
    assert "not a real calendar date" in error.message and error.column == header
    error = the_error(search_cell(header, f"20200101-{value}"))
    assert "not a real calendar date" in error.message


@pytest.mark.parametrize("header", DATE_HEADERS)
def test_range_must_not_end_before_it_starts(header: str) -> None:
    error = the_error(search_cell(header, "20210131-20210101"))
    assert "ends before it starts; write 20210101-20210131" in error.message


def test_dash_alone_is_not_a_range() -> None:
    assert "not a range" in the_error(search_cell("Study Date", "-")).message


@pytest.mark.parametrize("header", DATE_HEADERS)
def test_wildcards_in_dates_are_errors(header: str) -> None:
    assert "write 20210101-20211231" in the_error(search_cell(header, "2021*")).message
    assert "write 20200201-20200229" in the_error(search_cell(header, "202002*")).message
    assert "wildcards" in the_error(search_cell(header, "2021013?")).message


@pytest.mark.parametrize("header", DATE_HEADERS)
def test_backslash_lists_in_dates_are_errors(header: str) -> None:
    assert "list of dates" in the_error(search_cell(header, "20210101\\20210102")).message


@pytest.mark.parametrize("header", DATE_HEADERS)
@pytest.mark.parametrize(
    ("value", "fixed"),
    [
        ("2021-01-31", "20210131"),
        ("2021/01/31", "20210131"),
        ("1/31/2021", "20210131"),
        ("31/1/2021", "20210131"),
        ("31.01.2021", "20210131"),
        ("31-01-2021", "20210131"),
        ("2021-01-31 00:00:00", "20210131"),
        ("1/31/2021 12:00:00 AM", "20210131"),
        ("20210131.0", "20210131"),
        ("2.0210131E+07", "20210131"),
        ("31 Jan 2021", "20210131"),
        ("Jan 31, 2021", "20210131"),
    ],
)
def test_other_date_spellings_show_the_yyyymmdd_form(header: str, value: str, fixed: str) -> None:
    error = the_error(search_cell(header, value))
    assert error.message == f"'{value}' is not a date in YYYYMMDD form; write {fixed}"


def test_excel_serial_date_is_shown_as_yyyymmdd() -> None:
    message = the_error(search_cell("DOB", "44227")).message
    assert "Excel" in message and message.endswith("write 20210131")


def test_ambiguous_slash_date_shows_both_readings() -> None:
    message = the_error(search_cell("Study Date", "1/2/2021")).message
    assert "20210102 if it is month/day/year" in message
    assert "20210201 if it is day/month/year" in message


def test_excel_scientific_date_without_digits_says_so() -> None:
    message = the_error(search_cell("Study Date", "2.02101E+07")).message
    assert "Excel" in message and "format the column as text" in message


@pytest.mark.parametrize(
    ("value", "fixed"),
    [
        ("20210101 - 20210131", "20210101-20210131"),
        ("2021-01-01 - 2021-01-31", "20210101-20210131"),
        ("2021-01-01 to 2021-01-31", "20210101-20210131"),
        ("01.01.2021 – 31.01.2021", "20210101-20210131"),
    ],
)
def test_other_range_spellings_show_the_dicom_form(value: str, fixed: str) -> None:
    assert the_error(search_cell("Study Date", value)).message.endswith(f"write {fixed}")


def test_unreadable_date_explains_the_form() -> None:
    message = the_error(search_cell("Study Date", "last tuesday")).message
    assert "YYYYMMDD" in message and "20210101-20210131" in message


# Modality, UID, Last/First Name -------------------------------------------------------------


def test_modality_codes() -> None:
    assert only_row_query(search_cell("Modality", "MR")) == {"ModalitiesInStudy": "MR"}
    assert only_row_query(search_cell("Modality", "OT_2")) == {"ModalitiesInStudy": "OT_2"}


@pytest.mark.parametrize(
    ("value", "fixed"), [("mr", "MR"), ("mr\\Ct", "MR\\CT"), ("MRI", "MR"), ("PET\\CT", "PT\\CT")]
)
def test_modality_shows_the_code_to_write(value: str, fixed: str) -> None:
    assert the_error(search_cell("Modality", value)).message.endswith(f"write {fixed}")


@pytest.mark.parametrize("value", ["M*", "M?", "M R", "MR-1", "A" * 17])
def test_modality_rejects_non_codes(value: str) -> None:
    assert the_error(search_cell("Modality", value)).column == "Modality"


def test_study_instance_uid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    assert only_row_query(search_cell("Study Instance UID", uid)) == {"StudyInstanceUID": uid}
    assert search_cell("Study Instance UID", f"{uid}\\1.2.0.3").valid
    assert search_cell("Study Instance UID", "1." + "2" * 62).valid


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("1.2.3*", "wildcards"),
        ("1.2.03", "leading zero (03)"),
        ("1.0.02", "leading zero (02)"),
        ("1.2.a", "only digits and dots"),
        ("1..2", "empty component"),
        ("1.2.", "empty component"),
        ("1." + "2" * 63, "at most 64"),
        ("1.2\\1.02", "leading zero"),
    ],
)
def test_study_instance_uid_errors(value: str, words: str) -> None:
    assert words in the_error(search_cell("Study Instance UID", value)).message


def test_last_and_first_name_combine_into_patient_name() -> None:
    text = table(["Last Name", "First Name"], ["DOE", "JOHN"], ["DOE*", ""], ["", "J?HN"])
    parsed = parse(text)
    assert parsed.valid
    assert [r.query["PatientName"] for r in parsed.rows] == ["DOE^JOHN", "DOE*^*", "*^J?HN"]


def test_last_name_alone() -> None:
    assert only_row_query(search_cell("Last Name", "DOE")) == {"PatientName": "DOE^*"}
    assert only_row_query(search_cell("First Name", "JOHN")) == {"PatientName": "*^JOHN"}


@pytest.mark.parametrize("value", ["DOE\\SMITH", "DOE^JOHN", "DOE=X"])
def test_name_parts_reject_lists_and_full_names(value: str) -> None:
    assert "Patient Name" in the_error(search_cell("Last Name", value)).message


def test_combined_name_must_fit_a_person_name() -> None:
    parsed = parse(table(["Last Name", "First Name"], ["D" * 40, "J" * 40]))
    assert the_error(parsed).column == "Last Name"


# ------------------------------------------------------------------------------------------
# Relabel cells


def test_subject_and_session_write_their_elements() -> None:
    parsed = parse(table(["Accession Number", "Subject", "Session"], ["A1", "Subj-1", "Sess_1"]))
    assert only_row_relabel(parsed) == {
        "PatientName": "Subj-1",
        "PatientID": "Subj-1",
        "StudyID": "Sess_1",
        "AccessionNumber": "Sess_1",
    }
    assert (parsed.rows[0].subject, parsed.rows[0].session) == ("Subj-1", "Sess_1")
    assert parsed.rows[0].relabels_session


def test_relabel_columns_override_subject_and_session() -> None:
    header = [
        "Accession Number", "Subject", "Session", "Relabel Patient ID", "Relabel Accession Number",
        "Relabel Study ID", "Relabel Patient Name", "Relabel Study Date", "Relabel Patient Birth Date",
    ]  # fmt: skip
    row = ["A1", "S1", "E1", "PID9", "ACC9", "SID9", "ANON^X", "20200101", "19700101"]
    relabel = only_row_relabel(parse(table(header, row)))
    assert relabel == {
        "PatientName": "ANON^X",
        "PatientID": "PID9",
        "StudyID": "SID9",
        "AccessionNumber": "ACC9",
        "StudyDate": "20200101",
        "PatientBirthDate": "19700101",
    }
    assert list(relabel) == list(RELABEL_KEYWORDS)


def test_blank_relabel_cell_changes_nothing() -> None:
    parsed = parse("Accession Number,Subject,Relabel Study Date\nA1,,\nA2,S2, \n")
    assert [dict(r.relabel) for r in parsed.rows] == [{}, {"PatientName": "S2", "PatientID": "S2"}]
    assert parsed.rows[0].subject is None and not parsed.rows[0].relabels_session


@pytest.mark.parametrize(
    ("header", "keyword"),
    [
        ("Relabel Patient ID", "PatientID"),
        ("Relabel Accession Number", "AccessionNumber"),
        ("Relabel Study ID", "StudyID"),
        ("Relabel Patient Name", "PatientName"),
        ("Relabel Study Date", "StudyDate"),
        ("Relabel Patient Birth Date", "PatientBirthDate"),
    ],
)
def test_doubled_quotes_empty_the_attribute(header: str, keyword: str) -> None:
    # the raw file holds """""" (a quoted cell whose value is two double quotes)
    parsed = parse(f'Accession Number,{header}\nA1,""""""\nA2,""\n')
    assert parsed.valid
    assert [dict(r.relabel) for r in parsed.rows] == [{keyword: ""}, {}]


def test_empty_marker_overrides_subject() -> None:
    parsed = parse('Accession Number,Subject,Relabel Patient Name\nA1,S1,""""""\n')
    assert only_row_relabel(parsed) == {"PatientName": "", "PatientID": "S1"}


@pytest.mark.parametrize("header", ["Subject", "Session"])
def test_subject_and_session_cannot_be_emptied(header: str) -> None:
    error = the_error(parse(f'Accession Number,{header}\nA1,""""""\n'))
    assert error.column == header and "cannot be emptied" in error.message


@pytest.mark.parametrize("header", ["Subject", "Session"])
@pytest.mark.parametrize(
    ("value", "legal"),
    [
        ("Subj 001", "Subj_001"),
        ("DOE^JOHN", "DOE_JOHN"),
        ("Müller.1", "M_ller_1"),
        ("a" * 70, "a" * 64),
    ],
)
def test_labels_must_be_legal_and_errors_show_the_nearest(header: str, value: str, legal: str) -> None:
    error = the_error(relabel_cell(header, value))
    assert error.column == header
    assert "not a legal XNAT label" in error.message and error.message.endswith(f"write {legal}")


def test_subject_may_have_64_characters() -> None:
    assert relabel_cell("Subject", "S" * 64).valid


def test_session_longer_than_16_is_an_error_explaining_the_dicom_limit() -> None:
    assert relabel_cell("Session", "S" * 16).valid
    error = the_error(relabel_cell("Session", "S" * 17))
    assert error.column == "Session" and "16 (VR SH)" in error.message


def test_long_session_is_fine_when_both_elements_are_overridden() -> None:
    header = ["Accession Number", "Session", "Relabel Study ID", "Relabel Accession Number"]
    long_label = "Subj001_baseline_MR_session"
    parsed = parse(table(header, ["A1", long_label, "SID1", '""']))
    assert only_row_relabel(parsed) == {"StudyID": "SID1", "AccessionNumber": ""}
    assert parsed.rows[0].session == long_label
    # overriding only one of the two is not enough
    parsed = parse(table(header[:3], ["A1", long_label, "SID1"]))
    assert the_error(parsed).column == "Session"


@pytest.mark.parametrize(
    ("header", "limit"),
    [("Relabel Patient ID", 64), ("Relabel Accession Number", 16), ("Relabel Study ID", 16)],
)
def test_relabel_values_respect_dicom_limits(header: str, limit: int) -> None:
    assert relabel_cell(header, "X" * limit).valid
    assert f"at most {limit}" in the_error(relabel_cell(header, "X" * (limit + 1))).message
    assert "one value" in the_error(relabel_cell(header, "X\\Y")).message
    assert "U+0009" in the_error(relabel_cell(header, "X\tY")).message


def test_relabel_patient_name_respects_person_name_limits() -> None:
    assert relabel_cell("Relabel Patient Name", "ANON^" + "X" * 59).valid
    assert "at most 64" in the_error(relabel_cell("Relabel Patient Name", "X" * 65)).message
    assert "one value" in the_error(relabel_cell("Relabel Patient Name", "A\\B")).message


@pytest.mark.parametrize("header", ["Relabel Study Date", "Relabel Patient Birth Date"])
def test_relabel_dates_are_one_real_date(header: str) -> None:
    assert only_row_relabel(relabel_cell(header, "20200229")) != {}
    assert "range" in the_error(relabel_cell(header, "20200101-20200131")).message
    assert "range" in the_error(relabel_cell(header, "20200101-")).message
    assert "not a real calendar date" in the_error(relabel_cell(header, "20210229")).message
    assert the_error(relabel_cell(header, "2021-01-31")).message.endswith("write 20210131")
    assert "one date" in the_error(relabel_cell(header, "2021*")).message


# ------------------------------------------------------------------------------------------
# One pass, all errors; max_rows


def test_every_error_in_one_pass_with_line_and_column() -> None:
    text = (
        "Accession Number,Study Date,Modality,Subject,Session\n"
        "A1,2021-01-31,mr,Subj 1,E1\n"
        "A2,20210101,MR,S2,E2\n"
        "\n"
        f"{'A' * 17},,,S4,E4\n"
        ",,,S5,\n"
    )
    parsed = parse(text)
    assert [(e.line, e.column) for e in parsed.errors] == [
        (2, "Study Date"),
        (2, "Modality"),
        (2, "Subject"),
        (5, "Accession Number"),
        (6, None),
    ]
    assert [r.line for r in parsed.rows] == [3]


def test_header_errors_do_not_hide_row_errors() -> None:
    parsed = parse("Accession Number,Acession Number\nA1,x\n,\nA" + "1" * 20 + ",\n")
    assert [(e.line, e.column) for e in parsed.errors] == [(1, None), (4, "Accession Number")]


def test_max_rows() -> None:
    text = "Accession Number\n" + "".join(f"A{i}\n" for i in range(5))
    assert parse(text, max_rows=5).valid
    parsed = parse(text, max_rows=4)
    error = the_error(parsed)
    assert error.line is None
    assert "5 rows" in error.message and "at most 4" in error.message and "split" in error.message
    assert len(parsed.rows) == 4
