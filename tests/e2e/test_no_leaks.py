"""No secret and no patient name or ID leaves the service except where the admins allow it.

The service logs in with an alias token, runs a job whose CSV searches by patient name and ID, at
DEBUG level with JSON logs; then every log line, the audit log, the reports in XNAT and the
``status`` output are scanned for the token, the password, and the test patients' names and IDs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.e2e.helpers import write_config
from tests.fixtures.xnat import XNAT_PASSWORD, XNAT_PROJECT

CSV = """\
Patient Name,Patient ID,Study Date,Subject,Session
DOE^JOHN,PID0001,20230110,Subj001,Subj001_CT1
SMITH^ALICE,,,Subj006,Subj006_CT1
MÜLLER^HANS,PID0004,20240229,Subj004,Subj004_MR1
,PID0002,,,
"""

NAMES = ["DOE^JOHN", "SMITH^ALICE", "MÜLLER^HANS", "DOE^JANE", "DOE_JOHN", "SMITH_ALICE", "M_LLER_HANS",
         "DOE_JANE", "MÜLLER", "SMITH", "ALICE"]
IDS = ["PID0001", "PID0002", "PID0004", "PID0006", "19600115", "19610215"]


def _run(command, **kwargs):
    return subprocess.run([sys.executable, "-m", "dqr_xnat", *command], capture_output=True, text=True,
                          timeout=180, **kwargs)


def _scan(texts: dict[str, str], forbidden: list[str]) -> list[tuple[str, str]]:
    return [(where, word) for where, text in texts.items() for word in forbidden if word in text]


def _setup(tmp_path, orthanc, xnat_emulator, port, *, identity: bool):
    alias, secret = xnat_emulator.issue_token("dqr-service")
    path = write_config(tmp_path, orthanc, xnat_emulator, port,
                        projects={XNAT_PROJECT: {"pacs": ["orthanc"], "report_patient_identity": identity}})
    data = yaml.safe_load(path.read_text())
    (tmp_path / "token").write_text(secret)
    (tmp_path / "token").chmod(0o600)
    data["xnat"].update(user=alias, password_file=str(tmp_path / "token"))
    path.write_text(yaml.safe_dump(data))
    xnat_emulator.put_resource_file(XNAT_PROJECT, "DQR", "batch.csv", CSV.encode())
    return path, alias, secret


def test_no_secret_or_patient_identity_in_logs_audit_reports_or_status(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config, alias, secret = _setup(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, identity=False)
    serve = _run(["--config", str(config), "--log-level", "DEBUG", "--log-json", "serve", "--once"])
    assert serve.returncode == 0, serve.stderr[-3000:]
    status = _run(["--config", str(config), "status", "--json", "--all"])
    assert status.returncode == 0
    report_csv = xnat_emulator.read_resource_file(XNAT_PROJECT, "DQR_REPORTS", "batch.report.csv").decode()
    report_json = xnat_emulator.read_resource_file(XNAT_PROJECT, "DQR_REPORTS", "batch.report.json").decode()
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    texts = {"logs": serve.stderr + serve.stdout, "status": status.stdout, "audit": audit,
             "report.csv": report_csv, "report.json": report_json}

    # The job really ran: studies imported, events audited, logs written at DEBUG.
    statuses = [line["status"] for line in json.loads(report_json)["lines"]]
    assert statuses.count("imported") == 4, report_json  # row 5 (PID0002) imports DOE^JANE's study
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert {"job_started", "query", "study_retrieved", "study_uploaded", "job_finished"} <= set(events)
    assert len(serve.stderr.splitlines()) > 10

    assert _scan(texts, [secret, XNAT_PASSWORD]) == []
    assert _scan(texts, NAMES + IDS) == []
    assert alias not in texts["audit"] + texts["report.csv"] + texts["status"]


def test_names_appear_in_reports_only_when_the_project_allows_it(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config, _alias, secret = _setup(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, identity=True)
    serve = _run(["--config", str(config), "serve", "--once"])
    assert serve.returncode == 0, serve.stderr[-3000:]
    report_csv = xnat_emulator.read_resource_file(XNAT_PROJECT, "DQR_REPORTS", "batch.report.csv").decode()
    assert "DOE^JOHN" in report_csv and "PID0001" in report_csv and "DOE_JANE" in report_csv
    assert secret not in report_csv and secret not in serve.stderr
