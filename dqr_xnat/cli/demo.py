"""``dqr-xnat demo``: run one job end to end on the embedded defaults (qrscp + XNAT emulator)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dqr_xnat.model import JobState


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a job end to end with an embedded PACS and XNAT emulator")
    p.add_argument("--workdir", default="demo-state",
                   help="directory for the demo's PACS, XNAT emulator and state (wiped first)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dqr_xnat.demo import run_demo

    result = run_demo(Path(args.workdir).resolve(), out=sys.stdout)
    return 0 if result.state in (JobState.DONE, JobState.FAILED) and result.prearchive else 1
