"""``dqr-xnat cancel JOB``: stop a job; studies already uploading finish and are checked."""

from __future__ import annotations

import argparse

from dqr_xnat.adapters.store import JobStore
from dqr_xnat.audit import default_actor, open_audit_log
from dqr_xnat.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cancel", help="cancel a job (by id or a unique id prefix)")
    p.add_argument("job")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with JobStore.in_state_dir(config.state_dir) as store:
        job = store.find_job(args.job)
        if job.state.final:
            print(f"job {job.id} already ended ({job.state.value}); nothing to cancel")
            return 0
        store.request_cancel(job.id)
        open_audit_log(config).cancel_requested(job.id, by=f"cli:{default_actor()}")
        print(f"job {job.id}: cancel requested; the service stops it at the next step")
    return 0
