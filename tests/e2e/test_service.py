"""The service as users meet it: CSVs dropped into XNAT, studies and reports back in XNAT."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import evt

from dqr_xnat.adapters import pacs as pacs_adapter
from dqr_xnat.adapters.store import JobStore
from dqr_xnat.model import JobState, StudyState
from dqr_xnat.service import Service
from tests.e2e.helpers import load, write_config
from tests.fixtures.xnat import XNAT_ADMIN, XNAT_PROJECT

REPORTS = "DQR_REPORTS"
INBOX = "DQR"

CSV = """\
Accession Number,Subject,Session
ACC0101,Subj001,Subj001_CT1
ACC0201,Subj002,Subj002_PET1
ACC0601,Subj003,Subj003_CT1
"""


def _imports(emulator) -> list:
    return [r for r in emulator.requests if r.method == "POST" and r.path.endswith("/services/import")]


def _report(emulator, name: str, project: str = XNAT_PROJECT) -> dict:
    return json.loads(emulator.read_resource_file(project, REPORTS, name).decode("utf-8"))


def _report_csv(emulator, name: str, project: str = XNAT_PROJECT) -> list[dict[str, str]]:
    text = emulator.read_resource_file(project, REPORTS, name).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_in_inbox_ends_with_report_and_studies_and_is_never_run_twice(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port))
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "2024/batch.csv", CSV.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.DONE]
    rows = _report_csv(xnat_emulator, "2024/batch.report.csv")  # same <dir>/ as the CSV
    assert [(r["line"], r["status"], r["session"]) for r in rows] == [
        ("2", "imported", "Subj001_CT1"), ("3", "imported", "Subj002_PET1"), ("4", "imported", "Subj003_CT1")]
    assert "patient_name" not in rows[0]  # identity hidden unless the admins allow it
    assert _report(xnat_emulator, "2024/batch.report.json")["job"]["state"] == "done"
    sessions = sorted(s.folder for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT))
    assert sessions == ["Subj001_CT1", "Subj002_PET1", "Subj003_CT1"]
    assert len(_imports(xnat_emulator)) == 3

    # The same file again: nothing happens. An edited file is a new job.
    with Service(config) as service:
        assert service.serve(once=True) == {}
    assert len(_imports(xnat_emulator)) == 3
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "2024/batch.csv",
                                    (CSV + "ACC0102,Subj001,Subj001_MR1\n").encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.DONE]
    rows = _report_csv(xnat_emulator, "2024/batch.report.csv")
    # Studies an earlier job landed under the same labels are skipped, not uploaded twice.
    assert [r["status"] for r in rows] == ["skipped", "skipped", "skipped", "imported"]
    assert "already imported by job" in rows[0]["reason"]
    assert len(_imports(xnat_emulator)) == 4


def test_preview_retrieves_nothing(qrscp, xnat_emulator, pacs_receiver_port, tmp_path):
    config = load(write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port))
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "preview/batch.csv", CSV.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.DONE]
    rows = _report_csv(xnat_emulator, "preview/batch.report.csv")
    assert [(r["status"], r["accession"]) for r in rows] == [
        ("matched", "ACC0101"), ("matched", "ACC0201"), ("matched", "ACC0601")]
    assert rows[0]["instances_received"] == ""
    assert not _imports(xnat_emulator)
    assert not xnat_emulator.prearchive_sessions(XNAT_PROJECT)


def test_invalid_csv_and_forbidden_pacs_are_reported_in_xnat(
    qrscp, orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    path = write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port)
    import yaml

    data = yaml.safe_load(path.read_text())
    data["pacs"]["orthanc"] = {**data["pacs"]["qrscp"], "ae_title": orthanc.ae_title, "port": orthanc.port}
    path.write_text(yaml.safe_dump(data))
    config = load(path)
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "bad.csv",
                                    b"Acession Number,Subject\nACC0101,Subj 1\n")
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "orthanc/ok.csv", CSV.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert sorted(s.value for s in results.values()) == ["failed", "failed"]
    bad = _report(xnat_emulator, "bad.report.json")
    assert "nothing was queried" in bad["job"]["message"]
    reasons = {line["line"]: (line["status"], line["reason"]) for line in bad["lines"]}
    assert reasons[1][0] == "error" and "did you mean 'Accession Number'" in reasons[1][1]
    assert reasons[2][0] == "error" and "Subj_1" in reasons[2][1]  # the nearest legal label
    forbidden = _report(xnat_emulator, "orthanc/ok.report.json")
    assert "may not use PACS 'orthanc'" in forbidden["job"]["message"]
    assert not _imports(xnat_emulator)


def test_cancel_file_cancels_the_job(qrscp, xnat_emulator, pacs_receiver_port, tmp_path):
    config = load(write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port))
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", CSV.encode())
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv.cancel", b"")
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.CANCELED]
    assert not _imports(xnat_emulator)
    report = _report(xnat_emulator, "batch.report.json")
    assert report["job"]["state"] == "canceled"


def test_two_projects_never_exceed_the_pacs_association_limit(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path, monkeypatch
):
    xnat_emulator.add_project("NEURO02", owner=XNAT_ADMIN)
    xnat_emulator.grant("NEURO02", "dqr-service", "owner")
    projects = {p: {"pacs": ["orthanc"]} for p in (XNAT_PROJECT, "NEURO02")}
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               projects=projects, pacs_extra={"max_associations": 2}))
    open_now, peak, lock = [0], [0], threading.Lock()

    def opened(event):
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])

    def closed(event):
        with lock:
            open_now[0] -= 1

    real_init = pacs_adapter.PacsClient.__init__

    def counting_init(self, config, **kwargs):
        kwargs["event_handlers"] = [(evt.EVT_ESTABLISHED, opened), (evt.EVT_RELEASED, closed),
                                    (evt.EVT_ABORTED, closed)]
        real_init(self, config, **kwargs)

    monkeypatch.setattr(pacs_adapter.PacsClient, "__init__", counting_init)
    many = "Accession Number\n" + "".join(f"ACC0{p}0{s}\n" for p in range(1, 7) for s in (1, 2))
    for project in projects:
        xnat_emulator.put_resource_file(project, INBOX, "many.csv", many.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert sorted(s.value for s in results.values()) == ["done", "done"]
    assert peak[0] == 2, peak  # used in parallel, never above the limit
    assert open_now[0] == 0


@pytest.mark.parametrize("engine", ["pynetdicom", "dcmtk"])
def test_sigkill_mid_job_then_restart_uploads_each_study_exactly_once(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path, engine
):
    """With storescp the killed service leaves it running, orphaned: the restart must clear it."""
    config_path = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, engine=engine,
                               service={"workers": 1})
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", CSV.encode())
    # The second upload hangs (and would then fail), so the service dies in the middle of it.
    xnat_emulator.inject("POST", r"/services/import", status=None, times=1, delay=0.0)
    xnat_emulator.inject("POST", r"/services/import", status=500, times=1, delay=20.0)
    command = [sys.executable, "-m", "dqr_xnat", "--config", str(config_path), "serve", "--once"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store_path = tmp_path / "state" / "jobs.sqlite3"
    deadline = time.monotonic() + 120
    while not _uploading_with_one_done(store_path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the service never reached the second upload"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with JobStore(store_path) as store:
        states = sorted(s.state.value for s in store.unfinished_studies())
    assert "uploading" in states

    xnat_emulator.clear_faults()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    report = _report(xnat_emulator, "batch.report.json")
    assert [line["status"] for line in report["lines"]] == ["imported"] * 3
    landed = [(s.folder, len(s.files)) for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT)]
    assert sorted(landed) == [("Subj001_CT1", 33), ("Subj002_PET1", 41), ("Subj003_CT1", 26)]
    completed = [r for r in _imports(xnat_emulator) if r.status == 200]
    per_session = {}
    for r in completed:
        per_session[r.query.get("session")] = per_session.get(r.query.get("session"), 0) + 1
    assert per_session == {"Subj001_CT1": 1, "Subj002_PET1": 1, "Subj003_CT1": 1}
    assert not _processes_mentioning(str(tmp_path / "state")), "a receiver of the killed service is still running"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _uploading_with_one_done(store_path: Path) -> bool:
    if not store_path.exists():
        return False
    with JobStore(store_path) as store:
        jobs = store.list_jobs()
        if not jobs:
            return False
        states = [s.state for s in store.studies(jobs[0].id)]
    return StudyState.UPLOADING in states and StudyState.DONE in states


def test_two_thousand_rows_stream_through_and_the_report_updates_while_running(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               pacs_extra={"max_associations": 4}))
    accessions = [f"ACC0{p}0{s}" for p in range(1, 7) for s in (1, 2)]
    lines = ["Accession Number"] + [accessions[i % len(accessions)] if i % 7 == 0 else f"NOPE{i:05d}"
                                    for i in range(2000)]
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "big.csv", ("\n".join(lines) + "\n").encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.DONE]
    report = _report(xnat_emulator, "big.report.json")
    statuses = [line["status"] for line in report["lines"]]
    assert len(statuses) == 2000
    existing = {"ACC0101", "ACC0102", "ACC0201", "ACC0301", "ACC0401", "ACC0501", "ACC0502", "ACC0601"}
    hits = sum(1 for value in lines[1:] if value in existing)
    assert statuses.count("imported") == 8  # the catalog studies with an accession number
    assert statuses.count("duplicate") == hits - 8  # later rows asking for the same study
    assert statuses.count("no-match") == 2000 - hits
    report_writes = [r for r in xnat_emulator.requests
                     if r.method in ("PUT", "POST") and r.path.endswith("big.report.json")]
    assert len(report_writes) >= 3, "the report must be rewritten while the job runs"


def test_project_owners_narrow_settings_in_xnat_and_see_their_mistakes(
    qrscp, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = load(write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port,
                               projects={XNAT_PROJECT: {"pacs": ["qrscp"], "max_studies": 10,
                                                        "multiple_matches": "suffix"}}))
    xnat_emulator.set_config(XNAT_PROJECT, "dqr-xnat", "settings",
                             "max_studies: 2\nmax_rows: 99999\nmultiple_matchs: ambiguous\n")
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", CSV.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert list(results.values()) == [JobState.FAILED]
    rows = _report_csv(xnat_emulator, "batch.report.csv")
    assert [r["status"] for r in rows] == ["imported", "imported", "error"]
    assert "limit of 2 studies" in rows[2]["reason"]  # the owner's narrower limit applies
    note = xnat_emulator.read_resource_file(XNAT_PROJECT, REPORTS, "settings.problems.txt").decode()
    assert "max_rows" in note and "did you mean 'multiple_matches'" in note

    xnat_emulator.set_config(XNAT_PROJECT, "dqr-xnat", "settings", "max_studies: 2\n")
    with Service(config) as service:
        service.poll()
    assert "settings.problems.txt" not in xnat_emulator.resource_files(XNAT_PROJECT, REPORTS)


def test_sigterm_stops_between_steps_and_the_job_resumes(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config_path = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               service={"workers": 1})
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", CSV.encode())
    xnat_emulator.inject("POST", r"/services/import", status=None, times=None, delay=1.5)
    command = [sys.executable, "-m", "dqr_xnat", "--config", str(config_path), "serve"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store_path = tmp_path / "state" / "jobs.sqlite3"
    deadline = time.monotonic() + 120
    while not _uploading_with_one_done(store_path):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "resume" in err
    with JobStore(store_path) as store:
        job = store.list_jobs()[0]
        assert job.state is JobState.RUNNING and not job.cancel_requested
        states = [s.state for s in store.studies(job.id)]
    assert StudyState.CANCELED not in states and StudyState.FAILED not in states
    assert states.count(StudyState.DONE) == 2  # the upload in flight finished before stopping

    xnat_emulator.clear_faults()
    rerun = subprocess.run(command + ["--once"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = _report(xnat_emulator, "batch.report.json")
    assert [line["status"] for line in report["lines"]] == ["imported"] * 3
    sessions = [r.query.get("session") for r in _imports(xnat_emulator) if r.status == 200]
    assert sorted(sessions) == ["Subj001_CT1", "Subj002_PET1", "Subj003_CT1"]


def test_availability_window_holds_jobs_and_stops_them_when_it_closes(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    from datetime import datetime

    window = {"days": ["fri"], "from": "22:00", "to": "06:00", "concurrency": 1}
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               pacs_extra={"availability": [window]}))
    friday_noon, friday_night = datetime(2026, 12, 4, 12, 0), datetime(2026, 12, 4, 23, 0)
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", CSV.encode())

    with Service(config, clock=lambda: friday_noon) as service:
        assert list(service.serve(once=True).values()) == [JobState.WAITING]
    assert "availability window (next: Fri 22:00)" in _report(xnat_emulator, "batch.report.json")["job"]["message"]
    assert not _imports(xnat_emulator)

    # Open at first; the window closes once the first study is in.
    now = [friday_night]
    with Service(config, clock=lambda: now[0]) as service:
        real_retrieve = service.pipeline.retrieve_study

        def retrieve_then_close(run, study_id):
            done = real_retrieve(run, study_id)
            now[0] = friday_noon
            return done

        service.pipeline.retrieve_study = retrieve_then_close
        assert list(service.serve(once=True).values()) == [JobState.WAITING]
    report = _report(xnat_emulator, "batch.report.json")
    assert "window closed" in report["job"]["message"]
    assert [line["status"] for line in report["lines"]].count("imported") <= 1

    with Service(config, clock=lambda: friday_night) as service:
        assert list(service.serve(once=True).values()) == [JobState.DONE]
    assert len([r for r in _imports(xnat_emulator) if r.status == 200]) == 3


def test_oversized_csv_and_too_many_rows_are_refused_with_a_clear_report(
    qrscp, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = load(write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port,
                               projects={XNAT_PROJECT: {"pacs": ["qrscp"], "max_rows": 3}},
                               service={"max_csv_mb": 0.01}))
    big = "Accession Number\n" + "NOPE0000000\n" * 2000  # ~24 KB > 10 KB
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "big.csv", big.encode())
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "rows.csv",
                                    b"Accession Number\nA1\nA2\nA3\nA4\nA5\n")
    with Service(config) as service:
        results = service.serve(once=True)
    assert sorted(s.value for s in results.values()) == ["failed", "failed"]
    big_report = _report(xnat_emulator, "big.report.json")
    assert "the limit is 0.01 MB" in big_report["job"]["message"]
    assert "Split it" in big_report["job"]["message"]
    rows_report = _report(xnat_emulator, "rows.report.json")
    assert "split" in rows_report["job"]["message"].lower() and "3" in rows_report["job"]["message"]
    assert not [r for r in xnat_emulator.requests if "services/import" in r.path]
