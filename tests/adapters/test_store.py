"""The SQLite job store: identity, resume after kill -9, exclusive claims across processes, cancel."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

from dqr_xnat.adapters import store as store_module
from dqr_xnat.adapters.store import (
    CANCELLED_ROW_MESSAGE,
    JobStore,
    NewStudy,
    NotInStoreError,
)
from dqr_xnat.errors import StoreError
from dqr_xnat.model import (
    CsvProblem,
    CsvRow,
    JobMode,
    JobState,
    RowMatch,
    RowStatus,
    StudyInfo,
    StudyState,
    XnatLabels,
)

CHILD_TIMEOUT = 60


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def store(db: Path):
    with JobStore(db) as s:
        yield s


def new_job(store: JobStore, path: str = "batch.csv", digest: str = "d1", *, project: str = "P1",
            mode: JobMode = JobMode.IMPORT, pacs: str = "hospital"):
    job = store.create_job(project=project, resource="DQR", path=path, digest=digest, mode=mode, pacs=pacs)
    assert job is not None
    return job


def rows(*lines: int) -> list[CsvRow]:
    return [CsvRow(line, {"AccessionNumber": f"ACC{line}"}, {"PatientName": f"Subj{line}"}) for line in lines]


def study(uid: str, **info: object) -> NewStudy:
    return NewStudy(StudyInfo(study_instance_uid=uid, **info))  # type: ignore[arg-type]


def job_with_studies(store: JobStore, n: int, **kwargs: object) -> tuple[str, list[int]]:
    """A job with one row per study, every study PENDING; returns (job id, study ids)."""
    job = new_job(store, **kwargs)  # type: ignore[arg-type]
    store.add_rows(job.id, rows(*range(2, n + 2)))
    ids = []
    for line in range(2, n + 2):
        (record,) = store.record_row(job.id, RowMatch(line, RowStatus.MATCHED, "1 study"),
                                     [study(f"1.2.3.{line}")])
        ids.append(record.id)
    return job.id, ids


def run_child(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    """Run ``code`` in a fresh Python process (the store must work across real processes)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
        assert proc.returncode == 0, err
        proc.stdout_text = out  # type: ignore[attr-defined]
    return proc


# ------------------------------------------------------------------------------------------------
# Jobs: identity and lookup


def test_same_file_is_one_job_and_an_edited_file_a_new_one(store: JobStore) -> None:
    first = new_job(store, "dir/batch.csv", "aaa")
    assert store.create_job(project="P1", resource="DQR", path="dir/batch.csv", digest="aaa",
                            mode=JobMode.PREVIEW, pacs="other") is None
    assert store.job_for_file("P1", "dir/batch.csv", "aaa") == first
    edited = new_job(store, "dir/batch.csv", "bbb")
    elsewhere = new_job(store, "dir/batch.csv", "aaa", project="P2")
    moved = new_job(store, "other/batch.csv", "aaa")
    ids = {first.id, edited.id, elsewhere.id, moved.id}
    assert len(ids) == 4
    assert all(len(i) == 8 and int(i, 16) >= 0 for i in ids)
    assert [j.id for j in store.list_jobs()] == [first.id, edited.id, elsewhere.id, moved.id]


def test_identity_is_enforced_by_the_schema(store: JobStore, db: Path) -> None:
    new_job(store, "a.csv", "x")
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO jobs (id, project, resource, path, digest, mode, pacs, state, created,"
                     " updated) VALUES ('ffffffff','P1','DQR','a.csv','x','import','h','pending','t','t')")
    conn.close()


def test_new_job_fields(store: JobStore) -> None:
    job = store.create_job(project="P1", resource="DQR", path="preview/a.csv", digest="abc",
                           mode=JobMode.PREVIEW, pacs="hospital", reimport=True, csv_encoding="utf-8")
    assert job is not None
    assert (job.project, job.resource, job.path, job.digest, job.mode, job.pacs, job.reimport) == (
        "P1", "DQR", "preview/a.csv", "abc", JobMode.PREVIEW, "hospital", True)
    assert (job.state, job.message, job.cancel_requested, job.csv_encoding, dict(job.totals)) == (
        JobState.PENDING, "", False, "utf-8", {})
    assert job.created.tzinfo is not None and job.finished is None
    assert store.get_job(job.id) == job
    assert store.get_job("00000000") is None


def test_find_job_by_prefix(store: JobStore) -> None:
    jobs = [new_job(store, f"f{i}.csv") for i in range(17)]  # 17 ids: two share a first character
    for job in jobs:
        assert store.find_job(job.id) == job
        assert store.find_job(job.id[:6].upper()) == job
    first_chars = [j.id[0] for j in jobs]
    shared = next(c for c in first_chars if first_chars.count(c) > 1)
    with pytest.raises(NotInStoreError, match=f"'{shared}' matches \\d+ jobs .*; type more characters"):
        store.find_job(shared)
    missing = next(f"{i:08x}" for i in range(100) if f"{i:08x}" not in {j.id for j in jobs})
    with pytest.raises(NotInStoreError, match=f"no job {missing}; `dqr-xnat status` lists the jobs"):
        store.find_job(missing)
    for bad in ("", "xyz", "12-4"):
        with pytest.raises(NotInStoreError, match="is not a job id"):
            store.find_job(bad)


def test_list_jobs_filters(store: JobStore) -> None:
    a = new_job(store, "a.csv")
    b = new_job(store, "b.csv", project="P2")
    c = new_job(store, "a.csv", "d2")
    store.set_job_state(b.id, JobState.RUNNING)
    assert [j.id for j in store.list_jobs([JobState.RUNNING])] == [b.id]
    assert [j.id for j in store.list_jobs([JobState.PENDING, JobState.RUNNING])] == [a.id, b.id, c.id]
    assert [j.id for j in store.list_jobs(project="P1", path="a.csv")] == [a.id, c.id]
    assert store.list_jobs([]) == []


def test_set_job_state_message_totals_and_finished(store: JobStore) -> None:
    job = new_job(store)
    running = store.set_job_state(job.id, JobState.RUNNING, "querying", totals={"rows": 3},
                                  csv_encoding="latin-1")
    assert (running.state, running.message, dict(running.totals), running.csv_encoding) == (
        JobState.RUNNING, "querying", {"rows": 3}, "latin-1")
    assert running.finished is None and running.updated >= job.updated
    done = store.set_job_state(job.id, JobState.DONE)
    assert done.message == "querying" and dict(done.totals) == {"rows": 3}  # None leaves fields alone
    assert done.finished is not None
    assert store.set_job_state(job.id, JobState.RUNNING).finished is None
    with pytest.raises(NotInStoreError):
        store.set_job_state("deadbeef", JobState.DONE)


def test_job_json_has_no_digest_or_phi(store: JobStore) -> None:
    data = new_job(store).to_json()
    assert set(data) == {"id", "project", "resource", "path", "mode", "pacs", "reimport", "state",
                         "message", "created", "updated", "finished", "cancel_requested", "totals"}
    json.dumps(data)


# ------------------------------------------------------------------------------------------------
# Rows and studies


def test_rows_round_trip_and_are_idempotent(store: JobStore) -> None:
    job = new_job(store)
    given = [CsvRow(2, {"AccessionNumber": "A1"}, {"StudyID": ""}, subject="S1", session="S1_MR"),
             CsvRow(4, {"PatientID": "X", "StudyDate": "20210101-"})]
    assert store.add_rows(job.id, given) == 2
    assert store.add_rows(job.id, given) == 0  # a resumed job adds its rows again: no duplicates
    assert store.add_error_rows(job.id, [CsvProblem(3, "Study Date", "not a date"),
                                         CsvProblem(3, None, "extra cell"),
                                         CsvProblem(None, None, "file-level")]) == 1
    records = store.rows(job.id)
    assert [r.line for r in records] == [2, 3, 4]
    assert [r.csv_row() for r in (records[0], records[2])] == given
    assert (records[1].status, records[1].message) == (
        RowStatus.ERROR, 'column "Study Date": not a date; extra cell')
    assert [r.line for r in store.pending_rows(job.id)] == [2, 4]
    assert store.row_status(job.id, 2) is None
    result = store.set_row_result(job.id, 2, RowStatus.DUPLICATE, "same study as line 1",
                                  duplicate_of=1, dropped=2)
    assert (result.status, result.message, result.duplicate_of, result.dropped) == (
        RowStatus.DUPLICATE, "same study as line 1", 1, 2)
    assert store.row_status(job.id, 2) is RowStatus.DUPLICATE
    with pytest.raises(NotInStoreError, match="has no row at line 9"):
        store.set_row_result(job.id, 9, RowStatus.MATCHED, "x")


def test_record_row_stores_the_decision_and_studies_together(store: JobStore) -> None:
    job = new_job(store)
    store.add_rows(job.id, rows(2, 3))
    info = StudyInfo("1.2.3", patient_name="DOE^J", study_date="20240101", modalities=("MR", "SR"),
                     number_of_series=3, number_of_instances=40)
    new = NewStudy(info, session_suffix="_1", unverified=("PatientBirthDate",), series_uids=("1.2.3.1",),
                   series_expected=1, expected=20)
    match = RowMatch(2, RowStatus.MATCHED, "1 study", studies=(info,))
    (record,) = store.record_row(job.id, match, [new, new])
    assert store.row_status(job.id, 2) is RowStatus.MATCHED
    assert (record.job_id, record.line, record.study_uid, record.info, record.state) == (
        job.id, 2, "1.2.3", info, StudyState.PENDING)
    assert (record.session_suffix, record.unverified, record.series_uids, record.series_expected,
            record.expected) == ("_1", ("PatientBirthDate",), ("1.2.3.1",), 1, 20)
    assert (record.attempts, record.claimed_by, record.interrupted, record.labels) == (0, None, False, None)
    # the same study for another line of the same job is not added twice
    again = store.add_studies(job.id, 3, [study("1.2.3")])
    assert again == [record]
    assert store.claimed_studies(job.id) == {"1.2.3": 2}
    assert [s.id for s in store.studies(job.id, line=2)] == [record.id]
    assert store.studies(job.id, line=3) == []
    with pytest.raises(NotInStoreError, match="no row at line 7; add the rows first"):
        store.add_studies(job.id, 7, [study("9.9")])


def test_record_row_is_atomic(store: JobStore) -> None:
    job = new_job(store)
    store.add_rows(job.id, rows(2))

    unstorable = NewStudy(StudyInfo("1.2", patient_name=object()))  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # fails after the row and the first study were written
        store.record_row(job.id, RowMatch(2, RowStatus.MATCHED, "2 studies"), [study("1.1"), unstorable])
    assert store.row_status(job.id, 2) is None
    assert store.studies(job.id) == []


def test_study_state_fields_and_ownership(store: JobStore) -> None:
    _, (sid,) = job_with_studies(store, 1)
    retrieving = store.set_study_state(sid, StudyState.RETRIEVING, staging_dir="/s/1")
    assert retrieving.claimed_by == store.owner and retrieving.staging_dir == "/s/1"
    progress = store.update_study(sid, received=5)
    assert (progress.state, progress.received, progress.claimed_by) == (
        StudyState.RETRIEVING, 5, store.owner)
    relabeled = store.set_study_state(
        sid, StudyState.RELABELED, labels=XnatLabels("P1", "Subj2", "Subj2_MR", "AccessionNumber"),
        message="relabeled")
    assert relabeled.claimed_by is None
    assert relabeled.labels == XnatLabels("P1", "Subj2", "Subj2_MR", "AccessionNumber")
    done = store.set_study_state(sid, StudyState.DONE, uploaded=5, prearchive_url="/data/prearchive/x",
                                 message="uploaded")
    assert (done.state, done.uploaded, done.prearchive_url, done.message, done.received) == (
        StudyState.DONE, 5, "/data/prearchive/x", "uploaded", 5)
    with pytest.raises(TypeError, match="unknown study field"):
        store.set_study_state(sid, StudyState.DONE, **{"state = 'x' --": 1})
    with pytest.raises(NotInStoreError):
        store.get_study(99999)


def test_record_attempt(store: JobStore) -> None:
    job_id, (sid,) = job_with_studies(store, 1)
    claimed = store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)
    assert claimed is not None and claimed.id == sid
    kept = store.record_attempt(sid, "association rejected")
    assert (kept.attempts, kept.last_error, kept.state, kept.claimed_by) == (
        1, "association rejected", StudyState.RETRIEVING, store.owner)
    later = store.record_attempt(sid, "timeout", state=StudyState.PENDING, retry_in=3600)
    assert (later.attempts, later.state, later.claimed_by) == (2, StudyState.PENDING, None)
    assert later.retry_after is not None and later.retry_after > later.updated
    assert store.claim_study(StudyState.PENDING, StudyState.RETRIEVING) is None  # not before retry_after
    store.record_attempt(sid, "timeout", retry_in=0)
    again = store.claim_study(StudyState.PENDING, StudyState.RETRIEVING, job_id=job_id)
    assert again is not None and again.attempts == 3


# ------------------------------------------------------------------------------------------------
# Claims


def test_claims_are_first_come_and_filtered(store: JobStore) -> None:
    first, first_ids = job_with_studies(store, 2, path="a.csv")
    second, second_ids = job_with_studies(store, 1, path="b.csv", pacs="research")
    preview, _ = job_with_studies(store, 1, path="preview/c.csv", mode=JobMode.PREVIEW)
    got = [store.claim_study(StudyState.PENDING, StudyState.RETRIEVING) for _ in range(4)]
    assert [s.id if s else None for s in got] == [*first_ids, *second_ids, None]  # never a preview's
    assert all(s.claimed_by == store.owner for s in got if s)
    for sid in first_ids + second_ids:
        store.set_study_state(sid, StudyState.RETRIEVED)
    assert store.claim_study([StudyState.RETRIEVED], StudyState.RETRIEVED, pacs="research").id == second_ids[0]
    same_state = store.claim_study(StudyState.RETRIEVED, StudyState.RETRIEVED, job_id=first)
    assert same_state.id == first_ids[0] and same_state.claimed_by == store.owner
    assert store.claim_study(StudyState.RETRIEVED, StudyState.RETRIEVED, job_id=second) is None  # owned
    assert store.release_study(second_ids[0]).claimed_by is None
    assert store.claim_study(StudyState.RETRIEVED, StudyState.RETRIEVED, job_id=second).id == second_ids[0]
    assert preview


def test_max_active_limits_claims_per_pacs_across_jobs(store: JobStore) -> None:
    job_with_studies(store, 2, path="a.csv")
    job_with_studies(store, 2, path="b.csv", project="P2")
    claim = lambda: store.claim_study(StudyState.PENDING, StudyState.RETRIEVING,  # noqa: E731
                                      pacs="hospital", max_active=2)
    one, two = claim(), claim()
    assert one and two and claim() is None
    store.set_study_state(one.id, StudyState.RETRIEVED)
    assert claim() is not None
    with pytest.raises(ValueError, match="max_active needs pacs"):
        store.claim_study(StudyState.PENDING, StudyState.RETRIEVING, max_active=1)


def test_threads_never_claim_the_same_study(store: JobStore) -> None:
    _, ids = job_with_studies(store, 60)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (record := store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)) is not None:
            store.set_study_state(record.id, StudyState.RETRIEVED)
            with lock:
                claimed.append(record.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_connections_of_ended_threads_are_closed(store: JobStore) -> None:
    """A long-running service starts thread pools per job: their connections must not pile up."""
    for _ in range(5):
        thread = threading.Thread(target=store.list_jobs)
        thread.start()
        thread.join()
    assert len(store._connections) <= 2  # this thread's and the last ended thread's (pruned next time)


CLAIM_WORKER = """
import sys, time, pathlib
from dqr_xnat.adapters.store import JobStore
from dqr_xnat.model import StudyState
store = JobStore(sys.argv[1])
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
while (record := store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)) is not None:
    store.set_study_state(record.id, StudyState.RETRIEVED, received=1)
    print(record.id, flush=True)
store.close()
"""


def test_two_processes_never_claim_the_same_study(store: JobStore, db: Path, tmp_path: Path) -> None:
    _, ids = job_with_studies(store, 300)
    go = tmp_path / "go"
    children = [run_child(CLAIM_WORKER, str(db), str(go), wait=False) for _ in range(2)]
    go.touch()
    claimed: list[list[int]] = []
    for child in children:
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
        assert child.returncode == 0, err
        claimed.append([int(x) for x in out.split()])
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)
    assert {s.state for s in store.studies(store.list_jobs()[0].id)} == {StudyState.RETRIEVED}


# ------------------------------------------------------------------------------------------------
# Crashes and resume


ADD_ROWS_THEN_HANG = """
import sys, time
from dqr_xnat.adapters.store import JobStore
from dqr_xnat.model import CsvRow
store = JobStore(sys.argv[1])
def rows():
    for line in range(2, 5002):
        if line == 2500:
            print("mid-transaction", flush=True)
            time.sleep(600)
        yield CsvRow(line, {"AccessionNumber": str(line)})
store.add_rows(sys.argv[2], rows())
"""


def test_kill_9_mid_transaction_leaves_a_consistent_store(store: JobStore, db: Path) -> None:
    job = new_job(store)
    child = run_child(ADD_ROWS_THEN_HANG, str(db), job.id, wait=False)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "mid-transaction"
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=CHILD_TIMEOUT)
    assert child.returncode == -signal.SIGKILL
    with JobStore(db) as reopened:
        assert reopened.integrity_check() == ["ok"]
        assert reopened.rows(job.id) == []  # all or nothing
        assert reopened.add_rows(job.id, rows(2, 3)) == 2  # not locked by the dead writer
        assert [r.line for r in reopened.rows(job.id)] == [2, 3]


HOLD_STUDIES = """
import sys, time
from dqr_xnat.adapters.store import JobStore
from dqr_xnat.model import StudyState
store = JobStore(sys.argv[1])
ids = [int(x) for x in sys.argv[2].split(",")]
store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)          # ids[0]: retrieving
store.set_study_state(ids[1], StudyState.UPLOADING)                   # ids[1]: uploading
store.claim_study(StudyState.RELABELED, StudyState.RELABELED)         # ids[2]: held while relabeling
print(store.owner, flush=True)
time.sleep(600)
"""


def test_reset_interrupted_after_kill_9(store: JobStore, db: Path) -> None:
    job_id, ids = job_with_studies(store, 5)
    store.set_study_state(ids[1], StudyState.RELABELED)
    store.set_study_state(ids[2], StudyState.RELABELED)
    store.set_study_state(ids[3], StudyState.DONE)  # ids[4] stays PENDING, unowned
    child = run_child(HOLD_STUDIES, str(db), ",".join(map(str, ids)), wait=False)
    assert child.stdout is not None
    owner = child.stdout.readline().strip()
    held = {s.id: s for s in store.studies(job_id)}
    assert [held[i].claimed_by for i in ids[:3]] == [owner] * 3
    assert store.reset_interrupted() == []  # the owner is alive: nothing to reset
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=CHILD_TIMEOUT)

    reset = {s.id: s for s in store.reset_interrupted()}
    assert set(reset) == set(ids[:3])
    assert (reset[ids[0]].state, reset[ids[0]].interrupted) == (StudyState.PENDING, False)
    assert (reset[ids[1]].state, reset[ids[1]].interrupted) == (StudyState.UPLOADING, True)
    assert (reset[ids[2]].state, reset[ids[2]].interrupted) == (StudyState.RELABELED, False)
    for record in reset.values():
        assert record.claimed_by is None and record.attempts == 1
        assert record.last_error.startswith("interrupted while ")
    after = {s.id: s for s in store.studies(job_id)}
    assert after[ids[3]].state is StudyState.DONE and after[ids[4]].state is StudyState.PENDING
    assert store.reset_interrupted() == []  # idempotent

    # The interrupted upload is handed out for the XNAT check, then leaves UPLOADING cleanly.
    check = store.claim_study(StudyState.UPLOADING, StudyState.UPLOADING)
    assert check is not None and check.id == ids[1] and check.interrupted
    assert store.set_study_state(ids[1], StudyState.DONE).interrupted is False
    assert [s.id for s in store.unfinished_studies()] == [ids[0], ids[2], ids[4]]


def test_reset_interrupted_spares_live_owners_unless_forced(store: JobStore) -> None:
    _, ids = job_with_studies(store, 2)
    store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)
    with JobStore(store.path) as other:  # another store object in this (live) process
        assert other.reset_interrupted() == []
        assert [s.id for s in other.reset_interrupted(force=True)] == [ids[0]]
    assert store.get_study(ids[0]).state is StudyState.PENDING


def test_unowned_active_states_are_reset(store: JobStore, db: Path) -> None:
    """A RETRIEVING row without owner (e.g. written by an older version) is abandoned work."""
    _, ids = job_with_studies(store, 1)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE studies SET state = 'retrieving' WHERE id = ?", (ids[0],))
    conn.commit()
    conn.close()
    assert [s.state for s in store.reset_interrupted()] == [StudyState.PENDING]


def test_dead_owner_detection() -> None:
    child = run_child("import os; from dqr_xnat.adapters.store import _owner_token; print(_owner_token())")
    token = child.stdout_text.strip()  # type: ignore[attr-defined]
    assert not store_module._owner_alive(token)
    assert store_module._owner_alive(store_module._owner_token())
    host, pid, start = store_module._owner_token().split(":")
    assert not store_module._owner_alive(f"{host}:{pid}:{int(start) + 1}")  # pid reused by another process
    assert store_module._owner_alive(f"other-host:{pid}:1")  # cannot check: assume alive


# ------------------------------------------------------------------------------------------------
# landed()


def test_landed_finds_a_study_done_by_an_earlier_job(store: JobStore) -> None:
    first, (sid,) = job_with_studies(store, 1, path="a.csv")
    labels = XnatLabels("P1", "Subj2", "Subj2_MR")
    store.set_study_state(sid, StudyState.UPLOADING, labels=labels)
    second = new_job(store, "b.csv").id
    assert store.landed("P1", "1.2.3.2", "Subj2", "Subj2_MR", exclude_job=second) is None  # not DONE yet
    store.set_study_state(sid, StudyState.DONE, prearchive_url="/data/prearchive/projects/P1/x/Subj2_MR")
    found = store.landed("P1", "1.2.3.2", "Subj2", "Subj2_MR", exclude_job=second)
    assert found is not None and (found.job_id, found.line, found.prearchive_url) == (
        first, 2, "/data/prearchive/projects/P1/x/Subj2_MR")
    assert store.landed("P1", "1.2.3.2", "Subj2", "Subj2_MR", exclude_job=first) is None
    assert store.landed("P1", "1.2.3.2", "Subj2", "OTHER", exclude_job=second) is None
    assert store.landed("P1", "1.2.3.2", "Subj9", "Subj2_MR", exclude_job=second) is None
    assert store.landed("P2", "1.2.3.2", "Subj2", "Subj2_MR", exclude_job=second) is None
    assert store.landed("P1", "9.9", "Subj2", "Subj2_MR", exclude_job=second) is None


# ------------------------------------------------------------------------------------------------
# Cancel and job state


def test_cancel(store: JobStore) -> None:
    job_id, ids = job_with_studies(store, 4)
    store.add_rows(job_id, rows(9))  # not queried yet
    store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)  # ids[0], owned by this process
    store.set_study_state(ids[1], StudyState.RELABELED)
    store.set_study_state(ids[2], StudyState.UPLOADING)
    store.release_study(ids[2])  # an interrupted upload nobody holds
    assert not store.is_cancel_requested(job_id)

    job = store.request_cancel(job_id)
    assert store.is_cancel_requested(job_id) and job.cancel_requested
    states = {s.id: s.state for s in store.studies(job_id)}
    assert states == {ids[0]: StudyState.RETRIEVING, ids[1]: StudyState.CANCELED,
                      ids[2]: StudyState.UPLOADING, ids[3]: StudyState.CANCELED}
    assert store.rows(job_id)[-1].message == CANCELLED_ROW_MESSAGE
    assert store.pending_rows(job_id)[0].status is None
    assert job.state is JobState.RUNNING  # studies still held
    assert store.claim_study(StudyState.CANCELED, StudyState.PENDING) is None  # no new work
    late = store.record_row(job_id, RowMatch(9, RowStatus.MATCHED, "1"), [study("9.9")])
    assert [s.state for s in late] == [StudyState.CANCELED]  # a row answered after the cancel
    check = store.claim_study(StudyState.UPLOADING, StudyState.UPLOADING)  # but XNAT must confirm
    assert check is not None and check.id == ids[2]

    store.set_study_state(ids[0], StudyState.CANCELED)
    store.set_study_state(ids[2], StudyState.DONE)  # the XNAT check found it landed
    finished = store.refresh_job_state(job_id)
    assert finished.state is JobState.CANCELED and finished.finished is not None
    assert store.request_cancel(job_id) == finished  # a final job stays as it is


def test_cancel_of_a_job_not_started(store: JobStore) -> None:
    job = new_job(store)
    assert store.request_cancel(job.id).state is JobState.CANCELED
    with pytest.raises(NotInStoreError):
        store.request_cancel("12345678")


def test_derive_job_state(store: JobStore) -> None:
    job = new_job(store)
    store.set_job_state(job.id, JobState.RUNNING)
    assert store.derive_job_state(job.id) is JobState.RUNNING  # no rows yet: as it is
    store.add_rows(job.id, rows(2, 3, 4))
    store.set_job_state(job.id, JobState.PENDING)
    assert store.derive_job_state(job.id) is JobState.PENDING
    (s2,) = store.record_row(job.id, RowMatch(2, RowStatus.MATCHED, "1"), [study("1.2")])
    assert store.derive_job_state(job.id) is JobState.RUNNING
    store.set_job_state(job.id, JobState.WAITING)
    assert store.derive_job_state(job.id) is JobState.WAITING
    store.record_row(job.id, RowMatch(3, RowStatus.DUPLICATE, "as line 2", duplicate_of=2))
    store.set_row_result(job.id, 4, RowStatus.MATCHED, "1")
    store.set_study_state(s2.id, StudyState.RETRIEVING)
    assert store.derive_job_state(job.id) is JobState.RUNNING  # work is held: no longer waiting
    store.set_study_state(s2.id, StudyState.DONE)
    assert store.derive_job_state(job.id) is JobState.DONE
    store.set_study_state(s2.id, StudyState.FAILED)
    assert store.derive_job_state(job.id) is JobState.FAILED
    store.set_study_state(s2.id, StudyState.SKIPPED)
    assert store.derive_job_state(job.id) is JobState.DONE
    store.set_row_result(job.id, 4, RowStatus.NO_MATCH, "no study matches")
    # no-match is an outcome, not a failure (csv-language.md)
    assert store.refresh_job_state(job.id, "1 row without match").state is JobState.DONE
    store.set_row_result(job.id, 4, RowStatus.AMBIGUOUS, "2 studies match")
    assert store.refresh_job_state(job.id, "1 ambiguous row").state is JobState.FAILED
    store.set_row_result(job.id, 4, RowStatus.NO_MATCH, "no study matches")
    progress = store.job_progress(job.id)
    assert dict(progress.rows) == {"matched": 1, "duplicate": 1, "no-match": 1}
    assert dict(progress.studies) == {"skipped": 1}
    assert (progress.total_rows, progress.total_studies, progress.owned) == (3, 1, 0)


def test_preview_jobs_ignore_their_studies(store: JobStore) -> None:
    job = new_job(store, mode=JobMode.PREVIEW)
    store.add_rows(job.id, rows(2))
    store.record_row(job.id, RowMatch(2, RowStatus.MATCHED, "1"), [study("1.2")])
    assert store.derive_job_state(job.id) is JobState.DONE
    assert store.unfinished_studies() == []


# ------------------------------------------------------------------------------------------------
# File, permissions, schema


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_files_are_private(store: JobStore, db: Path) -> None:
    new_job(store)
    assert mode_of(db.parent) == 0o700
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
        assert mode_of(db.parent / name) == 0o600, name


def test_existing_store_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    os.chmod(path, 0o644)
    JobStore(path).close()
    assert mode_of(path) == 0o600


def test_in_state_dir(tmp_path: Path) -> None:
    with JobStore.in_state_dir(tmp_path / "var" / "dqr") as s:
        assert s.path == tmp_path / "var" / "dqr" / "jobs.sqlite3"
    assert mode_of(tmp_path / "var" / "dqr") == 0o700


def test_wal_mode_and_schema_version(store: JobStore, db: Path) -> None:
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    conn.close()


def test_migration_hook_runs_on_an_older_store(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    JobStore(db).close()
    step = lambda conn: conn.execute("ALTER TABLE jobs ADD COLUMN note TEXT")  # noqa: E731
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, step])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    with JobStore(db) as migrated:
        new_job(migrated)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == 2
    assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
    conn.close()


def test_a_newer_store_is_refused(db: Path) -> None:
    JobStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this dqr-xnat understands"):
        JobStore(db)


def test_a_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError, match="is unusable .*move it away"):
        JobStore(path)


def test_store_works_after_fork_in_a_child(store: JobStore) -> None:
    """A forked worker must open its own connection and owner token, not reuse the parent's."""
    _, (sid,) = job_with_studies(store, 1)
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns when other test threads exist
        warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            record = store.claim_study(StudyState.PENDING, StudyState.RETRIEVING)
            os.write(write, (record.claimed_by if record else "none").encode())
        finally:
            os._exit(0)
    os.close(write)
    owner = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert owner not in ("none", store.owner) and f":{pid}:" in owner
    assert store.get_study(sid).claimed_by == owner
    assert [s.id for s in store.reset_interrupted()] == [sid]  # the child has exited
