"""The service: CSVs in from XNAT project inboxes, jobs through the pipeline, reports back.

``Service`` is the library API behind ``dqr-xnat serve`` and ``dqr-xnat import``; a script can
use it too. One instance owns the job store, one XNAT session, one receiving storage SCP and one
PACS client per PACS, so the association limit of a PACS holds across every job and project.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from dqr_xnat.adapters.pacs import PROCESS_LIMITER, StorageSCP
from dqr_xnat.adapters.receivers import ProcessStorageSCP
from dqr_xnat.adapters.storescp import DcmtkStorageSCP
from dqr_xnat.adapters.workers import WorkerPool, default_processes
from dqr_xnat.adapters.store import Job, JobStore
from dqr_xnat.adapters.xnat import RemoteFile, XnatClient
from dqr_xnat.config import Config, ProjectConfig
from dqr_xnat.errors import DqrError, RetriableXnatError, XnatError
from dqr_xnat.model import JobMode, JobState, ParsedCsv, RetrieveMethod
from dqr_xnat.audit import NullAuditLog, open_audit_log
from dqr_xnat.metrics import Metrics, MetricsServer, state_families
from dqr_xnat.pipeline import JobRun, Pipeline, Progress
from dqr_xnat.project_settings import (
    SETTINGS_PROBLEMS_FILE,
    load_effective_settings,
    render_settings_problems,
)
from dqr_xnat.reporting import render_report
from dqr_xnat.stages import schedule
from dqr_xnat.stages.csv_parse import parse_csv
from dqr_xnat.stages.inbox import CSV_SUFFIX, InboxRequest, interpret

log = logging.getLogger(__name__)

#: Jobs that run at the same time (they share the PACS association limits).
MAX_CONCURRENT_JOBS = 4
LOCAL_RESOURCE = "(local)"


@dataclass(frozen=True)
class ReportTarget:
    """Where a job's report goes: an XNAT resource path, or a local file base."""

    project: str
    resource: str  # LOCAL_RESOURCE for the import command
    base: str  # '<dir>/<name>' (XNAT) or a local path without '.report.csv'


class Service:
    """Poll inboxes, create jobs, run them, publish reports. Use as a context manager."""

    def __init__(
        self,
        config: Config,
        *,
        xnat: XnatClient | None = None,
        store: JobStore | None = None,
        progress: Progress | None = None,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.config = config
        self.store = store or JobStore.in_state_dir(config.state_dir)
        self.xnat = xnat or XnatClient(config.xnat, auto_renew=True)
        self.clock = clock
        self.receiver: StorageSCP | None = None
        self.workers: WorkerPool | None = None
        self.metrics = Metrics()
        self.metrics.add_state_collector(lambda: state_families(self.store, self._open_associations))
        self.metrics_server: MetricsServer | None = None
        self.audit: NullAuditLog = NullAuditLog()
        self.pipeline = Pipeline(config, self.store, self.xnat, on_report=self.publish_report,
                                 progress=progress, metrics=self.metrics, clock=clock)
        self._local_reports: dict[str, Path] = {}
        self._settings_notes: dict[str, str] = {}  # project -> last settings.problems.txt sent
        self._settings: dict[str, ProjectConfig] = {}  # project -> effective settings last read
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Service":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect to XNAT, resume what a crash left behind, start the receiver if needed."""
        self.xnat.connect()
        self.audit = open_audit_log(self.config, actor=f"xnat:{self.xnat.logged_in_user}")
        self.pipeline.audit = self.audit
        reset = self.store.reset_interrupted()
        if reset:
            log.warning("resuming %d studies left unfinished by a stopped process", len(reset))
        processes = self.config.service.processes
        if processes != 0:  # receiving and relabeling are CPU-bound: a process per core
            temp_root = Path(self.config.state_dir) / "staging" / ".incoming"
            self.workers = WorkerPool(processes or default_processes(), temp_root=temp_root).start()
            self.pipeline.workers = self.workers
        if any(p.retrieve is RetrieveMethod.C_MOVE for p in self.config.pacs.values()):
            staging = Path(self.config.state_dir) / "staging"
            if self.config.receiver.engine == "dcmtk":  # storescp forks per association: every core
                self.receiver = DcmtkStorageSCP(self.config.receiver, self.config.pacs.values(), staging)
            elif self.workers is not None:
                self.receiver = ProcessStorageSCP(self.config.receiver, self.config.pacs.values(), staging,
                                                  self.workers)
            else:
                self.receiver = StorageSCP(self.config.receiver, self.config.pacs.values(), staging)
            try:
                self.receiver.start()
            except BaseException:
                self.receiver = None
                if self.workers is not None:
                    self.workers.stop()  # __exit__ will not run: leave no process behind
                raise
            self.pipeline.receiver = self.receiver
        if self.config.service.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.health, host=self.config.service.metrics_host,
                port=self.config.service.metrics_port).start()
            log.info("metrics and health on http://%s:%d/metrics and /health",
                     self.config.service.metrics_host, self.metrics_server.port)

    def request_stop(self) -> None:
        """Stop soon (SIGTERM): running jobs stop between steps and resume at the next start."""
        log.warning("stopping: unfinished jobs resume when the service starts again")
        self._stop.set()
        self.pipeline.stopping.set()

    def close(self) -> None:
        self._stop.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self.workers is not None:
            self.workers.stop()
        self.xnat.close()
        self.store.close()

    def health(self) -> dict[str, object]:
        """Whether XNAT and each PACS answer now (C-ECHO; XNAT's session check), and our receiver runs."""
        report: dict[str, object] = {}
        try:
            self.xnat.projects()
            report["xnat"] = "ok"
        except (DqrError, OSError) as exc:
            report["xnat"] = f"error: {exc}"
        pacs_report = {}
        for pacs in self.config.pacs.values():
            try:
                pacs_report[pacs.name] = f"ok ({self.pipeline.client(pacs).echo():.0f} ms)"
            except (DqrError, OSError) as exc:
                pacs_report[pacs.name] = f"error: {exc}"
        report["pacs"] = pacs_report
        if self.receiver is not None:
            problem = self.receiver.problem()
            report["receiver"] = "ok" if problem is None else f"error: {problem}"
        report["ok"] = (report["xnat"] == "ok" and all(v.startswith("ok") for v in pacs_report.values())
                        and report.get("receiver", "ok") == "ok")
        return report

    def _open_associations(self) -> dict[str, int]:
        return {p.name: PROCESS_LIMITER.open_count(p) for p in self.config.pacs.values()}

    # ------------------------------------------------------------------ inbox

    def projects(self) -> list[str]:
        """Projects served: those the admin config lists, plus discovered ones if it says so."""
        names = list(self.config.projects)
        if self.config.service.discover_projects and self.config.service.serve_unlisted_projects:
            try:
                names += [p for p in self.xnat.projects() if p not in names]
            except XnatError as exc:
                log.warning("cannot list XNAT projects for discovery: %s", exc)
        return names

    def settings_for(self, project: str) -> ProjectConfig | None:
        """The admin's settings for ``project``, narrowed by the owners' XNAT config entry.

        Problems in the entry are written to the project's report resource as
        ``settings.problems.txt`` (removed once the entry is clean), so owners see them in XNAT.
        Raises XnatError when the entry cannot be read: never fall back to wider settings.
        """
        admin = self.config.project(project)
        if admin is None:
            return None
        settings, problems = load_effective_settings(self.xnat, admin)
        self._settings[project] = settings
        note = render_settings_problems(project, problems, settings) if problems else ""
        if self._settings_notes.get(project) != note:
            resource = self.config.service.report_resource
            try:
                if note:
                    self.xnat.upload_file(project, resource, SETTINGS_PROBLEMS_FILE, note.encode(),
                                          overwrite=True)
                else:  # clean now (or first look since start): remove an outdated note
                    self.xnat.delete_file(project, resource, SETTINGS_PROBLEMS_FILE)
                self._settings_notes[project] = note
            except XnatError as exc:
                log.warning("project %s: cannot write %s: %s", project, SETTINGS_PROBLEMS_FILE, exc)
        return settings

    def poll(self) -> list[Job]:
        """One look at every served project's inbox; returns the jobs it created."""
        created: list[Job] = []
        try:
            self.xnat.maybe_renew()
        except XnatError as exc:
            log.warning("XNAT token renewal failed (will retry): %s", exc)
        for project in self.projects():
            try:
                settings = self.settings_for(project)
                if settings is None:
                    continue
                created += self._poll_project(project, settings)
            except XnatError as exc:
                log.warning("project %s: cannot read the inbox resource %s: %s", project,
                            self.config.service.inbox_resource, exc)
        return created

    def _inbox(self, project: str, settings: ProjectConfig) -> list[tuple[RemoteFile, InboxRequest]]:
        """The project's inbox files, in path order, each with what it asks for."""
        try:
            files = self.xnat.list_files(project, self.config.service.inbox_resource)
        except XnatError as exc:
            if exc.status == 404:
                return []  # no inbox resource yet: nothing asked
            raise
        return [(remote, interpret(remote.path, allowed_pacs=settings.pacs, known_pacs=self.config.pacs))
                for remote in sorted(files, key=lambda f: f.path)]

    def _poll_project(self, project: str, settings: ProjectConfig) -> list[Job]:
        created = []
        for remote, request in self._inbox(project, settings):
            if request.kind == "cancel":
                self._cancel_file(project, request.target)
            elif request.kind == "csv":
                job = self._take_csv(project, settings, remote.path, remote.size, request)
                if job is not None:
                    created.append(job)
        return created

    def _cancel_file(self, project: str, target: str) -> None:
        for job in self.store.list_jobs(project=project, path=target):
            if not job.state.final and not job.cancel_requested:
                log.info("job %s: cancel requested from XNAT (%s.cancel)", job.id, target)
                self.store.request_cancel(job.id)
                self.audit.cancel_requested(job.id, by=f"xnat-file:{target}.cancel")
                self.publish_report(job.id, True)

    def _take_csv(self, project: str, settings: ProjectConfig, path: str, size: int,
                  request: InboxRequest) -> Job | None:
        inbox = self.config.service.inbox_resource
        limit = int(self.config.service.max_csv_mb * 1024 * 1024)
        if size > limit:
            digest = f"size:{size}"
            data = b""
        else:
            data = self.xnat.read_file(project, inbox, path, max_bytes=limit)
            digest = hashlib.sha256(data).hexdigest()
        if self.store.job_for_file(project, path, digest) is not None:
            return None
        pacs = request.pacs or settings.default_pacs
        job = self.store.create_job(project=project, resource=inbox, path=path, digest=digest,
                                    mode=request.mode, pacs=pacs, reimport=request.reimport)
        if job is None:
            return None
        log.info("job %s: new %s job for %s/%s in project %s (PACS %s)", job.id, job.mode.value,
                 inbox, path, project, pacs)
        self.audit.job_started(job.id, project=project, file=f"{inbox}/{path}", pacs=pacs, mode=job.mode)
        if size > limit:
            self._reject(job, f"the file is {size / 1048576:.1f} MB; the limit is "
                         f"{self.config.service.max_csv_mb:g} MB. Split it into smaller files")
        elif request.error:
            self._reject(job, request.error)
        else:
            self.admit(job, parse_csv(data, path, max_rows=settings.max_rows))
        return self.store.get_job(job.id)

    def admit(self, job: Job, parsed: ParsedCsv) -> None:
        """Store a parsed CSV's rows; an invalid file fails the job with every problem listed."""
        self.store.set_job_state(job.id, JobState.PENDING, csv_encoding=parsed.encoding)
        if parsed.valid:
            self.store.add_rows(job.id, parsed.rows)
            return
        self.store.add_error_rows(job.id, parsed.errors)
        whole_file = [str(p) for p in parsed.errors if p.line is None]
        self._reject(job, f"the CSV has {len(parsed.errors)} error(s); nothing was queried. "
                     "Fix them (see the lines below) and upload the file again"
                     + ("".join(f"; {m}" for m in whole_file)))

    def _reject(self, job: Job, message: str) -> None:
        self.store.set_job_state(job.id, JobState.FAILED, message)
        self.audit.failure(job.id, kind="rejected", message=message)
        self.publish_report(job.id, True)

    # ------------------------------------------------------------------ running jobs

    def runnable_jobs(self) -> list[Job]:
        return self.store.list_jobs(states=[JobState.PENDING, JobState.RUNNING, JobState.WAITING])

    def run_pending(self) -> dict[str, JobState]:
        """Run every unfinished job to a final state, or to WAITING when its PACS is closed."""
        results: dict[str, JobState] = {}
        jobs = self.runnable_jobs()
        with ThreadPoolExecutor(MAX_CONCURRENT_JOBS, thread_name_prefix="job") as pool:
            futures = {job.id: pool.submit(self.run_job, job.id) for job in jobs}
            for job_id, future in futures.items():
                results[job_id] = future.result()
        return results

    def run_job(self, job_id: str) -> JobState:
        job = self.store.get_job(job_id)
        assert job is not None
        try:
            settings = self.settings_for(job.project)
        except XnatError as exc:
            message = f"cannot read project {job.project}'s dqr-xnat settings in XNAT ({exc}); will retry"
            self.store.set_job_state(job_id, JobState.WAITING, message)
            return JobState.WAITING
        pacs = self.config.pacs.get(job.pacs)
        if settings is None or pacs is None or job.pacs not in settings.pacs:
            message = (f"project {job.project} may no longer use PACS '{job.pacs}' "
                       "(the admin configuration changed); upload the CSV again")
            self.store.set_job_state(job_id, JobState.FAILED, message)
            self.publish_report(job_id, True)
            return JobState.FAILED
        refused = self._refuse_unwritable(job)
        if refused is not None:
            return refused
        now = self.clock()
        if not schedule.is_available(pacs, now):
            opening = schedule.next_opening(pacs, now)
            when = opening.strftime("%a %H:%M") if opening else "unknown"
            self.store.set_job_state(job_id, JobState.WAITING,
                                     f"waiting for PACS '{pacs.name}' availability window (next: {when})")
            self.publish_report(job_id, True)
            return JobState.WAITING
        rows = [r.csv_row() for r in self.store.rows(job_id)]
        run = JobRun(job_id=job_id, project=settings, pacs=pacs, rows=rows, mode=job.mode,
                     reimport=job.reimport)
        try:
            return self.pipeline.run(run)
        except DqrError as exc:
            log.error("job %s failed: %s", job_id, exc)
            self.store.set_job_state(job_id, JobState.FAILED, str(exc))
            self.publish_report(job_id, True)
            return JobState.FAILED

    def _refuse_unwritable(self, job: Job) -> JobState | None:
        """Fail a job before any query when its project cannot take uploads (nothing is pulled
        from the PACS for nothing, nothing lands in Unassigned); None when the project is writable."""
        try:
            self.xnat.ensure_writable(job.project)
            return None
        except RetriableXnatError as exc:
            message = f"cannot check the service's access to project {job.project} ({exc}); will retry"
            self.store.set_job_state(job.id, JobState.WAITING, message)
            return JobState.WAITING
        except XnatError as exc:
            message = (f"{exc}. Nothing was queried or retrieved; once that is fixed, upload the CSV "
                       "again, renamed or edited (an unchanged file is not run twice)")
            self.store.set_job_state(job.id, JobState.FAILED, message)
            self.audit.failure(job.id, kind="not-writable", message=message)
            self.publish_report(job.id, True)  # likely refused too; the job store keeps it (status)
            return JobState.FAILED

    # ------------------------------------------------------------------ reports

    def target(self, job: Job) -> ReportTarget:
        if job.resource == LOCAL_RESOURCE:
            return ReportTarget(job.project, LOCAL_RESOURCE, str(self._local_reports.get(job.id, job.path)))
        base = job.path[: -len(CSV_SUFFIX)] if job.path.lower().endswith(CSV_SUFFIX) else job.path
        return ReportTarget(job.project, self.config.service.report_resource, base)

    def publish_report(self, job_id: str, final: bool) -> None:
        """Rewrite the report (CSV + JSON twin); a failure to write it never fails the job."""
        job = self.store.get_job(job_id)
        if job is None:
            return
        # The settings the job was polled or started with: a report rewrite (every few seconds)
        # need not read the project's XNAT config entry again.
        settings = self._settings.get(job.project)
        if settings is None:
            try:
                settings = self.settings_for(job.project)
            except XnatError:
                settings = None  # cannot tell whether owners narrowed it: show no identity
        show = bool(settings and settings.report_patient_identity)
        csv_text, json_text = render_report(self.store, job_id, show_identity=show)
        target = self.target(job)
        try:
            if target.resource == LOCAL_RESOURCE:
                Path(target.base + ".report.csv").write_text(csv_text, encoding="utf-8")
                Path(target.base + ".report.json").write_text(json_text, encoding="utf-8")
            else:
                self.xnat.upload_file(job.project, target.resource, target.base + ".report.csv",
                                      csv_text.encode("utf-8"), overwrite=True)
                self.xnat.upload_file(job.project, target.resource, target.base + ".report.json",
                                      json_text.encode("utf-8"), overwrite=True)
        except (OSError, DqrError) as exc:
            log.warning("job %s: could not write the report%s: %s", job_id,
                        "" if final else " (will retry)", exc)

    # ------------------------------------------------------------------ loops

    def serve(self, *, once: bool = False) -> dict[str, JobState]:
        """Poll and run. ``once``: one pass that runs every job to a final state, then returns."""
        watcher = threading.Thread(target=self._watch_cancels, name="cancel-watch", daemon=True)
        watcher.start()
        results: dict[str, JobState] = {}
        while True:
            created = self.poll()
            for job in filter(None, (self.store.get_job(j.id) for j in created)):
                if job.state.final:  # rejected or cancelled while being taken in
                    results[job.id] = job.state
            results.update(self.run_pending())
            if once or self._stop.is_set() or self._stop.wait(self.config.service.poll_interval):
                return results

    def _watch_cancels(self) -> None:
        """While jobs run, keep looking for ``.cancel`` files so a user can stop a long job."""
        interval = min(self.config.service.poll_interval, 5.0)
        while not self._stop.wait(interval):
            for project in self.projects():
                settings = self.config.project(project)
                if settings is None:
                    continue
                try:
                    for _remote, request in self._inbox(project, settings):
                        if request.kind == "cancel":
                            self._cancel_file(project, request.target)
                except (DqrError, OSError) as exc:  # one project's trouble must not hide the others'
                    log.debug("cancel watcher, project %s: %s", project, exc)

    # ------------------------------------------------------------------ local import

    def import_local(self, project: str, csv_path: Path, *, pacs: str | None = None,
                     mode: JobMode = JobMode.IMPORT, reimport: bool = False,
                     report_base: Path | None = None) -> Job:
        """The whole path for a local CSV (``dqr-xnat import``); the report is written locally."""
        settings = self.settings_for(project)
        if settings is None:
            raise DqrError(f"project {project} is not in the configuration; ask the admins to add it")
        chosen = pacs or settings.default_pacs
        if chosen not in settings.pacs:
            raise DqrError(f"project {project} may not use PACS '{chosen}'; allowed: "
                           + ", ".join(settings.pacs))
        self.xnat.ensure_writable(project)
        data = csv_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest() + f":{time.time_ns()}"
        job = self.store.create_job(project=project, resource=LOCAL_RESOURCE, path=str(csv_path),
                                    digest=digest, mode=mode, pacs=chosen, reimport=reimport)
        assert job is not None
        self.audit.job_started(job.id, project=project, file=str(csv_path), pacs=chosen, mode=mode)
        base = report_base or csv_path.with_suffix("")
        self._local_reports[job.id] = Path(base)
        self.admit(job, parse_csv(data, str(csv_path), max_rows=settings.max_rows))
        job = self.store.get_job(job.id)
        assert job is not None
        if job.state is not JobState.FAILED:
            self.run_job(job.id)
        result = self.store.get_job(job.id)
        assert result is not None
        return result
