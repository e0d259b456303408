"""``dqr-xnat echo [--pacs NAME]``: C-ECHO the configured PACS (all of them by default).

Prints one line per PACS: its name, ``AE@host:port``, and ``OK`` with the round trip in
milliseconds (association set-up included) or the error saying what to check. Exit 0 when every
PACS answered, 1 when any did not, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dqr_xnat.adapters.pacs import PacsClient
from dqr_xnat.config import load_config
from dqr_xnat.errors import PacsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "echo",
        help="C-ECHO the configured PACS",
        description="Check that each configured PACS accepts our association and answers C-ECHO.",
    )
    parser.add_argument("--pacs", metavar="NAME", help="only this PACS (default: every configured PACS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    names = [args.pacs] if args.pacs else list(config.pacs)
    unknown = [n for n in names if n not in config.pacs]
    if unknown:
        known = ", ".join(config.pacs) or "none"
        print(f"dqr-xnat echo: unknown PACS '{unknown[0]}'; configured: {known}", file=sys.stderr)
        return EXIT_USAGE
    width = max(len(n) for n in names)
    failed = 0
    for name in names:
        client = PacsClient(config.pacs[name])
        try:
            outcome = f"OK {client.echo():.0f} ms"
        except PacsError as exc:
            failed += 1
            outcome = f"FAILED: {exc}"
        print(f"{name.ljust(width)}  {client.address}  {outcome}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK
