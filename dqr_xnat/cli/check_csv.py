"""``dqr-xnat check-csv FILE [--json]``: validate an import CSV without any network or config.

Exit 0 when the file has no error, 1 when it has any, 2 when the file cannot be read. Users run it
before attaching a file, so the output is the same list of problems the service would report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping

from dqr_xnat.model import CsvRow, ParsedCsv
from dqr_xnat.stages.csv_parse import parse_csv

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-csv",
        help="validate an import CSV (no network, no configuration needed)",
        description="Check an import CSV against the CSV language and list every problem. "
        "Exit 0 valid, 1 errors in the file, 2 the file cannot be read.",
    )
    parser.add_argument("file", metavar="FILE", help="the CSV file to check")
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object on stdout"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"dqr-xnat check-csv: cannot read {args.file}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    parsed = parse_csv(data, args.file)
    if args.json:
        print(json.dumps(parsed.to_json()))
    else:
        _write(render(parsed))
    return EXIT_OK if parsed.valid else EXIT_ERRORS


def _write(text: str) -> None:
    """Print even where stdout cannot encode a patient's name (e.g. an ASCII-only terminal)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def _pairs(values: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value if value else chr(34) * 2}" for key, value in values.items())


def render(parsed: ParsedCsv) -> str:
    """The human report: a table of valid rows, then every error, then a one-line verdict."""
    lines = [f"{parsed.file} ({parsed.encoding})"]
    if parsed.rows:
        lines += ["", *_table(parsed.rows)]
    if parsed.errors:
        lines += ["", "Errors:", *(f"  {problem}" for problem in parsed.errors)]
    n_rows, n_errors = len(parsed.rows), len(parsed.errors)
    verdict = "valid" if parsed.valid else f"INVALID: {n_errors} error{'s' * (n_errors != 1)}"
    lines += ["", f"{verdict}; {n_rows} valid row{'s' * (n_rows != 1)}"]
    return "\n".join(lines)


def _table(rows: tuple[CsvRow, ...]) -> list[str]:
    cells = [(str(r.line), _pairs(r.query), _pairs(r.relabel)) for r in rows]
    heads = ("LINE", "QUERY", "RELABEL")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return [
        "  ".join(c.ljust(w) if i < 2 else c for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in (heads, *cells)
    ]
