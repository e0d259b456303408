"""The operator commands as a user runs them: import, status, cancel, serve --once, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dqr_xnat.adapters.store import JobStore
from dqr_xnat.cli.main import main
from dqr_xnat.model import JobMode
from tests.e2e.helpers import write_config
from tests.fixtures.xnat import XNAT_PASSWORD, XNAT_PROJECT

CSV = "Accession Number,Subject,Session\nACC0601,Subj003,Subj003_CT1\nNOPE,Subj004,Subj004_X\n"


def test_import_command_prints_summary_writes_report_and_sets_exit_code(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path, capsys
):
    config = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text(CSV)
    code = main(["--config", str(config), "import", "--project", XNAT_PROJECT, str(csv_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "imported" in out and "no-match" in out and "done" in out
    report = json.loads((tmp_path / "batch.report.json").read_text())
    assert [line["status"] for line in report["lines"]] == ["imported", "no-match"]
    assert XNAT_PASSWORD not in out

    # A PACS the project may not use: exit 1, with a message that says what is allowed.
    bad = tmp_path / "bad.csv"
    bad.write_text("Accession Number\nACC0101\n")
    code = main(["--config", str(config), "import", "--project", XNAT_PROJECT, "--pacs", "nope", str(bad)])
    assert code == 1
    assert "may not use PACS 'nope'" in capsys.readouterr().err


def test_status_and_cancel(orthanc, xnat_emulator, pacs_receiver_port, tmp_path, capsys):
    config = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    with JobStore(tmp_path / "state" / "jobs.sqlite3") as store:
        job = store.create_job(project=XNAT_PROJECT, resource="DQR", path="a.csv", digest="x",
                               mode=JobMode.IMPORT, pacs=orthanc.kind)
    assert main(["--config", str(config), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in status["jobs"]] == [job.id]
    assert status["jobs"][0]["state"] == "pending"
    assert main(["--config", str(config), "cancel", job.id[:4]]) == 0
    assert "cancel requested" in capsys.readouterr().out
    assert main(["--config", str(config), "status", "--all"]) == 0
    assert "canceled" in capsys.readouterr().out


def test_serve_once_as_a_subprocess(orthanc, xnat_emulator, pacs_receiver_port, tmp_path):
    config = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    xnat_emulator.put_resource_file(XNAT_PROJECT, "DQR", "batch.csv", CSV.encode())
    run = subprocess.run([sys.executable, "-m", "dqr_xnat", "--config", str(config), "serve", "--once"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert list(json.loads(run.stdout).values()) == ["done"]
    assert xnat_emulator.read_resource_file(XNAT_PROJECT, "DQR_REPORTS", "batch.report.csv")


def test_demo_runs_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dqr_xnat", "demo", "--workdir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DQR_REPORTS/batch.report.csv" in run.stdout
    assert "DEMO/Subj001/Subj001_CT1  READY  33 files" in run.stdout
    assert "demo: job ended done" in run.stdout
