"""``dqr-xnat status [--json]``: jobs, their progress, and what waits for which PACS."""

from __future__ import annotations

import argparse
import json

from dqr_xnat.adapters.store import JobStore
from dqr_xnat.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="list jobs and their progress")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--all", action="store_true", help="include finished jobs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with JobStore.in_state_dir(config.state_dir) as store:
        jobs = store.list_jobs()
        if not args.all:
            jobs = [j for j in jobs if not j.state.final] or jobs[-20:]
        entries = []
        for job in jobs:
            progress = store.job_progress(job.id)
            entries.append({**job.to_json(), "rows": dict(progress.rows),
                            "studies": dict(progress.studies)})
    if args.json:
        print(json.dumps({"jobs": entries}, indent=2))
        return 0
    if not entries:
        print("no jobs")
        return 0
    print(f"{'JOB':8}  {'STATE':9}  {'PROJECT':12}  {'PACS':10}  {'MODE':7}  PROGRESS / MESSAGE  FILE")
    for e in entries:
        studies = ", ".join(f"{n} {s}" for s, n in sorted(e["studies"].items()) if n) or "-"
        print(f"{e['id']:8}  {e['state']:9}  {e['project']:12}  {e['pacs']:10}  {e['mode']:7}  "
              f"studies: {studies}; {e['message']}  {e['path']}")
    return 0
