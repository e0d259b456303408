"""Property tests: parse_csv answers every input, and every line it names exists in the file."""

from __future__ import annotations

import csv
import io
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqr_xnat.model import ParsedCsv
from dqr_xnat.stages.csv_parse import COLUMNS, parse_csv

SETTINGS = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
KNOWN_HEADERS = [c.name for c in COLUMNS]


def physical_lines(data: bytes) -> int:
    """Lines as a text editor counts them: \\r\\n, \\r and \\n each end one."""
    parts = re.split(rb"\r\n|\r|\n", data)
    return len(parts) - (1 if parts[-1] == b"" else 0)


def check_invariants(data: bytes, parsed: ParsedCsv) -> None:
    lines = physical_lines(data)
    for error in parsed.errors:
        assert error.line is None or 1 <= error.line <= lines, (error, lines)
        assert "internal error" not in error.message, error
        assert error.message
    row_lines = [row.line for row in parsed.rows]
    assert all(1 <= line <= lines for line in row_lines)
    assert row_lines == sorted(set(row_lines))
    assert not set(row_lines) & {e.line for e in parsed.errors}  # rows listed have no error
    assert parsed.valid == (not parsed.errors)
    assert parsed.encoding in ("utf-8", "windows-1252", "unknown")
    parsed.to_json()  # always serialisable


@SETTINGS
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(data: bytes) -> None:
    check_invariants(data, parse_csv(data))


@SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_after_a_valid_header(tail: bytes) -> None:
    data = b"Accession Number,Study Date,Subject,Session,Relabel Patient Name\r\n" + tail
    check_invariants(data, parse_csv(data))


# ------------------------------------------------------------------------------------------
# Mixes of valid and invalid cells

VALID = {
    "Accession Number": ["25175352", "ACC*", "A1\\A2", "?12"],
    "Study Date": ["20210131", "20210101-20210131", "20210101-", "-19991231"],
    "Patient ID": ["PID0042", "P*", "PID1\\PID2"],
    "Patient Name": ["DOE^JOHN", "DOE^J*", "MÜLLER^JÖRG", "A^B\\C^D"],
    "Last Name": ["DOE", "D*"],
    "First Name": ["JOHN", "J?HN"],
    "DOB": ["19700101", "19500101-19591231"],
    "Modality": ["MR", "MR\\CT", "PT"],
    "Study Instance UID": ["1.2.840.10008.1", "1.2.3\\1.2.4"],
    "Subject": ["Subj001", "S-1_a"],
    "Session": ["Subj001_MR1", "E" * 16],
    "Relabel Patient ID": ["ANON1", '""'],
    "Relabel Accession Number": ["ACC1", '""'],
    "Relabel Study ID": ["SID1", '""'],
    "Relabel Patient Name": ["ANON^ONE", '""'],
    "Relabel Study Date": ["20200101", '""'],
    "Relabel Patient Birth Date": ["19700101", '""'],
}
INVALID = [
    "2021-01-31", "1/31/2021", "44227", "2.02101E+07", "20210231", "20210131-20210101", "-",
    "2021*", "a\\\\b", "x\ny", "Subj 001", "mr", "1.02", "A\tB", '""', "é" * 70, "\\",
]  # fmt: skip
SEARCH = [c.name for c in COLUMNS if c.search]


@st.composite
def headers(draw: st.DrawFn, *, valid: bool) -> list[str]:
    names = draw(st.lists(st.sampled_from(KNOWN_HEADERS), min_size=1, max_size=8, unique=True))
    if valid:
        if "Patient Name" in names:
            names = [n for n in names if n not in ("Last Name", "First Name")]
        if not any(n in SEARCH for n in names):
            names.append(draw(st.sampled_from(SEARCH)))
        return names
    extra = st.sampled_from(["Acession Number", "", "Subjekt", "DOB", "Notes"]) | st.text(max_size=12)
    return names + draw(st.lists(extra, max_size=3))


def cell(draw: st.DrawFn, header: str, *, valid: bool) -> str:
    pool = VALID.get(header, ["x"])
    if valid:
        return draw(st.sampled_from(["", *pool]))
    return draw(st.sampled_from(["", *pool, *INVALID]) | st.text(max_size=20))


def encode(draw: st.DrawFn, rows: list[list[str]], *, valid: bool) -> bytes:
    out = io.StringIO()
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    writer = csv.writer(out, lineterminator=ending)
    for row in rows:
        if draw(st.booleans()) and draw(st.booleans()):
            out.write(ending)  # a blank line
        writer.writerow(row)
    text = out.getvalue()
    choices = ["utf-8", "utf-8-sig"]
    if not valid:
        choices.append("cp1252")
    encoding = draw(st.sampled_from(choices))
    return text.encode(encoding, errors="replace")


@st.composite
def csv_files(draw: st.DrawFn, *, valid: bool) -> tuple[bytes, int]:
    header = draw(headers(valid=valid))
    count = draw(st.integers(min_value=1, max_value=12))
    rows = []
    for _ in range(count):
        row = [cell(draw, h, valid=valid) for h in header]
        if valid and not any(row[i] for i, h in enumerate(header) if h in SEARCH):
            first_search = next(i for i, h in enumerate(header) if h in SEARCH)
            row[first_search] = VALID[header[first_search]][0]
        if not valid and draw(st.booleans()):
            row += draw(st.lists(st.sampled_from(["", "x", " "]), max_size=2))
        rows.append(row)
    return encode(draw, [header, *rows], valid=valid), count


@SETTINGS
@given(csv_files(valid=False))
def test_mixed_valid_and_invalid_cells(file: tuple[bytes, int]) -> None:
    data, _ = file
    check_invariants(data, parse_csv(data))


@SETTINGS
@given(csv_files(valid=True))
def test_files_of_valid_cells_are_valid(file: tuple[bytes, int]) -> None:
    data, count = file
    parsed = parse_csv(data)
    check_invariants(data, parsed)
    assert parsed.valid, parsed.errors
    assert len(parsed.rows) == count
    assert all(row.query for row in parsed.rows)
