"""``dqr-xnat check-csv``: exit codes, human report, the --json contract, and a real subprocess run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dqr_xnat.cli.main import main

EXAMPLE = "Accession Number,Subject,Session\n25175352,Subj001,Subj001_MR1\n"
WITH_ERRORS = (
    "Accession Number,Study Date,Subject,Session\n"
    "25175352,,Subj001,Subj001_MR1\n"
    "A2,2021-01-31,Subj002,Subj002_MR1\n"
)
EXPECTED_ROW = {
    "line": 2,
    "query": {"AccessionNumber": "25175352"},
    "relabel": {
        "PatientName": "Subj001",
        "PatientID": "Subj001",
        "StudyID": "Subj001_MR1",
        "AccessionNumber": "Subj001_MR1",
    },
}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() installs a root handler on the captured stderr; put the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """check-csv must work without any configuration file."""
    monkeypatch.setenv("DQR_XNAT_CONFIG", str(tmp_path / "does-not-exist.yaml"))


def write(tmp_path: Path, text: str, name: str = "batch.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def test_valid_file_exits_0_with_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-csv", write(tmp_path, EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "LINE" in out and "QUERY" in out and "RELABEL" in out
    assert "AccessionNumber=25175352" in out and "StudyID=Subj001_MR1" in out
    assert "valid; 1 valid row" in out
    assert err == ""


def test_file_with_errors_exits_1_and_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-csv", write(tmp_path, WITH_ERRORS)]) == 1
    out, _ = capsys.readouterr()
    assert (
        "line 3, column \"Study Date\": '2021-01-31' is not a date in YYYYMMDD form; write 20210131"
        in out
    )
    assert "INVALID: 1 error; 1 valid row" in out


def test_file_level_errors_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-csv", write(tmp_path, "")]) == 1
    assert "file: the file is empty" in capsys.readouterr().out


def test_json_is_exactly_one_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, WITH_ERRORS)
    assert main(["check-csv", path, "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "file": path,
        "valid": False,
        "encoding": "utf-8",
        "errors": [
            {
                "line": 3,
                "column": "Study Date",
                "message": "'2021-01-31' is not a date in YYYYMMDD form; write 20210131",
            }
        ],
        "rows": [EXPECTED_ROW],
    }
    assert out.count("\n") == 1 and err == ""


def test_json_of_a_valid_windows_1252_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("Patient Name\r\nMÜLLER^*\r\n".encode("cp1252"))
    assert main(["check-csv", "--json", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True and result["encoding"] == "windows-1252"
    assert result["rows"] == [{"line": 2, "query": {"PatientName": "MÜLLER^*"}, "relabel": {}}]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], json_flag: list[str]
) -> None:
    missing = str(tmp_path / "nope.csv")
    assert main(["check-csv", missing, *json_flag]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"cannot read {missing}" in err and "No such file" in err


def test_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-csv", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_no_file_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-csv"])
    assert exc.value.code == 2
    assert "FILE" in capsys.readouterr().err


def _script() -> Path:
    return Path(sys.executable).parent / "dqr-xnat"


def test_subprocess_json(tmp_path: Path) -> None:
    path = write(tmp_path, WITH_ERRORS)
    env = {**os.environ, "DQR_XNAT_CONFIG": str(tmp_path / "none.yaml")}
    proc = subprocess.run(
        [str(_script()), "check-csv", path, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    assert result["valid"] is False
    assert result["rows"] == [EXPECTED_ROW]
    assert [(e["line"], e["column"]) for e in result["errors"]] == [(3, "Study Date")]


def test_subprocess_usage_error_and_ascii_terminal(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run(
        [str(_script()), "check-csv", str(tmp_path / "missing.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "cannot read" in proc.stderr
    # a patient name that an ASCII terminal cannot show still gets a report, not a traceback
    path = write(tmp_path, "Patient Name\nMÜLLER^*\n")
    proc = subprocess.run(
        [str(_script()), "check-csv", path],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "M\\xdcLLER^*" in proc.stdout
