"""``dqr-xnat echo`` and ``dqr-xnat query`` against real PACS, with a config file written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dqr_xnat.cli.main import main
from dqr_xnat.sandbox.pacs_servers import RunningPacs, free_port
from dqr_xnat.sandbox.testdata import SyntheticStudy

ROOT = Path(__file__).resolve().parents[2]


def pacs_entry(host: str, port: int, ae_title: str) -> dict[str, Any]:
    return {
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "calling_ae_title": "DQRQUERY",
        "timeouts": {"acse": 5, "dimse": 15, "network": 15, "connect": 2},
        "retries": 0,
        "retry_backoff": 0,
    }


@pytest.fixture
def config_file(tmp_path: Path, orthanc: RunningPacs, dcmqrscp: RunningPacs) -> Path:
    data = {
        "xnat": {"url": "http://127.0.0.1:9", "user": "svc"},
        "pacs": {
            "orthanc": pacs_entry(orthanc.host, orthanc.port, orthanc.ae_title),
            "dcmqrscp": pacs_entry(dcmqrscp.host, dcmqrscp.port, dcmqrscp.ae_title),
            "down": pacs_entry("127.0.0.1", free_port(), "NOBODY"),  # nothing listens there
        },
        "projects": {
            "P1": {"pacs": ["orthanc", "dcmqrscp"]},
            "P2": {"pacs": ["down"]},
        },
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "dqr.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_echo_all_and_one(config_file: Path, capsys: pytest.CaptureFixture[str], orthanc: RunningPacs) -> None:
    assert main(["--config", str(config_file), "echo"]) == 1  # "down" fails
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["orthanc", "dcmqrscp", "down"]
    assert f"{orthanc.ae_title}@{orthanc.host}:{orthanc.port}  OK " in lines[0] and lines[0].endswith(" ms")
    assert " OK " in lines[1]
    assert "FAILED" in lines[2] and "cannot connect" in lines[2] and "is running" in lines[2]

    assert main(["--config", str(config_file), "echo", "--pacs", "orthanc"]) == 0
    assert capsys.readouterr().out.startswith("orthanc  ")
    assert main(["--config", str(config_file), "echo", "--pacs", "nope"]) == 2
    assert "unknown PACS 'nope'" in capsys.readouterr().err


CSV = (
    "Accession Number,Patient Name,Modality,Session\n"
    "ACC0101,,,\n"  # 2: one study
    ",DOE*,,S1\n"  # 3: DOE^JOHN x2 + DOE^JANE; ACC0101 is line 2's; two left with one session label
    "ACC0101,,,\n"  # 4: duplicate of line 2
    "ACC9999,,,\n"  # 5: nothing
    ",MÜLLER^HANS,,\n"  # 6: two studies, no session relabel: both
    ",,MR,\n"  # 7: three MR studies; MÜLLER's is line 6's already: the other two
)


def run_query(config: Path, csv: Path, *extra: str) -> int:
    return main(["--config", str(config), "query", "--project", "P1", str(csv), *extra])


def test_query_json(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], synthetic_catalog: list[SyntheticStudy]
) -> None:
    csv = tmp_path / "import.csv"
    csv.write_text(CSV, encoding="utf-8")
    assert run_query(config_file, csv, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pacs"] == "orthanc"
    rows = {r["line"]: r for r in result["rows"]}
    assert {line: r["status"] for line, r in rows.items()} == {
        2: "matched", 3: "ambiguous", 4: "duplicate", 5: "no-match", 6: "matched", 7: "matched"}  # fmt: skip
    uid = [s.study_uid for s in synthetic_catalog]
    assert rows[2]["studies"] == [{
        "StudyInstanceUID": uid[0], "AccessionNumber": "ACC0101", "StudyDate": "20230110", "StudyID": "1",
        "PatientID": "PID0001", "PatientName": "DOE^JOHN", "ModalitiesInStudy": "CT\\SR",
        "StudyDescription": "CT CHEST", "series": 3, "instances": 33}]  # fmt: skip
    assert {s["StudyInstanceUID"] for s in rows[3]["studies"]} == {uid[1], uid[2]}
    assert "line 2" in rows[3]["message"] and "dropped" in rows[3]["message"]  # doe^lower on Orthanc
    assert rows[4]["studies"][0]["StudyInstanceUID"] == uid[0] and "line 2" in rows[4]["message"]
    assert rows[5]["studies"] == []
    assert {s["PatientName"] for s in rows[6]["studies"]} == {"MÜLLER^HANS"}
    assert {s["StudyInstanceUID"] for s in rows[7]["studies"]} == {uid[1], uid[6]}
    assert "already imported by line 6" in rows[7]["message"]

    # the same file on the other PACS the project allows: it ignores Modality, we do not
    assert run_query(config_file, csv, "--json", "--pacs", "dcmqrscp") == 0
    other = json.loads(capsys.readouterr().out)
    assert other["pacs"] == "dcmqrscp"
    assert [r["status"] for r in other["rows"]] == [r["status"] for r in result["rows"]]
    mr = next(r for r in other["rows"] if r["line"] == 7)
    assert {s["StudyInstanceUID"] for s in mr["studies"]} == {uid[1], uid[6]}
    assert "dropped" in mr["message"]
    assert next(r for r in other["rows"] if r["line"] == 2)["studies"][0]["instances"] is None


def test_query_table_and_row_error(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "import.csv"
    many = "\\".join(f"A{i}" for i in range(300))
    csv.write_text(f"Accession Number\nACC0101\n{many}\n", encoding="utf-8")
    assert run_query(config_file, csv) == 1  # a row in error
    out = capsys.readouterr().out
    assert "line 2: matched: 1 study matches" in out
    assert "ACC0101" in out and "DOE^JOHN" in out
    assert "line 3: error:" in out and "300 PACS queries" in out


def test_query_usage_and_csv_errors(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("Acession Number\nACC0101\n", encoding="utf-8")
    assert run_query(config_file, csv) == 1
    err = capsys.readouterr().err
    assert "nothing was queried" in err and "Accession Number" in err
    assert run_query(config_file, csv, "--json") == 1
    assert json.loads(capsys.readouterr().out)["errors"]

    good = tmp_path / "good.csv"
    good.write_text("Accession Number\nACC0101\n", encoding="utf-8")
    assert main(["--config", str(config_file), "query", "--project", "NOPE", str(good)]) == 2
    assert "project 'NOPE' is not configured" in capsys.readouterr().err
    assert run_query(config_file, good, "--pacs", "down") == 2
    assert "may use only PACS orthanc, dcmqrscp" in capsys.readouterr().err
    # a PACS that is down: every row is an error, the command still answers
    assert main(["--config", str(config_file), "query", "--project", "P2", str(good), "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert row["status"] == "error" and "cannot connect" in row["message"]


def test_query_subprocess(config_file: Path, tmp_path: Path) -> None:
    csv = tmp_path / "import.csv"
    csv.write_text("Accession Number,Subject\nACC0401,S1\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "dqr_xnat", "--config", str(config_file), "query", "--project", "P1",
         str(csv), "--json"],
        capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["rows"]
    assert row["status"] == "matched"
    assert row["studies"][0]["PatientName"] == "MÜLLER^HANS"
    assert row["studies"][0]["StudyDescription"] == "MRT Schädel"
