"""Entry point: parse arguments, set up logging, dispatch, and map errors to exit codes.

Exit codes: 0 success, 1 the job or file has errors, 2 usage or configuration errors,
3 an unexpected internal error (with a traceback in the log).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from dqr_xnat import __version__
from dqr_xnat.errors import ConfigError, DqrError

log = logging.getLogger("dqr_xnat.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dqr-xnat",
        description="Query a PACS with CSVs attached to XNAT projects and land the studies "
        "in the projects' prearchives.",
    )
    parser.add_argument("--version", action="version", version=f"dqr-xnat {__version__}")
    parser.add_argument(
        "--config", help="YAML configuration file (default: $DQR_XNAT_CONFIG)", default=None
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default WARNING)",
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import dqr_xnat.cli as cli_pkg

    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda i: i.name):
        if info.name in ("main",) or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"dqr_xnat.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dqr_xnat.logs import setup_logging

    setup_logging(args.log_level, json_lines=args.log_json)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dqr-xnat: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DqrError as exc:
        print(f"dqr-xnat: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("dqr-xnat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
