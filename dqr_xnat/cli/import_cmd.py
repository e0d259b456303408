"""``dqr-xnat import --project P FILE [--pacs NAME]``: the whole path for a local CSV."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from dqr_xnat.config import load_config
from dqr_xnat.model import JobMode, JobState
from dqr_xnat.pipeline import Progress
from dqr_xnat.service import Service


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="validate, query, retrieve, relabel and upload a local CSV")
    p.add_argument("--project", required=True, help="XNAT project ID that receives the studies")
    p.add_argument("--pacs", help="PACS name (default: the project's default PACS)")
    p.add_argument("--reimport", action="store_true", help="import studies an earlier job landed")
    p.add_argument("--report", help="report path without extension (default: next to FILE)")
    p.add_argument("file", help="the CSV file")
    p.set_defaults(func=run)


def _progress_line(progress: Progress, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        sys.stderr.write(f"\rrows {progress.rows_done}/{progress.rows_total}  studies "
                         f"{progress.studies_done}/{progress.studies_total} "
                         f"({progress.studies_failed} failed)   ")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"dqr-xnat import: {path}: no such file", file=sys.stderr)
        return 2
    config = load_config(args.config)
    progress = Progress()
    stop = threading.Event()
    if sys.stderr.isatty():
        threading.Thread(target=_progress_line, args=(progress, stop), daemon=True).start()
    report = Path(args.report) if args.report else None
    try:
        with Service(config, progress=progress) as service:
            job = service.import_local(args.project, path, pacs=args.pacs, mode=JobMode.IMPORT,
                                       reimport=args.reimport, report_base=report)
            base = service.target(job).base
    finally:
        stop.set()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(open(base + ".report.csv", encoding="utf-8").read(), end="")
    print(f"job {job.id}: {job.state.value}: {job.message}")
    print(f"report: {base}.report.csv and {base}.report.json")
    return 0 if job.state is JobState.DONE else 1
