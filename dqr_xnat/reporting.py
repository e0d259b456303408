"""Build a job's report from the job store: one line per CSV row and matched study.

The store is the single source of truth, so a report rewritten after a restart says exactly what
a report written without one would have said.
"""

from __future__ import annotations

from dqr_xnat.adapters.store import Job, JobStore, RowRecord, StudyRecord
from dqr_xnat.logs import phi_hash
from dqr_xnat.model import StudyState
from dqr_xnat.stages.report import ReportLine, render_csv, render_json

#: What the report says a study's state means for the user.
STUDY_STATUS = {
    StudyState.PENDING: "queued",
    StudyState.RETRIEVING: "retrieving",
    StudyState.RETRIEVED: "retrieved",
    StudyState.RELABELED: "relabeled",
    StudyState.UPLOADING: "uploading",
    StudyState.DONE: "imported",
    StudyState.SKIPPED: "skipped",
    StudyState.FAILED: "failed",
    StudyState.CANCELED: "canceled",
}


#: Shown instead of a subject label that is the patient's name (no Subject / Relabel Patient Name).
HIDDEN_SUBJECT = "(patient name: hidden)"


def report_lines(store: JobStore, job: Job, *, show_identity: bool = False) -> list[ReportLine]:
    studies: dict[int, list[StudyRecord]] = {}
    for study in store.studies(job.id):
        studies.setdefault(study.line, []).append(study)
    lines: list[ReportLine] = []
    for row in store.rows(job.id):
        row_studies = studies.get(row.line, [])
        if not row_studies:
            lines.append(_row_line(job, row))
        lines.extend(_study_line(job, row, s, show_identity) for s in row_studies)
    return lines


def _row_line(job: Job, row: RowRecord) -> ReportLine:
    status = row.status.value if row.status is not None else "pending"
    reason = row.message or ("not queried yet" if row.status is None else "")
    return ReportLine(line=row.line, status=status, reason=reason, project=job.project)


def _study_line(job: Job, row: RowRecord, study: StudyRecord, show_identity: bool) -> ReportLine:
    info = study.info
    subject = study.subject or ""
    if subject and not show_identity and "PatientName" not in row.relabel:
        subject = HIDDEN_SUBJECT  # without relabeling, XNAT's subject label IS the patient name
    if job.mode.value == "preview":
        status, reason = "matched", "preview: nothing retrieved"
    else:
        status = STUDY_STATUS[study.state]
        reason = study.message or study.last_error or row.message
        if study.state is not StudyState.DONE and study.attempts and study.last_error:
            reason = f"{reason} (attempts: {study.attempts}; last error: {study.last_error})" \
                if study.last_error not in reason else reason
    return ReportLine(
        line=row.line,
        status=status,
        reason=reason,
        study_date=info.study_date,
        modalities="\\".join(info.modalities),
        accession=info.accession_number,
        series_expected=study.series_expected,
        instances_expected=study.expected,
        instances_received=study.received,
        instances_uploaded=study.uploaded,
        project=study.xnat_project or job.project,
        subject=subject,
        session=study.session or "",
        prearchive_url=study.prearchive_url or "",
        study_uid_hash=phi_hash(study.study_uid),
        patient_name=info.patient_name,
        patient_id=info.patient_id,
    )


def render_report(store: JobStore, job_id: str, *, show_identity: bool) -> tuple[str, str]:
    """The report as (CSV text, JSON text)."""
    job = store.get_job(job_id)
    if job is None:
        raise KeyError(job_id)
    lines = report_lines(store, job, show_identity=show_identity)
    progress = store.job_progress(job_id)
    info = {**job.to_json(), "rows": dict(progress.rows), "studies": dict(progress.studies)}
    return (render_csv(lines, show_identity=show_identity),
            render_json(info, lines, show_identity=show_identity))
