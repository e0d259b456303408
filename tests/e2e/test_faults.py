"""The fault matrix (issue 6, README "Fault matrix"): every fault injected against a real PACS and
the XNAT emulator, and every one ending in a reported final state.

Each test asserts (a) the job's and the study's final state, (b) the report line: its status and a
reason that says what to do, and (c) that nothing was uploaded twice (successful POSTs to
``/data/services/import`` per session label) and nothing was left in ``Unassigned``.

PACS that a test kills, restarts or misconfigures are private (``make_pacs``); the shared session
servers are only used as they are. Timeouts, retries and backoffs are short so the file stays fast.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import yaml
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dqr_xnat.adapters.store import JobStore
from dqr_xnat.config import Config, load_config
from dqr_xnat.errors import XnatAuthError
from dqr_xnat.model import JobState, StudyState
from dqr_xnat.pipeline import Pipeline
from dqr_xnat.reporting import render_report
from dqr_xnat.sandbox.pacs_servers import HOST, RunningPacs, free_port, nodelay
from dqr_xnat.sandbox.testdata import bench_catalog, write_studies
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from dqr_xnat.service import Service
from tests.e2e.helpers import write_config
from tests.fixtures.pacs import PACS_RECEIVER_AE
from tests.fixtures.xnat import XNAT_PROJECT, XNAT_USER

INBOX, REPORTS = "DQR", "DQR_REPORTS"
IMPORT_PATH = r"/services/import"
#: Short everything: one PACS-level retry, two tries per study, quick backoff.
FAST_PACS = {"retries": 1, "retry_backoff": 0.1,
             "timeouts": {"acse": 5, "dimse": 10, "network": 10, "connect": 2}}
FAST_SERVICE = {"study_attempts": 2, "workers": 1}
ONE_ROW = "Accession Number,Subject,Session\nACC0101,Subj001,Subj001_CT1\n"
THREE_ROWS = ONE_ROW + "ACC0201,Subj002,Subj002_PET1\nACC0601,Subj003,Subj003_CT1\n"
BIG_INSTANCES = 300


# ------------------------------------------------------------------------------------------
# helpers


def _config(tmp_path: Path, pacs: RunningPacs, emulator: XnatEmulator, receiver_port: int, *,
            xnat_timeout: float = 20, pacs_extra: dict[str, Any] | None = None,
            service: dict[str, Any] | None = None) -> Config:
    path = write_config(tmp_path, pacs, emulator, receiver_port,
                        pacs_extra={**FAST_PACS, **(pacs_extra or {})},
                        service={**FAST_SERVICE, **(service or {})})
    data = yaml.safe_load(path.read_text())
    data["xnat"]["timeout"] = xnat_timeout
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def _serve(config: Config, emulator: XnatEmulator, csv_text: str, name: str = "batch.csv") -> JobState:
    """Drop the CSV into the inbox and run the service once; the job's final state."""
    emulator.put_resource_file(XNAT_PROJECT, INBOX, name, csv_text.encode())
    with Service(config) as service:
        results = service.serve(once=True)
    assert len(results) == 1, results
    return next(iter(results.values()))


def _report(emulator: XnatEmulator, name: str = "batch.report.json") -> dict[str, Any]:
    return json.loads(emulator.read_resource_file(XNAT_PROJECT, REPORTS, name).decode("utf-8"))


def _line(report: dict[str, Any], line: int = 2) -> dict[str, Any]:
    found = [entry for entry in report["lines"] if entry["line"] == line]
    assert len(found) == 1, report["lines"]
    return found[0]


def _imports(emulator: XnatEmulator) -> list[Any]:
    return [r for r in emulator.requests if r.method == "POST" and r.path.endswith("/services/import")]


def _assert_clean(emulator: XnatEmulator) -> Counter[str]:
    """No session uploaded twice, nothing in Unassigned; the successful uploads per session label."""
    done = Counter(r.query.get("session", "") for r in _imports(emulator) if r.status == 200)
    assert all(n == 1 for n in done.values()), f"uploaded more than once: {done}"
    assert emulator.prearchive_sessions("Unassigned") == []
    return done


def _landed(emulator: XnatEmulator) -> dict[str, int]:
    return {s.folder: len(s.files) for s in emulator.prearchive_sessions(XNAT_PROJECT)}


def _study_files(files: list[Path], index: int) -> list[Path]:
    """The synthetic files of catalog study ``index`` (write_studies puts them under studyNN/)."""
    return [f for f in files if f.parent.parent.name == f"study{index:02d}"]


class _Watcher:
    """Run ``action`` once, in a thread, as soon as ``condition`` holds (polled)."""

    def __init__(self, condition: Callable[[], bool], action: Callable[[], None],
                 timeout: float = 60) -> None:
        self.error: BaseException | None = None
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(condition, action, timeout), daemon=True)
        self._thread.start()

    def _run(self, condition: Callable[[], bool], action: Callable[[], None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                if time.monotonic() > deadline:
                    raise TimeoutError("the watched condition never came true")
                time.sleep(0.01)
            action()
            self.fired.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by check()
            self.error = exc

    def check(self) -> None:
        self._thread.join(30)
        if self.error is not None:
            raise self.error
        assert self.fired.is_set()


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One study of 300 small instances (accession BACC0000): long enough to be hit mid-transfer."""
    return write_studies(bench_catalog(studies=1, series=1, instances=BIG_INSTANCES),
                         tmp_path_factory.mktemp("big"))


BIG_ROW = "Accession Number,Subject,Session\nBACC0000,Big001,Big001_CT1\n"


# ------------------------------------------------------------------------------------------
# PACS faults


def test_pacs_down_at_start_row_errors_after_retries(make_pacs, xnat_emulator, pacs_receiver_port, tmp_path):
    pacs = make_pacs("dcmqrscp", load=False)
    pacs.kill()  # configured, but nothing listens any more
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "error"
    assert f"cannot connect to {pacs.ae_title}@{HOST}:{pacs.port}" in line["reason"]
    assert "check that the PACS is running, its host and port" in line["reason"]
    assert "gave up after 2 attempts" in line["reason"]
    assert not _imports(xnat_emulator) and not _landed(xnat_emulator)
    _assert_clean(xnat_emulator)


@pytest.mark.parametrize("comes_back", [True, False], ids=["restarted", "stays-down"])
def test_pacs_dies_mid_move(comes_back, make_pacs, big_study, xnat_emulator, pacs_receiver_port, tmp_path):
    pacs = make_pacs("dcmqrscp", load=big_study)
    # Backoff long enough for the restart to happen between two tries.
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port, pacs_extra={"retry_backoff": 1.0})
    staging = tmp_path / "state" / "staging"

    def arriving() -> bool:
        return len(list(staging.glob("*/*/raw/*.dcm"))) >= 30

    def crash() -> None:
        pacs.kill()
        if comes_back:
            pacs.restart()

    watcher = _Watcher(arriving, crash)
    state = _serve(config, xnat_emulator, BIG_ROW)
    watcher.check()
    line = _line(_report(xnat_emulator))
    if comes_back:
        assert state is JobState.DONE
        assert line["status"] == "imported"
        assert line["instances_uploaded"] == BIG_INSTANCES
        assert _landed(xnat_emulator) == {"Big001_CT1": BIG_INSTANCES}
        assert _assert_clean(xnat_emulator) == {"Big001_CT1": 1}
    else:
        assert state is JobState.FAILED
        assert line["status"] == "failed"
        assert "cannot connect to" in line["reason"] and "check that the PACS is running" in line["reason"]
        assert "failed 2 times" in line["reason"]
        assert not _imports(xnat_emulator) and not _landed(xnat_emulator)
        _assert_clean(xnat_emulator)
    assert not list(staging.glob("*/*")), "the staging directory of a finished study must be freed"


def test_association_rejected(make_pacs, xnat_emulator, pacs_receiver_port, tmp_path):
    # No known peers at all (Orthanc would also accept the AE titles it may move to).
    pacs = make_pacs("orthanc", load=False, allowed_peers=[], destinations={})
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "error"
    assert "rejected the association" in line["reason"]
    assert f"lists our calling AE title '{PACS_RECEIVER_AE}'" in line["reason"]
    assert not _imports(xnat_emulator)
    _assert_clean(xnat_emulator)


def test_move_destination_unreachable_gives_failed_suboperations(
    make_pacs, synthetic_files, xnat_emulator, pacs_receiver_port, tmp_path
):
    # The PACS knows our AE title but at a port where nothing listens: dcmqrscp fails every
    # sub-operation (0xA702, failed=N).
    pacs = make_pacs("dcmqrscp", load=_study_files(synthetic_files, 0),
                     destinations={PACS_RECEIVER_AE: (HOST, free_port())})
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "C-MOVE failed with 0xA702" in line["reason"] and "0 of 33 instance(s) arrived" in line["reason"]
    assert f"could not connect to our receiver, AE '{PACS_RECEIVER_AE}'" in line["reason"]
    assert f"port {pacs_receiver_port}" in line["reason"]  # where the PACS must send instead
    assert "failed 2 times" in line["reason"]
    assert not _imports(xnat_emulator) and not _landed(xnat_emulator)
    _assert_clean(xnat_emulator)


def test_move_with_some_failed_suboperations(make_pacs, synthetic_files, xnat_emulator, pacs_receiver_port,
                                             tmp_path):
    # Two files lost from the PACS's storage while its index still lists them: dcmqrscp sends
    # the others and ends with 0xB000 (completed=31, failed=2).
    pacs = make_pacs("dcmqrscp", load=_study_files(synthetic_files, 0))
    stored = sorted((pacs.workdir / "db").glob("IMG*.dcm"))
    stored[3].unlink()
    stored[7].unlink()
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "C-MOVE status 0xB000" in line["reason"] and "failed=2" in line["reason"]
    assert "31 of 33 instance(s) arrived" in line["reason"]
    assert not _imports(xnat_emulator) and not _landed(xnat_emulator)  # never a partial study
    _assert_clean(xnat_emulator)


def test_move_success_with_instances_missing(make_pacs, synthetic_files, xnat_emulator, pacs_receiver_port,
                                             tmp_path, monkeypatch):
    pacs = make_pacs("orthanc", load=_study_files(synthetic_files, 0))
    assert pacs.http_url is not None
    real_retrieve = Pipeline.retrieve_study
    deleted: list[str] = []

    def delete_after_query(self: Pipeline, run: Any, study_id: int) -> bool:
        # Between the C-FIND (which announced 33 instances) and the C-MOVE, three instances
        # vanish from the PACS; Orthanc then moves the other 30 and reports success.
        if not deleted:
            record = self.store.get_study(study_id)
            found = requests.post(f"{pacs.http_url}/tools/lookup", data=record.study_uid, timeout=10).json()
            instances = requests.get(f"{pacs.http_url}/studies/{found[0]['ID']}/instances", timeout=10).json()
            for instance in instances[:3]:
                requests.delete(f"{pacs.http_url}/instances/{instance['ID']}", timeout=10).raise_for_status()
                deleted.append(instance["ID"])
        return real_retrieve(self, run, study_id)

    monkeypatch.setattr(Pipeline, "retrieve_study", delete_after_query)
    config = _config(tmp_path, pacs, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    assert len(deleted) == 3
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "C-MOVE status 0x0000" in line["reason"]
    assert "30 of 33 instance(s) arrived" in line["reason"]
    assert line["instances_expected"] == 33
    assert "failed 2 times" in line["reason"]
    assert not _imports(xnat_emulator) and not _landed(xnat_emulator)
    _assert_clean(xnat_emulator)


def _store_as(ae_title: str, port: int, path: Path) -> tuple[bool, int | None]:
    """C-STORE one file to our receiver as ``ae_title``: (association accepted, status)."""
    ds = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(HOST, port, ae_title=PACS_RECEIVER_AE, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        return False, None
    try:
        status = assoc.send_c_store(path)
        return True, int(status.Status) if status else None
    finally:
        assoc.release()


def test_unsolicited_c_store_is_refused_and_the_job_is_unaffected(
    orthanc, synthetic_files, xnat_emulator, pacs_receiver_port, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="dqr_xnat")
    real_retrieve = Pipeline.retrieve_study
    answers: list[tuple[bool, int | None]] = []

    def intrude(self: Pipeline, run: Any, study_id: int) -> bool:
        if not answers:  # while the job runs: a stranger, then a known AE title with another study
            ours, other = _study_files(synthetic_files, 0)[0], _study_files(synthetic_files, 8)[0]
            answers.append(_store_as("INTRUDER", pacs_receiver_port, ours))
            answers.append(_store_as(orthanc.ae_title, pacs_receiver_port, other))
        return real_retrieve(self, run, study_id)

    monkeypatch.setattr(Pipeline, "retrieve_study", intrude)
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", ONE_ROW.encode())
    with Service(config) as service:
        results = service.serve(once=True)
        receiver = service.receiver
        assert receiver is not None
        assert receiver.rejected_associations == 1
        assert receiver.refused_unexpected == 1
    assert answers == [(False, None), (True, 0x0124)]  # association rejected; Refused: Not Authorised
    assert list(results.values()) == [JobState.DONE]
    line = _line(_report(xnat_emulator))
    assert line["status"] == "imported" and line["instances_uploaded"] == 33
    assert _landed(xnat_emulator) == {"Subj001_CT1": 33}  # nothing of the stranger's
    assert _assert_clean(xnat_emulator) == {"Subj001_CT1": 1}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused an association from AE 'INTRUDER'" in logged
    assert "not a study being retrieved" in logged


# ------------------------------------------------------------------------------------------
# XNAT faults


def test_xnat_session_expires_mid_job_and_the_client_logs_in_again(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    # The second upload waits a moment, so the sessions expire after the first and before it.
    xnat_emulator.inject("POST", IMPORT_PATH, status=None, times=1)
    xnat_emulator.inject("POST", IMPORT_PATH, status=None, times=1, delay=1.0)
    watcher = _Watcher(lambda: any(r.status == 200 for r in _imports(xnat_emulator)),
                       xnat_emulator.expire_sessions)
    assert _serve(config, xnat_emulator, THREE_ROWS) is JobState.DONE
    watcher.check()
    assert any(r.status == 401 for r in xnat_emulator.requests), "the session never expired"
    assert [line["status"] for line in _report(xnat_emulator)["lines"]] == ["imported"] * 3
    assert _landed(xnat_emulator) == {"Subj001_CT1": 33, "Subj002_PET1": 41, "Subj003_CT1": 26}
    assert _assert_clean(xnat_emulator) == {"Subj001_CT1": 1, "Subj002_PET1": 1, "Subj003_CT1": 1}


def test_xnat_403_on_import_fails_at_once(orthanc, xnat_emulator, pacs_receiver_port, tmp_path):
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    xnat_emulator.inject("POST", IMPORT_PATH, status=403, times=None)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "HTTP 403" in line["reason"]
    assert f"a project owner must give it member or owner access to '{XNAT_PROJECT}'" in line["reason"]
    assert len(_imports(xnat_emulator)) == 1  # a refusal is not retried
    assert not _landed(xnat_emulator)
    _assert_clean(xnat_emulator)


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_xnat_500_on_import(times, orthanc, xnat_emulator, pacs_receiver_port, tmp_path):
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    xnat_emulator.inject("POST", IMPORT_PATH, status=500, times=times)
    state = _serve(config, xnat_emulator, ONE_ROW)
    line = _line(_report(xnat_emulator))
    if times == 1:  # retried, then done
        assert state is JobState.DONE and line["status"] == "imported"
        assert [r.status for r in _imports(xnat_emulator)] == [500, 200]
        assert _landed(xnat_emulator) == {"Subj001_CT1": 33}
        assert _assert_clean(xnat_emulator) == {"Subj001_CT1": 1}
    else:  # failed after the configured attempts, saying so
        assert state is JobState.FAILED and line["status"] == "failed"
        assert "HTTP 500" in line["reason"]
        assert "failed 2 times" in line["reason"]
        assert [r.status for r in _imports(xnat_emulator)] == [500, 500]
        assert not _landed(xnat_emulator)
        _assert_clean(xnat_emulator)


def test_xnat_timeout_on_import_that_landed_anyway_is_not_sent_again(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    # XNAT stores the study, but answers only after the client gave up (xnat.timeout 2 s): the
    # retry must find it in the prearchive instead of uploading it a second time.
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, xnat_timeout=2,
                     pacs_extra={"retry_backoff": 3.0})
    xnat_emulator.inject("POST", IMPORT_PATH, status=None, times=1, delay=3.5)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.DONE
    line = _line(_report(xnat_emulator))
    assert line["status"] == "imported"
    assert "confirmed in XNAT after an upload without a clear answer" in line["reason"]
    assert _landed(xnat_emulator) == {"Subj001_CT1": 33}
    assert len(_imports(xnat_emulator)) == 1
    assert _assert_clean(xnat_emulator) == {"Subj001_CT1": 1}


def test_xnat_timeouts_on_every_import_fail_with_a_clear_reason(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, xnat_timeout=1)
    xnat_emulator.inject("POST", IMPORT_PATH, status=504, times=None, delay=1.5)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "did not answer (ReadTimeout)" in line["reason"]
    assert "failed 2 times" in line["reason"]
    assert not _landed(xnat_emulator)
    _assert_clean(xnat_emulator)


def test_project_not_writable(orthanc, xnat_emulator, pacs_receiver_port, tmp_path):
    xnat_emulator.grant(XNAT_PROJECT, XNAT_USER, "collaborator")
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    csv_path = tmp_path / "local.csv"
    csv_path.write_text(ONE_ROW)
    # The import command refuses before anything is sent.
    with Service(config) as service:
        with pytest.raises(XnatAuthError, match="cannot write to XNAT project 'NEURO01'.*member or owner"):
            service.import_local(XNAT_PROJECT, csv_path)
        assert service.store.list_jobs() == []
    # The service: the job fails with the reason, before querying or retrieving anything.
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", ONE_ROW.encode())
    with Service(config) as service:
        results = service.serve(once=True)
        assert list(results.values()) == [JobState.FAILED]
        job = service.store.list_jobs()[0]
        assert service.store.studies(job.id) == []  # nothing retrieved
        report = json.loads(render_report(service.store, job.id, show_identity=False)[1])
    assert "cannot write to XNAT project 'NEURO01'" in report["job"]["message"]
    assert "member or owner access" in report["job"]["message"]
    assert "upload the CSV again" in report["job"]["message"]
    assert not _imports(xnat_emulator)
    assert not xnat_emulator.prearchive_sessions()  # nothing anywhere, Unassigned included
    _assert_clean(xnat_emulator)


def test_study_conflict_in_the_prearchive(orthanc, xnat_emulator, pacs_receiver_port, tmp_path,
                                         xnat_client, dicom_zip_factory):
    # Someone already put another study under session label Visit1 into the project's prearchive.
    other, _ = dicom_zip_factory(instances=2, PatientName="OTHER^ONE")
    xnat_client.import_study(XNAT_PROJECT, "Other01", "Visit1", other)
    xnat_emulator.clear_requests()
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    csv_text = "Accession Number,Subject,Session\nACC0101,Subj001,Visit1\n"
    assert _serve(config, xnat_emulator, csv_text) is JobState.DONE
    line = _line(_report(xnat_emulator))
    assert line["status"] == "imported"
    assert "CONFLICT" in line["reason"]
    assert "session label 'Visit1'" in line["reason"]
    assert "archive it under another session label" in line["reason"]
    statuses = sorted((s.subject, s.status) for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT))
    assert statuses == [("Other01", "READY"), ("Subj001", "CONFLICT")]
    assert _assert_clean(xnat_emulator) == {"Visit1": 1}


# ------------------------------------------------------------------------------------------
# The service process and its disk


def test_sigkill_after_xnat_stored_the_study_does_not_upload_it_again(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    # (Killed *during* an upload: tests/e2e/test_service.py::test_sigkill_mid_job_then_restart_...)
    config_path = write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               pacs_extra=FAST_PACS, service=FAST_SERVICE)
    xnat_emulator.put_resource_file(XNAT_PROJECT, INBOX, "batch.csv", ONE_ROW.encode())
    # XNAT stores the study at once but answers 60 s later: the service dies before it learns.
    xnat_emulator.inject("POST", IMPORT_PATH, status=None, times=1, delay_after=60.0)
    command = [sys.executable, "-m", "dqr_xnat", "--config", str(config_path), "serve", "--once"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _landed(xnat_emulator).get("Subj001_CT1") != 33:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the study never reached the prearchive"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    with JobStore(tmp_path / "state" / "jobs.sqlite3") as store:
        assert [s.state for s in store.unfinished_studies()] == [StudyState.UPLOADING]
    assert [r.status for r in _imports(xnat_emulator)] == [200]

    xnat_emulator.clear_faults()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    line = _line(_report(xnat_emulator))
    assert line["status"] == "imported"
    assert "confirmed in XNAT after a restart" in line["reason"]
    assert len(_imports(xnat_emulator)) == 1  # the restart did not send it again
    assert _landed(xnat_emulator) == {"Subj001_CT1": 33}
    assert _assert_clean(xnat_emulator) == {"Subj001_CT1": 1}


@pytest.fixture
def tiny_staging(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of the given size as the service's staging directory (needs root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        staging = tmp_path / "state" / "staging"
        staging.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(staging)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"cannot mount a tmpfs for the disk-full test: {done.stderr}"
        mounted.append(staging)
        return staging

    yield mount
    for staging in mounted:
        if subprocess.run(["umount", str(staging)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(staging)], check=True)


@pytest.mark.parametrize("size", ["200k", "480k"], ids=["while-receiving", "while-relabeling"])
def test_staging_disk_full(size, tiny_staging, orthanc, xnat_emulator, pacs_receiver_port, tmp_path):
    staging = tiny_staging(size)  # ACC0101 is 33 instances, about 330 kB
    config = _config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port)
    assert _serve(config, xnat_emulator, ONE_ROW) is JobState.FAILED
    line = _line(_report(xnat_emulator))
    assert line["status"] == "failed"
    assert "disk full" in line["reason"] and str(staging) in line["reason"]
    assert "free space" in line["reason"]
    assert not _imports(xnat_emulator) and not _landed(xnat_emulator)  # nothing half-uploaded
    _assert_clean(xnat_emulator)
    leftovers = [p for p in staging.rglob("*") if p.is_file()]
    assert leftovers == [], "the staging directory must be freed"
    assert shutil.disk_usage(staging).used < 64 * 1024
