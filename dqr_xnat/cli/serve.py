"""``dqr-xnat serve [--once]``: poll the projects' inboxes, run jobs, write reports."""

from __future__ import annotations

import argparse
import json
import signal

from dqr_xnat.config import load_config
from dqr_xnat.model import JobState
from dqr_xnat.service import Service


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the service: inboxes in XNAT → prearchive + reports")
    p.add_argument("--once", action="store_true",
                   help="one pass: take every new CSV, run every job to a final state (or to a "
                        "closed availability window), write the reports, exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with Service(config) as service:
        signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
        results = service.serve(once=args.once)
    if args.once:
        print(json.dumps({job: state.value for job, state in results.items()}))
        return 0 if all(s in (JobState.DONE, JobState.WAITING) for s in results.values()) else 1
    return 0
