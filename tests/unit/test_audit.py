"""The audit log: JSON lines, append-only across threads and processes, private, no PHI in clear."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dqr_xnat.audit import AUDIT_FILE, AuditError, AuditLog, NullAuditLog, default_actor, open_audit_log
from dqr_xnat.config import parse_config
from dqr_xnat.logs import phi_hash, register_secret
from dqr_xnat.model import JobMode, JobState

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
NAME, PID, BIRTH = "DOE^JANE", "PID-0042-7731", "19700101"


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Format


def test_every_event_is_one_json_line_with_time_actor_and_job(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, actor="xnat:dqr-service")
    audit.job_started("j1", project="NEURO01", file="hospital/batch.csv", pacs="hospital", mode=JobMode.IMPORT)
    audit.query("j1", line=2, criteria={"PatientID": PID, "StudyDate": "20240101"}, pacs="hospital",
                counts={"candidates": 2, "matched": 1, "dropped": 1})
    audit.study_retrieved("j1", line=2, study_uid=UID, counts={"expected": 3, "received": 3})
    audit.study_uploaded("j1", line=2, study_uid=UID, project="NEURO01", subject="S01", session="S01_MR1",
                         instances=3, prearchive_url="/data/prearchive/projects/NEURO01/20240101_120000123/S01_MR1")
    audit.failure("j1", kind="retrieve", message="PACS 'hospital': association rejected")
    audit.cancel_requested("j1", by="xnat-file:hospital/batch.csv.cancel")
    audit.job_finished("j1", state=JobState.FAILED, counts={"done": 1, "failed": 1})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 and all(line.startswith('{"time":"') for line in lines)
    got = records(path)
    assert [r["event"] for r in got] == ["job_started", "query", "study_retrieved", "study_uploaded", "failure",
                                         "cancel_requested", "job_finished"]
    for r in got:
        assert r["actor"] == "xnat:dqr-service" and r["job"] == "j1" and r["pid"] == os.getpid()
        assert r["time"].endswith("Z") and datetime.fromisoformat(r["time"].replace("Z", "+00:00")).utcoffset() \
            is not None
    assert got[0] == {**got[0], "project": "NEURO01", "file": "hospital/batch.csv", "pacs": "hospital",
                      "mode": "import"}
    assert got[1]["criteria_hash"] == sha('{"PatientID":"PID-0042-7731","StudyDate":"20240101"}')
    assert got[1]["counts"] == {"candidates": 2, "matched": 1, "dropped": 1} and got[1]["line"] == 2
    assert got[2]["study_uid_hash"] == sha(UID) and got[2]["study_uid_hash"][:12] == phi_hash(UID)
    assert got[3] == {**got[3], "subject_hash": sha("S01"), "session_hash": sha("S01_MR1"), "instances": 3,
                      "prearchive_url": f"/data/prearchive/projects/NEURO01/20240101_120000123/<hash:{sha('S01_MR1')}>"}
    assert "line" not in got[4] and "study_uid_hash" not in got[4] and got[4]["kind"] == "retrieve"
    assert got[5]["by"] == "xnat-file:hospital/batch.csv.cancel"
    assert got[6] == {**got[6], "state": "failed", "counts": {"done": 1, "failed": 1}}


def test_criteria_hash_ignores_key_order_and_hash_key_makes_it_keyed(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl")
    assert audit.criteria_hash({"A": "1", "B": "2"}) == audit.criteria_hash({"B": "2", "A": "1"})
    assert audit.criteria_hash({"A": "1"}) != audit.criteria_hash({"A": "2"})
    keyed = AuditLog(tmp_path / "b.jsonl", hash_key=b"site-secret")
    assert keyed.hash(UID) == hmac.new(b"site-secret", UID.encode(), hashlib.sha256).hexdigest() != audit.hash(UID)


def test_default_actor_is_the_os_user() -> None:
    assert default_actor().startswith(("os:", "uid:")) and len(default_actor()) > 4


# ------------------------------------------------------------------------------------------
# Append-only, many writers


WRITER = """
import sys
from dqr_xnat.audit import AuditLog
audit = AuditLog(sys.argv[1], actor=sys.argv[2])
for i in range(int(sys.argv[3])):
    audit.query("job-" + sys.argv[2], line=i, criteria={"AccessionNumber": "A" * 300 + str(i)}, pacs="p",
                counts={"matched": i})
"""


def test_two_processes_and_threads_append_whole_lines_and_keep_old_ones(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, actor="first").job_started("j0", project="P", file="f.csv", pacs="p", mode="preview")
    before = path.read_bytes()
    count = 300
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(count)])
               for name in ("proc-a", "proc-b")]
    here = AuditLog(path, actor="threads")
    threads = [threading.Thread(target=lambda n=n: [here.cancel_requested(f"t{n}", by=str(i)) for i in range(count)])
               for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [w.wait(60) for w in writers] == [0, 0]
    data = path.read_bytes()
    assert data.startswith(before)  # nothing earlier was rewritten
    got = records(path)  # every line is whole JSON
    assert len(got) == 1 + 2 * count + 4 * count
    for name in ("proc-a", "proc-b"):  # each writer's lines, complete and in its order
        assert [r["line"] for r in got if r["actor"] == name] == list(range(count))
    for n in range(4):
        assert [r["by"] for r in got if r["job"] == f"t{n}"] == [str(i) for i in range(count)]


# ------------------------------------------------------------------------------------------
# Permissions


def test_new_log_is_private_in_a_private_directory(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "state" / "deep" / AUDIT_FILE
        AuditLog(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_readable_existing_log_is_made_private_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / AUDIT_FILE
    path.write_text('{"old":1}\n', encoding="utf-8")
    path.chmod(0o644)
    AuditLog(path).cancel_requested("j", by="me")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert records(path)[0] == {"old": 1} and len(records(path)) == 2
    assert "was readable by other users; made it private" in caplog.text


def test_a_symlink_or_unwritable_place_is_an_audit_error(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n", encoding="utf-8")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    with pytest.raises(AuditError, match=rf"cannot write the audit log {link}: .*service.audit_log"):
        AuditLog(link)
    assert target.read_text(encoding="utf-8") == "precious\n"
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(AuditError, match="dir.jsonl"):
        AuditLog(tmp_path / "dir.jsonl")


def test_a_write_failure_raises_audit_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    path.unlink()
    path.mkdir()  # the file was replaced by something unwritable
    with pytest.raises(AuditError, match="cannot write the audit log"):
        audit.job_finished("j", state="done", counts={})


# ------------------------------------------------------------------------------------------
# PHI


def sample_job(audit: NullAuditLog, *, labels_in_clear: bool) -> None:
    """A job whose labels came from PatientName (no relabel in the CSV), with a failure naming the patient."""
    subject, session = "DOE_JANE", "DOE_JANE_19700101"
    audit.job_started("j9", project="NEURO01", file="hospital/list.csv", pacs="hospital", mode="import")
    audit.query("j9", line=2, criteria={"PatientName": NAME, "PatientID": PID, "PatientBirthDate": BIRTH},
                pacs="hospital", counts={"candidates": 1, "matched": 1})
    audit.study_retrieved("j9", line=2, study_uid=UID, counts={"expected": 2, "received": 2})
    audit.study_uploaded("j9", line=2, study_uid=UID, project="NEURO01", subject=subject, session=session,
                         instances=2, prearchive_url=f"/data/prearchive/projects/NEURO01/20240101_1/{session}",
                         labels_in_clear=labels_in_clear)
    audit.failure("j9", line=2, study_uid=UID, kind="upload",
                  message=f"study {UID} of {NAME} ({PID}, born {BIRTH}) in session {session}: HTTP 500",
                  phi=(NAME, PID, BIRTH, subject, session))
    audit.job_finished("j9", state="failed", counts={"failed": 1})


def test_no_phi_in_clear_for_a_sample_job(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sample_job(AuditLog(path), labels_in_clear=False)
    text = path.read_text(encoding="utf-8")
    for value in (UID, NAME, "DOE", "JANE", PID, BIRTH, "0042"):
        assert value not in text, value
    failure = records(path)[4]
    assert failure["message"].startswith(f"study <hash:{sha(UID)[:12]}> of <hash:{sha(NAME)[:12]}> (")
    assert failure["message"].endswith(f"in session <hash:{sha('DOE_JANE_19700101')[:12]}>: HTTP 500")


def test_labels_in_clear_only_when_the_project_allows_identity(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sample_job(AuditLog(path), labels_in_clear=True)
    uploaded = records(path)[3]
    assert (uploaded["subject"], uploaded["session"]) == ("DOE_JANE", "DOE_JANE_19700101")
    assert uploaded["prearchive_url"].endswith("/DOE_JANE_19700101")
    text = path.read_text(encoding="utf-8")
    for value in (UID, NAME, PID):  # criteria and UIDs stay hashed
        assert value not in text


def test_the_callers_scrubber_and_secret_redaction_apply(tmp_path: Path) -> None:
    register_secret("tok-Secret-9d8c7b6a")
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, scrub=lambda text: text.replace("Ward 7", "[place]"))
    audit.failure("j", kind="xnat", message="at Ward 7 login with tok-Secret-9d8c7b6a failed " + "x" * 2000)
    message = records(path)[0]["message"]
    assert message.startswith("at [place] login with *** failed") and len(message) == 1001


# ------------------------------------------------------------------------------------------
# Configuration and the null log


def config(tmp_path: Path, audit_log: str | None) -> Any:
    service = {} if audit_log is None else {"audit_log": audit_log}
    return parse_config({"xnat": {"url": "https://x.example.org"}, "pacs": {"p": {"ae_title": "P", "host": "h",
                         "port": 104}}, "projects": {}, "state_dir": str(tmp_path / "state"), "service": service})


def test_open_audit_log_default_path_custom_path_and_off(tmp_path: Path) -> None:
    default = open_audit_log(config(tmp_path, None), actor="xnat:svc")
    assert isinstance(default, AuditLog) and default.path == tmp_path / "state" / AUDIT_FILE
    custom = open_audit_log(config(tmp_path, str(tmp_path / "logs" / "dqr-audit.jsonl")))
    assert isinstance(custom, AuditLog) and custom.path.exists()
    off = open_audit_log(config(tmp_path / "off", "off"))
    assert type(off) is NullAuditLog and not off.enabled
    sample_job(off, labels_in_clear=True)
    assert not (tmp_path / "off").exists()


def test_audit_writes_leave_logging_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sample_job(AuditLog(tmp_path / "audit.jsonl"), labels_in_clear=False)
    assert caplog.records == []
