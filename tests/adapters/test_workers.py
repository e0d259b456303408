"""Worker processes (relabel, C-GET) and the receiver they serve together, against real Orthanc.

What must hold whatever process does the work: the same bytes on disk as in the service process,
the same errors (class, message, errno), the same refusals, counters and log lines from the
receiver, and no process or temporary file left behind.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dqr_xnat.adapters.dicom_files import relabel_file
from dqr_xnat.adapters.pacs import STATUS_NOT_AUTHORISED, LocalAssociationLimiter, PacsClient, instance_file_name
from dqr_xnat.adapters.receivers import ProcessStorageSCP
from dqr_xnat.adapters.workers import WorkerError, WorkerPool
from dqr_xnat.config import ReceiverConfig
from dqr_xnat.errors import RelabelError
from dqr_xnat.model import RetrieveMethod
from dqr_xnat.sandbox.pacs_servers import HOST, RunningPacs
from dqr_xnat.sandbox.testdata import SyntheticStudy
from tests.adapters.test_pacs_adapter import (
    RECEIVER_AE,
    _store,
    _store_truncated,
    assert_delivered,
    client_for,
    pacs_config,
)

PLAN = {"PatientName": "Subj001", "PatientID": "Subj001", "AccessionNumber": "Subj001_CT1"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """Two workers for the whole module (starting one costs ~0.5 s of imports)."""
    temp_root = tmp_path_factory.mktemp("workers") / ".incoming"
    with WorkerPool(2, temp_root=temp_root) as workers:
        yield workers
    assert not temp_root.exists() or not any(temp_root.rglob("*")), "temporary files left behind"


@pytest.fixture(scope="module")
def source_by_sop(synthetic_files: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in synthetic_files}


@pytest.fixture
def receiver(pool: WorkerPool, orthanc: RunningPacs, pacs_receiver_port: int, tmp_path: Path
             ) -> Iterator[ProcessStorageSCP]:
    config = ReceiverConfig(ae_title=RECEIVER_AE, host=HOST, port=pacs_receiver_port)
    with ProcessStorageSCP(config, [pacs_config(orthanc)], tmp_path / "staging", pool) as scp:
        yield scp


def _staged(files: list[Path], directory: Path) -> list[Path]:
    """Copies named by SOPInstanceUID, as the receiver stages them (the sources repeat names)."""
    directory.mkdir()
    staged = []
    for source in files:
        target = directory / instance_file_name(str(dcmread(source, stop_before_pixels=True).SOPInstanceUID))
        shutil.copyfile(source, target)
        staged.append(target)
    return staged


def _study_files(files: list[Path], catalog: list[SyntheticStudy], index: int, directory: Path) -> list[Path]:
    wanted = set(catalog[index].sop_instance_uids())
    return _staged([p for p in files if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in wanted],
                   directory)


# --------------------------------------------------------------------------------------------
# Relabeling and errors


def test_relabel_in_workers_writes_the_same_bytes(
    pool: WorkerPool, synthetic_files: list[Path], synthetic_catalog: list[SyntheticStudy], tmp_path: Path
) -> None:
    files = _study_files(synthetic_files, synthetic_catalog, 0, tmp_path / "raw")  # 33: CT and a dose SR
    (tmp_path / "pool").mkdir()
    (tmp_path / "here").mkdir()
    pool.relabel(files, tmp_path / "pool", PLAN)
    for source in files:
        relabel_file(source, tmp_path / "here" / source.name, PLAN)
    for source in files:
        assert (tmp_path / "pool" / source.name).read_bytes() == (tmp_path / "here" / source.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == sorted(p.name for p in files)


def test_a_worker_error_keeps_its_class_message_and_errno(
    pool: WorkerPool, synthetic_files: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(RelabelError, match="AccessionNumber"):
        pool.relabel(synthetic_files[:3], tmp_path / "out", {"AccessionNumber": "X" * 17})  # SH: 16 at most
    with pytest.raises(FileNotFoundError) as raised:
        pool.relabel(synthetic_files[:1], tmp_path / "missing", PLAN)
    assert raised.value.errno == errno.ENOENT  # the pipeline tells a full disk by errno
    assert any("raised in worker process" in note for note in raised.value.__notes__)


def test_c_get_in_a_worker_holds_an_association_slot(
    pool: WorkerPool, orthanc: RunningPacs, synthetic_catalog: list[SyntheticStudy],
    source_by_sop: dict[str, Path], tmp_path: Path
) -> None:
    limiter = LocalAssociationLimiter()
    client = PacsClient(pacs_config(orthanc, retrieve=RetrieveMethod.C_GET, max_associations=1), limiter=limiter)
    seen: list[int] = []

    def watch() -> None:
        for _ in range(50):
            seen.append(limiter.open_count(client.config))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = pool.retrieve(client, synthetic_catalog[0].study_uid, tmp_path / "out")
    watcher.join()
    assert (result.received, result.expected, result.status) == (33, 33, 0x0000)
    assert_delivered(tmp_path / "out", set(synthetic_catalog[0].sop_instance_uids()), source_by_sop)
    assert max(seen) == 1 and limiter.open_count(client.config) == 0


# --------------------------------------------------------------------------------------------
# The receiver in the workers


def test_parallel_moves_into_the_workers(
    receiver: ProcessStorageSCP, orthanc: RunningPacs, synthetic_catalog: list[SyntheticStudy],
    source_by_sop: dict[str, Path], tmp_path: Path
) -> None:
    studies = [synthetic_catalog[i] for i in (0, 2, 4)]
    client = client_for(orthanc, max_associations=3)
    results = {}

    def move(study: SyntheticStudy) -> None:
        results[study.study_uid] = client.retrieve(study.study_uid, tmp_path / study.study_uid, receiver=receiver)

    threads = [threading.Thread(target=move, args=(s,)) for s in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for study in studies:
        result = results[study.study_uid]
        assert (result.received, result.expected, result.status) == (study.instances, study.instances, 0x0000)
        assert_delivered(tmp_path / study.study_uid, set(study.sop_instance_uids()), source_by_sop)


def test_associations_go_to_the_least_busy_worker(receiver: ProcessStorageSCP, orthanc: RunningPacs,
                                                   pool: WorkerPool) -> None:
    opened = []
    for expected in (1, 2):
        ae = AE(ae_title=orthanc.ae_title)
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, receiver.port, ae_title=RECEIVER_AE)
        assert assoc.is_established
        opened.append(assoc)
        deadline = time.monotonic() + 10
        while sum(pool.busy[:]) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        assert sorted(pool.busy[:]) == [1, 1]
    finally:
        for assoc in opened:
            assoc.release()


def test_receiver_refusals_are_counted_and_logged_in_the_service(
    receiver: ProcessStorageSCP, orthanc: RunningPacs, synthetic_files: list[Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dqr_xnat")
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assert stranger.associate(HOST, receiver.port, ae_title=RECEIVER_AE).is_rejected
    source = synthetic_files[0]
    study = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    assert _store(receiver.port, orthanc.ae_title, source) == STATUS_NOT_AUTHORISED
    with receiver.expect(study, tmp_path / "in") as receipt:
        assert _store(receiver.port, orthanc.ae_title, source) == 0x0000
    assert (receipt.received, receipt.refused) == (1, 0)
    [stored] = receipt.files
    assert dcmread(stored) == dcmread(source)
    assert (receiver.rejected_associations, receiver.refused_unexpected) == (1, 1)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused an association from AE 'STRANGER'" in logged
    assert "not a study being retrieved" in logged


def test_a_malformed_instance_is_refused_and_counted_in_the_service(
    receiver: ProcessStorageSCP, orthanc: RunningPacs, synthetic_files: list[Path], tmp_path: Path
) -> None:
    status, receipt = _store_truncated(receiver, orthanc.ae_title, synthetic_files[0], tmp_path / "in")
    assert status != 0x0000
    assert receipt.received == 0 and not list((tmp_path / "in").glob("*"))
    assert receiver.refused_unexpected + receiver.refused_unreadable == 1


# --------------------------------------------------------------------------------------------
# Failures and lifetime


def test_a_dead_worker_fails_its_calls_and_the_others_carry_on(
    tmp_path: Path, synthetic_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with WorkerPool(2, temp_root=tmp_path / "tmp") as workers:
        victim = workers.workers[0]
        victim.process.kill()
        victim.process.join(10)
        deadline = time.monotonic() + 10
        while victim.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not victim.alive
        with pytest.raises(WorkerError):
            victim.call("ping", ()).result(10)
        (tmp_path / "out").mkdir()
        workers.relabel(_staged(synthetic_files[:4], tmp_path / "raw"), tmp_path / "out", PLAN)  # the survivor
        assert len(list((tmp_path / "out").iterdir())) == 4
    assert "worker process 0 exited unexpectedly" in caplog.text


def test_workers_never_outlive_a_killed_service(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dqr_xnat.adapters.workers import WorkerPool\n"
        f"pool = WorkerPool(2, temp_root=Path({str(tmp_path / 'tmp')!r})).start()\n"
        "print(*[w.process.pid for w in pool.workers], flush=True)\n"
        "time.sleep(60)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None
    pids = [int(p) for p in service.stdout.readline().split()]
    assert len(pids) == 2
    service.send_signal(signal.SIGKILL)
    service.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)
    assert not any((tmp_path / "tmp").rglob("*.dcm"))


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
