"""Wire the stages together for one job: query → decide → retrieve → verify → relabel → label → upload.

The pipeline owns no protocol and no storage format: it calls the PACS adapter, the XNAT adapter
and the job store, records every state change in the store *before* moving on, and so can resume a
job from wherever a crash left it. Stages overlap: rows are queried by a small pool and decided in
line order as soon as every earlier row is decided; each matched study is handed to a retrieval
pool (bounded by the PACS association limit) and, once on disk, to a processing pool that
relabels and uploads it while the next study is being retrieved.

Resume rules (per study state in the store):

* PENDING / RETRIEVING → retrieve again into a clean staging directory (files are keyed by
  SOPInstanceUID, so nothing is duplicated);
* RETRIEVED → verify, relabel, upload;
* RELABELED → upload (after a failed try, e.g. a timeout, first look in the prearchive as below);
* UPLOADING → first ask XNAT whether the study already landed in the project's prearchive
  (same StudyInstanceUID, same session label); only if not, upload again;
* DONE / SKIPPED / FAILED / CANCELED → nothing.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from datetime import datetime, timezone
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from dqr_xnat.adapters import dicom_files
from dqr_xnat.adapters.pacs import PacsClient, StorageSCP
from dqr_xnat.adapters.store import JobStore, NewStudy, StudyRecord
from dqr_xnat.adapters.workers import WorkerPool
from dqr_xnat.adapters.xnat import XnatClient
from dqr_xnat.config import Config, PacsConfig, ProjectConfig
from dqr_xnat.errors import (
    CancelledError,
    StopRequested,
    DqrError,
    LabelError,
    PacsError,
    RetriableError,
    VerificationError,
)
from dqr_xnat.audit import NullAuditLog
from dqr_xnat.logs import phi_hash
from dqr_xnat.metrics import Metrics
from dqr_xnat.model import (
    CsvRow,
    JobMode,
    JobState,
    RetrieveMethod,
    RetrieveResult,
    RowMatch,
    RowStatus,
    SeriesInfo,
    StudyInfo,
    StudyState,
    XnatLabels,
)
from dqr_xnat.querying import SERIES_DESCRIPTION, RowCandidates, query_row
from dqr_xnat.stages import labels as label_stage
from dqr_xnat.stages import schedule, verify

log = logging.getLogger(__name__)

#: How often (seconds) the report is rewritten while a job runs.
REPORT_INTERVAL = 2.0
#: A retrieval that fails while the staging disk has less free space than this blames the disk.
STAGING_FULL_BELOW = 1024 * 1024


@dataclass
class JobRun:
    """Everything one job run needs; built by the service or the import command."""

    job_id: str
    project: ProjectConfig
    pacs: PacsConfig
    rows: Sequence[CsvRow]
    mode: JobMode
    reimport: bool = False


@dataclass
class Progress:
    """Counters for a terminal progress line; updated from worker threads."""

    rows_total: int = 0
    rows_done: int = 0
    studies_total: int = 0
    studies_done: int = 0
    studies_failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, delta in deltas.items():
                setattr(self, key, getattr(self, key) + delta)


ReportCallback = Callable[[str, bool], None]  # (job_id, final) -> rewrite the report


class Pipeline:
    """Runs jobs against one configuration, sharing PACS clients, receiver and XNAT session."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        xnat: XnatClient,
        *,
        receiver: StorageSCP | None = None,
        on_report: ReportCallback | None = None,
        progress: Progress | None = None,
        metrics: Metrics | None = None,
        audit: NullAuditLog | None = None,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.config = config
        self.store = store
        self.xnat = xnat
        self.receiver = receiver
        self.workers: WorkerPool | None = None  # worker processes for C-GET and relabeling (service sets it)
        self.pacs_clients: dict[str, PacsClient] = {}
        self.on_report = on_report
        self.progress = progress or Progress()
        self.metrics = metrics or Metrics()
        self.audit = audit or NullAuditLog()
        self.stopping = threading.Event()  # set on SIGTERM: stop between steps, resume later
        self.clock = clock
        self.staging_root = Path(config.state_dir) / "staging"
        self._report_lock = threading.Lock()
        self._last_report = 0.0

    # ------------------------------------------------------------------ public API

    def client(self, pacs: PacsConfig) -> PacsClient:
        if pacs.name not in self.pacs_clients:
            self.pacs_clients[pacs.name] = PacsClient(pacs)
        return self.pacs_clients[pacs.name]

    def run(self, run: JobRun) -> JobState:
        """Run a job to a final state (or WAITING); safe to call again after a crash."""
        self.store.set_job_state(run.job_id, JobState.RUNNING, "running")
        self.progress.add(rows_total=len(run.rows))
        try:
            if run.mode is JobMode.PREVIEW:
                self._query_and_decide(run, submit=None)
            else:
                with _StudyPools(self, run) as pools:
                    for study_id in self._resumable_studies(run.job_id):
                        pools.submit(study_id)
                    self._query_and_decide(run, submit=pools.submit)
        except StopRequested as exc:  # the job is not over: it resumes from the store later
            if isinstance(exc, WindowClosed):
                state = JobState.WAITING
                message = f"{exc}; the job continues when the PACS is available again"
            else:
                state = JobState.RUNNING
                message = "interrupted by a service stop; it resumes when the service starts again"
            self.store.set_job_state(run.job_id, state, message)
            self._report(run.job_id, final=True)
            return state
        except CancelledError:
            self._cancel_rest(run.job_id)
        state = self.store.derive_job_state(run.job_id)
        self.store.set_job_state(run.job_id, state, _job_message(self.store, run.job_id))
        progress = self.store.job_progress(run.job_id)
        self.audit.job_finished(run.job_id, state=state, counts={**progress.rows, **progress.studies})
        self._report(run.job_id, final=True)
        return state

    # ------------------------------------------------------------------ query and decide

    def _query_and_decide(self, run: JobRun, submit: Callable[[int], None] | None) -> None:
        """Query rows concurrently; decide them strictly in line order (first row wins)."""
        unqueried = {r.line for r in self.store.pending_rows(run.job_id)}
        pending = [r for r in run.rows if r.line in unqueried]
        claimed = self.store.claimed_studies(run.job_id)  # study_uid -> line, from earlier runs
        client = self.client(run.pacs)
        workers = self._concurrency(run)
        with ThreadPoolExecutor(workers, thread_name_prefix=f"query-{run.pacs.name}") as pool:
            futures = [(row, pool.submit(self._query, client, row, run)) for row in pending]
            for row, future in futures:
                self._check_cancel(run.job_id)
                outcome = future.result()
                match = self._decide(run, row, outcome, claimed)
                self._record_row(run, row, match, outcome, claimed, submit)
                self.progress.add(rows_done=1)
                self._report(run.job_id)

    def _concurrency(self, run: JobRun) -> int:
        """Associations this job may use now: the PACS limit, narrowed by its availability window."""
        return max(1, schedule.allowed_associations(run.pacs, self.clock()))

    def _pace(self, run: JobRun, started: float) -> None:
        """Keep to the PACS window: stop when it closes; honour its utilisation percentage."""
        now = self.clock()
        if not schedule.is_available(run.pacs, now):
            raise WindowClosed(f"PACS '{run.pacs.name}' availability window closed")
        pause = schedule.utilisation_pause(run.pacs, now, time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)

    def _query(self, client: PacsClient, row: CsvRow, run: JobRun) -> RowCandidates | DqrError:
        started = time.monotonic()
        with self.metrics.timed(run.pacs.name, "query"):
            outcome = _safe_query(client, row, run.project)
        self._pace(run, started)
        if isinstance(outcome, DqrError):
            self.metrics.failed("query", outcome)
        return outcome

    def _decide(
        self,
        run: JobRun,
        row: CsvRow,
        outcome: RowCandidates | DqrError,
        claimed: dict[str, int],
    ) -> RowMatch:
        if isinstance(outcome, DqrError):
            return RowMatch(row.line, RowStatus.ERROR, str(outcome))
        match = verify.decide_row(
            row,
            outcome.studies,
            claimed,
            multiple_matches=run.project.multiple_matches,
            dropped=outcome.dropped,
        )
        limit = run.project.max_studies
        if match.status is RowStatus.MATCHED and len(claimed) + len(match.studies) > limit:
            return RowMatch(row.line, RowStatus.ERROR,
                            f"the job would exceed the project's limit of {limit} studies per job; "
                            "nothing imported for this row. Split the CSV, or ask the admins")
        return match

    def _record_row(
        self,
        run: JobRun,
        row: CsvRow,
        match: RowMatch,
        outcome: RowCandidates | DqrError,
        claimed: dict[str, int],
        submit: Callable[[int], None] | None,
    ) -> None:
        """Persist the row's decision and its studies in one step, then hand studies on."""
        studies: list[NewStudy] = []
        if match.status is RowStatus.MATCHED and isinstance(outcome, RowCandidates):
            for study in match.studies:
                claimed[study.study_instance_uid] = row.line
                studies.append(_new_study(run.project, match, outcome, study))
        # A preview records its matches too (for the report); only an import hands them on.
        records = self.store.record_row(run.job_id, match, studies)
        log.info("job %s line %d: %s (%d studies)", run.job_id, row.line, match.status.value,
                 len(match.studies))
        if isinstance(outcome, DqrError):
            self.audit.failure(run.job_id, kind="query", message=str(outcome), line=row.line,
                               phi=[*row.query.values(), *row.relabel.values()])
        else:
            self.audit.query(run.job_id, line=row.line, criteria=row.query, pacs=run.pacs.name,
                             counts={"candidates": len(outcome.studies) + outcome.dropped,
                                     "matched": len(match.studies), "dropped": outcome.dropped})
        if submit is not None:
            for record in records:
                self.progress.add(studies_total=1)
                submit(record.id)

    # ------------------------------------------------------------------ study processing

    def _resumable_studies(self, job_id: str) -> list[int]:
        return [s.id for s in self.store.unfinished_studies(job_id)]

    def retrieve_study(self, run: JobRun, study_id: int) -> bool:
        """PENDING/RETRIEVING → RETRIEVED. Returns False when the study did not get there."""
        record = self.store.get_study(study_id)
        if record.state not in (StudyState.PENDING, StudyState.RETRIEVING):
            return True
        self._check_cancel(run.job_id)
        row = _row_by_line(run.rows, record.line)
        if _has_series_filter(run.project) and not record.series_uids:
            self._finish(record, StudyState.SKIPPED,
                         "every series of the study is excluded by the project's series filter")
            return False
        if not run.reimport and self._landed_before(run, row, record):
            return False
        staging = self._staging_dir(run.job_id, record.study_uid)
        raw = staging / "raw"
        shutil.rmtree(staging, ignore_errors=True)  # what an earlier try left (out/, study.zip) too
        try:
            raw.mkdir(parents=True)
        except OSError as exc:
            self._fail_or_retry(run, record, StudyState.PENDING, self._disk_error(exc))
            return False
        record = self.store.set_study_state(record.id, StudyState.RETRIEVING, staging_dir=str(staging))
        started = time.monotonic()
        try:
            with self.metrics.timed(run.pacs.name, run.pacs.retrieve.value):
                result = self._retrieve(run, record, raw)
        except PacsError as exc:
            self.metrics.failed("retrieve", exc)
            self._fail_or_retry(run, record, StudyState.PENDING, self._full_staging(exc) or exc)
            return False
        self.metrics.moved("retrieved", run.pacs.name, result.received,
                           sum(f.stat().st_size for f in result.files))
        record = self.store.set_study_state(
            record.id, StudyState.RETRIEVED, received=result.received,
            expected=record.expected if record.expected is not None else result.expected)
        log.info("job %s line %d: study %s retrieved, %d of %s instances", run.job_id, record.line,
                 phi_hash(record.study_uid), result.received, record.expected or result.expected)
        self.audit.study_retrieved(run.job_id, line=record.line, study_uid=record.study_uid,
                                   counts={"expected": record.expected or 0, "received": result.received,
                                           "failed": result.failed})
        self._pace(run, started)
        return True

    def _landed_before(self, run: JobRun, row: CsvRow, record: StudyRecord) -> bool:
        """Skip a study an earlier job already landed in this project under the same labels."""
        try:
            labels = predict_labels(run.project.name, row, record.info, record.session_suffix)
        except LabelError:
            return False  # decided after relabeling, from the DICOM itself
        earlier = self._earlier_landing(run, record, labels)
        if earlier is None:
            return False
        self._finish(record, StudyState.SKIPPED, _already_imported(earlier),
                     prearchive_url=earlier.prearchive_url, labels=labels)
        return True

    def _earlier_landing(self, run: JobRun, record: StudyRecord, labels: XnatLabels) -> StudyRecord | None:
        """The DONE study of another job with this UID and these labels in the project, if any."""
        return self.store.landed(run.project.name, record.study_uid, labels.subject, labels.session,
                                 exclude_job=run.job_id)

    def process_study(self, run: JobRun, study_id: int) -> None:
        """RETRIEVED → RELABELED → UPLOADING → DONE; each step recorded before the next."""
        record = self.store.get_study(study_id)
        row = _row_by_line(run.rows, record.line)
        try:
            if record.state is StudyState.RETRIEVED:
                self._check_cancel(run.job_id)
                record = self._verify_and_relabel(run, row, record)
            if record.state is StudyState.UPLOADING:
                if self._already_landed(run, record):
                    return
                record = self.store.set_study_state(record.id, StudyState.RELABELED)
            if record.state is StudyState.RELABELED:
                # After a failed try (e.g. an upload timeout) the study may have landed anyway.
                unclear = "after an upload without a clear answer"
                if record.attempts and self._already_landed(run, record, unclear):
                    return
                self._upload(run, record)
        except CancelledError:
            raise
        except VerificationError as exc:
            self._finish(record, StudyState.SKIPPED, str(exc))
        except (DqrError, OSError) as exc:
            if isinstance(exc, OSError):
                exc = self._disk_error(exc)
            self.metrics.failed("process", exc)
            current = self.store.get_study(study_id)
            restart = (StudyState.RELABELED
                       if current.state in (StudyState.RELABELED, StudyState.UPLOADING)
                       else StudyState.PENDING)
            self._fail_or_retry(run, current, restart, exc)

    def _verify_and_relabel(self, run: JobRun, row: CsvRow, record: StudyRecord) -> StudyRecord:
        staging = Path(record.staging_dir or self._staging_dir(run.job_id, record.study_uid))
        raw, out = staging / "raw", staging / "out"
        files = sorted(raw.glob("*.dcm"))
        if not files:
            raise PacsError("no instance of the study is on disk any more; retrieving it again",
                            pacs=run.pacs.name)
        if record.unverified:
            self._verify_on_dicom(run, row, record, files)
        if SERIES_DESCRIPTION in record.unverified:
            files = self._filter_series_on_dicom(run, record, files)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        plan = dict(row.relabel)
        self._relabel(files, out, plan)
        values = dicom_files.read_study_values(out / files[0].name)
        labels = _labels(run.project.name, values, record.study_uid, record.session_suffix)
        shutil.rmtree(raw, ignore_errors=True)
        if not run.reimport:
            earlier = self._earlier_landing(run, record, labels)
            if earlier is not None:
                raise VerificationError(_already_imported(earlier))
        return self.store.set_study_state(record.id, StudyState.RELABELED, labels=labels)

    def _verify_on_dicom(
        self, run: JobRun, row: CsvRow, record: StudyRecord, files: Sequence[Path]
    ) -> None:
        """Check the criteria the PACS could neither match nor return, before anything is uploaded."""
        keys = set(record.unverified)
        query = {k: v for k, v in row.query.items() if k in keys}
        sample = files if "ModalitiesInStudy" in keys else files[:1]
        values: dict[str, list[str]] = {}
        for path in sample:
            for key, value in dicom_files.read_study_values(path).items():
                seen = values.setdefault(key, [])
                if value not in seen:
                    seen.append(value)
        merged: dict[str, object] = {k: (v[0] if len(v) == 1 else v) for k, v in values.items()}
        if "Modality" in values:
            merged["ModalitiesInStudy"] = values["Modality"]
        failing = verify.check_dataset_values(query, merged)  # type: ignore[arg-type]
        if failing:
            raise VerificationError(
                "the retrieved DICOM does not match the row's " + ", ".join(failing)
                + f" (PACS '{run.pacs.name}' could neither match nor return it); not imported")

    def _filter_series_on_dicom(self, run: JobRun, record: StudyRecord, files: list[Path]) -> list[Path]:
        """Apply the series filter's description rules where the PACS did not return descriptions."""
        series: dict[str, SeriesInfo] = {}
        of_file: dict[Path, str] = {}
        for path in files:
            values = dicom_files.read_study_values(path)
            uid = values.get("SeriesInstanceUID", "")
            of_file[path] = uid
            series.setdefault(uid, SeriesInfo(uid, series_description=values.get("SeriesDescription", ""),
                                              modality=values.get("Modality", "")))
        dropped = {uid for uid, info in series.items() if not verify.series_kept(info, run.project.series)}
        if not dropped:
            return files
        kept = [p for p in files if of_file[p] not in dropped]
        for path in files:
            if of_file[path] in dropped:
                path.unlink()
        note = (f"{len(files) - len(kept)} instance(s) of {len(dropped)} series excluded by the "
                "project's series filter (checked on the retrieved DICOM)")
        if not kept:
            raise VerificationError("every series of the study is excluded by the project's series filter")
        self.store.update_study(record.id, message=note)
        return kept

    def _already_landed(self, run: JobRun, record: StudyRecord, why: str = "after a restart") -> bool:
        """After a crash mid-upload: did the study reach the prearchive? Then never send it again."""
        for entry in self.xnat.find_prearchive(run.project.name, record.study_uid):
            if entry.session == record.session and entry.subject == record.subject:
                self._finish(record, StudyState.DONE, f"uploaded (confirmed in XNAT {why})",
                             prearchive_url=entry.url, uploaded=record.received)
                return True
        return False

    def _upload(self, run: JobRun, record: StudyRecord) -> None:
        self._check_cancel(run.job_id)
        staging = Path(record.staging_dir or "")
        files = sorted((staging / "out").glob("*.dcm"))
        if not files:
            raise PacsError("the relabeled study is no longer on disk; retrieving it again",
                            pacs=run.pacs.name)
        zip_path = staging / "study.zip"
        dicom_files.zip_study(files, zip_path)
        record = self.store.set_study_state(record.id, StudyState.UPLOADING)
        assert record.subject is not None and record.session is not None
        result = self.xnat.import_study(run.project.name, record.subject, record.session, zip_path)
        state, message = StudyState.DONE, "in the prearchive" + (f"; {record.message}" if record.message else "")
        if result.status.upper() == "CONFLICT":
            message = (f"in the prearchive, but XNAT marks it CONFLICT: session label '{record.session}' "
                       f"is already used in project {run.project.name} by another study. In the "
                       "prearchive, archive it under another session label, or delete the session "
                       "that should not be there")
        elif result.status.upper() == "ERROR":
            state = StudyState.FAILED
            message = "XNAT marks the prearchive session ERROR; see the prearchive for details"
        log.info("job %s line %d: study %s uploaded to project %s (%s)", run.job_id, record.line,
                 phi_hash(record.study_uid), run.project.name, result.status)
        self.metrics.moved("uploaded", run.pacs.name, len(files), zip_path.stat().st_size)
        self.audit.study_uploaded(
            run.job_id, line=record.line, study_uid=record.study_uid, project=run.project.name,
            subject=record.subject, session=record.session, instances=len(files),
            prearchive_url=result.prearchive_url, labels_in_clear=run.project.report_patient_identity)
        self._finish(record, state, message, prearchive_url=result.prearchive_url,
                     uploaded=len(files))

    # ------------------------------------------------------------------ helpers

    def _fail_or_retry(
        self, run: JobRun, record: StudyRecord, back_to: StudyState, exc: Exception
    ) -> None:
        """A retriable failure goes back a stage (with a pause); anything else ends the study."""
        attempts = record.attempts + 1
        if isinstance(exc, RetriableError) and attempts < self.max_attempts:
            delay = run.pacs.retry_backoff * attempts
            self.store.record_attempt(record.id, str(exc), state=back_to, retry_in=delay)
            log.info("study %s: attempt %d failed, will retry: %s", phi_hash(record.study_uid),
                     attempts, exc)
            return
        self.store.record_attempt(record.id, str(exc))
        self.audit.failure(run.job_id, kind=type(exc).__name__, message=str(exc), line=record.line,
                           study_uid=record.study_uid, phi=_study_phi(run, record))
        message = str(exc)
        if isinstance(exc, RetriableError):
            message = (f"failed {attempts} times; last error: {exc}. Once the cause is fixed, upload "
                       "the CSV again, renamed or edited (studies already imported are skipped)")
        self._finish(record, StudyState.FAILED, message)

    def _disk_error(self, exc: OSError) -> DqrError:
        """A write into the staging area failed: a study failure (retried if the disk is full)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RetriableError(self._disk_full_message(exc.strerror or str(exc)))
        return DqrError(f"cannot write the study's files under {self.staging_root}: "
                        f"{exc.strerror or exc}; check that directory (state_dir)")

    def _full_staging(self, exc: PacsError) -> RetriableError | None:
        """A failed retrieval into a (nearly) full staging disk is reported as a full disk.

        The receiver may not even see the error: pynetdicom writes incoming data itself, and on
        ENOSPC aborts the association, which the PACS reports as a failed sub-operation.
        """
        try:
            free = shutil.disk_usage(self.staging_root).free
        except OSError:
            return None
        if free >= STAGING_FULL_BELOW:
            return None
        return RetriableError(self._disk_full_message(f"{free // 1024} kB free; {exc}"))

    def _disk_full_message(self, detail: str) -> str:
        return (f"disk full: no space left in the staging directory {self.staging_root} ({detail}); "
                "free space there, or give state_dir a larger disk")

    @property
    def max_attempts(self) -> int:
        return self.config.service.study_attempts

    def _finish(self, record: StudyRecord, state: StudyState, message: str, **fields: object) -> None:
        self.store.set_study_state(record.id, state, message=message, **fields)  # type: ignore[arg-type]
        self._cleanup(record)
        if state is StudyState.FAILED:
            self.progress.add(studies_failed=1)
        self.progress.add(studies_done=1)

    def _cleanup(self, record: StudyRecord) -> None:
        """Free staging disk as soon as a study has reached a final state."""
        if record.staging_dir:
            shutil.rmtree(record.staging_dir, ignore_errors=True)

    def _retrieve(self, run: JobRun, record: StudyRecord, raw: Path) -> RetrieveResult:
        """C-GET runs in a worker process when there are some: receiving is CPU-bound (GIL)."""
        client = self.client(run.pacs)
        series = record.series_uids or None
        if self.workers is not None and run.pacs.retrieve is RetrieveMethod.C_GET:
            return self.workers.retrieve(client, record.study_uid, raw, series_uids=series,
                                         expected=record.expected, receiver=self.receiver)
        return client.retrieve(record.study_uid, raw, series_uids=series, expected=record.expected,
                               receiver=self.receiver)

    def _relabel(self, files: Sequence[Path], out: Path, plan: dict[str, str]) -> None:
        """Relabel into ``out``, in slices on the worker processes when there are some (CPU-bound)."""
        if self.workers is not None:
            self.workers.relabel(files, out, plan)
            return
        for src in files:
            dicom_files.relabel_file(src, out / src.name, plan)

    def _staging_dir(self, job_id: str, study_uid: str) -> Path:
        return self.staging_root / job_id / phi_hash(study_uid, 16)

    def _check_cancel(self, job_id: str) -> None:
        if self.stopping.is_set():
            raise StopRequested(f"job {job_id}: the service is stopping")
        if self.store.is_cancel_requested(job_id):
            raise CancelledError(f"job {job_id} was cancelled")

    def _cancel_rest(self, job_id: str) -> None:
        """Cancel what has not started uploading; an upload in flight must finish and be checked."""
        for record in self.store.studies(job_id):
            if not record.state.final and record.state is not StudyState.UPLOADING:
                self._cleanup(record)
                self.store.set_study_state(record.id, StudyState.CANCELED, message="cancelled")
        self.store.cancel_pending_rows(job_id)

    def _report(self, job_id: str, final: bool = False) -> None:
        if self.on_report is None:
            return
        with self._report_lock:
            now = time.monotonic()
            if not final and now - self._last_report < REPORT_INTERVAL:
                return
            self._last_report = now
        self.on_report(job_id, final)


class WindowClosed(StopRequested):
    """The PACS's availability window closed mid-job: stop between steps; the job WAITs."""


class _StudyPools:
    """Two pools: retrieval (bounded by the PACS limit) feeding processing (relabel + upload)."""

    def __init__(self, pipeline: Pipeline, run: JobRun) -> None:
        self.pipeline = pipeline
        self.run = run
        self.retrieve_pool = ThreadPoolExecutor(
            pipeline._concurrency(run), thread_name_prefix="retrieve")
        self.process_pool = ThreadPoolExecutor(
            max(1, pipeline.config.service.workers), thread_name_prefix="process")
        self.futures: list[Future[None]] = []
        self.lock = threading.Lock()
        self.interrupt: CancelledError | None = None  # the first cancel or stop seen by a worker

    def submit(self, study_id: int) -> None:
        with self.lock:
            self.futures.append(self.retrieve_pool.submit(self._retrieve_then_process, study_id))

    def _retrieve_then_process(self, study_id: int) -> None:
        store = self.pipeline.store
        try:
            while not self.pipeline.retrieve_study(self.run, study_id):
                record = store.get_study(study_id)
                if record.state is not StudyState.PENDING:
                    return  # final (failed, skipped, cancelled)
                _wait_until(record.retry_after)
        except CancelledError as exc:
            self.interrupt = self.interrupt or exc
            return
        with self.lock:
            self.futures.append(self.process_pool.submit(self._process, study_id))

    def _process(self, study_id: int) -> None:
        store = self.pipeline.store
        try:
            self.pipeline.process_study(self.run, study_id)
        except CancelledError as exc:
            self.interrupt = self.interrupt or exc
            return
        record = store.get_study(study_id)
        if record.state is StudyState.PENDING:  # retriable failure after the retrieval: go again
            _wait_until(record.retry_after)
            self.submit(study_id)
        elif record.state is StudyState.RELABELED:  # upload failed, retriable
            _wait_until(record.retry_after)
            with self.lock:
                self.futures.append(self.process_pool.submit(self._process, study_id))

    def __enter__(self) -> "_StudyPools":
        return self

    def __exit__(self, *exc: object) -> None:
        # Wait for every study, including those the pools spawn while we wait.
        while True:
            with self.lock:
                pending = [f for f in self.futures if not f.done()]
            if not pending:
                break
            for future in pending:
                future.result()
        self.retrieve_pool.shutdown()
        self.process_pool.shutdown()
        if self.interrupt is not None:
            raise self.interrupt


def _safe_query(client: PacsClient, row: CsvRow, project: ProjectConfig) -> RowCandidates | DqrError:
    """One row's query; a failure belongs to that row, never to the whole job."""
    try:
        return query_row(client, row, series_filter=project.series if _has_series_filter(project) else None)
    except DqrError as exc:
        return exc
    except ValueError as exc:  # e.g. too many value combinations for one row
        return DqrError(str(exc))


def _has_series_filter(project: ProjectConfig) -> bool:
    f = project.series
    return bool(f.include or f.exclude or f.modality_include or f.modality_exclude)


def _row_by_line(rows: Sequence[CsvRow], line: int) -> CsvRow:
    for row in rows:
        if row.line == line:
            return row
    raise KeyError(f"no CSV row at line {line}")


def _job_message(store: JobStore, job_id: str) -> str:
    progress = store.job_progress(job_id)
    rows = ", ".join(f"{n} {status}" for status, n in sorted(progress.rows.items()) if n)
    studies = ", ".join(f"{n} {state}" for state, n in sorted(progress.studies.items()) if n)
    return f"rows: {rows or 'none'}; studies: {studies or 'none'}"


def _study_phi(run: JobRun, record: StudyRecord) -> list[str]:
    """Values an audit message must not show in clear."""
    info = record.info
    row = _row_by_line(run.rows, record.line)
    return [info.patient_name, info.patient_id, info.patient_birth_date, info.accession_number,
            record.subject or "", record.session or "", *row.query.values(), *row.relabel.values()]


def _wait_until(moment: datetime | None) -> None:
    if moment is None:
        return
    delay = (moment - datetime.now(timezone.utc)).total_seconds()
    if delay > 0:
        time.sleep(min(delay, 600.0))


def predict_labels(project: str, row: CsvRow, info: StudyInfo, suffix: str) -> XnatLabels:
    """The labels a study will get, from its C-FIND answer and the row's relabel plan.

    Used only to skip studies already landed before retrieving them; the labels actually sent
    are made from the relabeled DICOM.
    """
    values = {"PatientName": info.patient_name, "PatientID": info.patient_id,
              "StudyID": info.study_id, "AccessionNumber": info.accession_number, **row.relabel}
    return _labels(project, values, info.study_instance_uid, suffix)


def _labels(project: str, values: Mapping[str, str], study_uid: str, suffix: str) -> XnatLabels:
    """DQR's labels from a study's (relabeled) PatientName, PatientID, StudyID, AccessionNumber."""
    return label_stage.make_labels(
        project,
        patient_name=values.get("PatientName", ""),
        patient_id=values.get("PatientID", ""),
        study_id=values.get("StudyID", ""),
        accession_number=values.get("AccessionNumber", ""),
        study_instance_uid=study_uid,
        suffix=suffix,
    )


def _already_imported(earlier: StudyRecord) -> str:
    return (f"already imported by job {earlier.job_id} (line {earlier.line}); put the CSV "
            "under reimport/ to import it again")


def _new_study(project: ProjectConfig, match: RowMatch, outcome: RowCandidates,
               study: StudyInfo) -> NewStudy:
    """What to retrieve for a matched study: chosen series and the instance count to insist on."""
    uid = study.study_instance_uid
    series = outcome.series.get(uid)
    expected = study.number_of_instances
    series_uids: tuple[str, ...] = ()
    series_expected = study.number_of_series
    if series is not None:
        counts = [s.number_of_instances for s in series]
        total = sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None
        series_expected = len(series)
        if _has_series_filter(project):
            series_uids = tuple(s.series_instance_uid for s in series)
            expected = total
        elif expected is None:
            expected = total
    return NewStudy(
        info=study,
        session_suffix=match.session_suffix.get(uid, ""),
        unverified=tuple(outcome.unverified.get(uid, ())),
        series_uids=series_uids,
        series_expected=series_expected,
        expected=expected,
    )
