"""``python -m dqr_xnat.sandbox.xnat_emulator``: run the XNAT emulator in the foreground (demo, manual tests)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from .emulator import XnatEmulator


def _credentials(value: str) -> tuple[str, str]:
    login, sep, password = value.partition(":")
    if not sep or not login or not password:
        raise argparse.ArgumentTypeError(f"expected LOGIN:PASSWORD, got {value!r}")
    return login, password


def _grant(value: str) -> tuple[str, str, str]:
    parts = value.split(":")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected PROJECT:LOGIN:ROLE, got {value!r}")
    return parts[0], parts[1], parts[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dqr_xnat.sandbox.xnat_emulator",
                                     description="Serve an emulated XNAT 1.8 on 127.0.0.1.")
    parser.add_argument("--root", type=Path, help="directory for uploaded files (default: a temporary one)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    parser.add_argument("--user", type=_credentials, action="append", default=[], metavar="LOGIN:PASSWORD",
                        help="a user; the first owns every --project (repeatable)")
    parser.add_argument("--admin", type=_credentials, action="append", default=[], metavar="LOGIN:PASSWORD",
                        help="a site administrator (repeatable)")
    parser.add_argument("--project", action="append", default=[], help="a project ID (repeatable)")
    parser.add_argument("--member", type=_grant, action="append", default=[], metavar="PROJECT:LOGIN:ROLE",
                        help="grant ROLE (owner, member, collaborator) in PROJECT to LOGIN (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="xnat-emulator-"))
    emulator = XnatEmulator(root, port=args.port)
    for login, password in args.user:
        emulator.add_user(login, password)
    for login, password in args.admin:
        emulator.add_user(login, password, admin=True)
    owner = args.user[0][0] if args.user else (args.admin[0][0] if args.admin else None)
    try:
        for project in args.project:
            emulator.add_project(project, owner=owner)
        for project, login, role in args.member:
            emulator.grant(project, login, role)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emulator:
        print(f"XNAT emulator at {emulator.url} (files in {root}); Ctrl-C to stop", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
