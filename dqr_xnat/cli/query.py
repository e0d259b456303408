"""``dqr-xnat query --project P FILE [--pacs NAME] [--json]``: the preview of an import CSV.

Runs every row's C-FINDs against the PACS (the project's default, or ``--pacs``, which the project
must allow), checks the candidates ourselves, applies the 0/1/N policy of csv-language.md, and
prints the outcome per row. Nothing is retrieved. Exit 0 when every row ran (``no-match`` is an
outcome, not an error), 1 when the CSV is invalid or any row ended in ``error``, 2 for usage or
configuration errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Mapping

from dqr_xnat.adapters.pacs import PacsClient
from dqr_xnat.config import load_config
from dqr_xnat.errors import PacsError
from dqr_xnat.model import RowMatch, RowStatus, SeriesInfo, StudyInfo
from dqr_xnat.querying import RowCandidates, query_rows
from dqr_xnat.stages.csv_parse import parse_csv
from dqr_xnat.stages.verify import decide_rows

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "query",
        help="preview an import CSV: run its queries, retrieve nothing",
        description="Run the CSV's queries against the project's PACS and show which studies "
        "each row would import. Exit 0 every row ran, 1 CSV errors or a row failed, 2 usage.",
    )
    parser.add_argument("file", metavar="FILE", help="the import CSV")
    parser.add_argument("--project", required=True, help="the XNAT project the CSV is for")
    parser.add_argument("--pacs", metavar="NAME", help="a PACS the project allows (default: its first)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.set_defaults(func=run)


def _usage(message: str) -> int:
    print(f"dqr-xnat query: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    project = config.project(args.project)
    if project is None:
        return _usage(f"project '{args.project}' is not configured; add it under 'projects:'")
    pacs_name = args.pacs or project.default_pacs
    if pacs_name not in project.pacs:
        return _usage(f"project '{project.name}' may use only PACS {', '.join(project.pacs)}, not '{pacs_name}'")
    try:
        with open(args.file, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return _usage(f"cannot read {args.file}: {exc.strerror or exc}")
    parsed = parse_csv(data, args.file, max_rows=project.max_rows)
    if not parsed.valid:
        if args.json:
            print(json.dumps({"pacs": pacs_name, "file": args.file, "rows": [],
                              "errors": parsed.to_json()["errors"]}, ensure_ascii=False))
        else:
            print(f"{args.file}: the CSV has errors; nothing was queried", file=sys.stderr)
            for problem in parsed.errors:
                print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILED
    client = PacsClient(config.pacs[pacs_name])
    results = query_rows(client, parsed.rows, series_filter=project.series)
    matches = decide(parsed.rows, results, multiple_matches=project.multiple_matches)
    candidates = {line: r for line, r in results.items() if isinstance(r, RowCandidates)}
    if args.json:
        print(json.dumps(to_json(pacs_name, matches, candidates), ensure_ascii=False))
    else:
        _write(render(pacs_name, client.address, matches, candidates))
    return EXIT_FAILED if any(m.status is RowStatus.ERROR for m in matches) else EXIT_OK


def decide(
    rows: Any, results: Mapping[int, RowCandidates | PacsError], *, multiple_matches: str
) -> list[RowMatch]:
    """The per-row decisions, with each row's unverified criteria attached and explained."""
    ok = {line: r for line, r in results.items() if isinstance(r, RowCandidates)}
    errors = {line: str(r) for line, r in results.items() if isinstance(r, PacsError)}
    matches = decide_rows(
        rows,
        {line: r.studies for line, r in ok.items()},
        multiple_matches=multiple_matches,
        dropped={line: r.dropped for line, r in ok.items()},
        errors=errors,
    )
    out = []
    for match in matches:
        found = ok.get(match.line)
        wanted = {s.study_instance_uid for s in match.studies}
        keys = tuple(dict.fromkeys(
            k for uid, ks in (found.unverified.items() if found else ()) if uid in wanted for k in ks
        ))
        if keys:
            match = dataclasses.replace(match, unverified=keys, message=(
                f"{match.message}; the PACS could not check {', '.join(keys)}: verified on the "
                "retrieved DICOM before upload"))
        out.append(match)
    return out


def _counts(study: StudyInfo, series: tuple[SeriesInfo, ...] | None) -> tuple[int | None, int | None]:
    """Series and instances that would be imported (after the project's series filter)."""
    if series is None:
        return study.number_of_series, study.number_of_instances
    sizes = [s.number_of_instances for s in series]
    return len(series), (sum(n for n in sizes if n is not None) if all(n is not None for n in sizes) else None)


def _study_json(study: StudyInfo, series: tuple[SeriesInfo, ...] | None) -> dict[str, Any]:
    n_series, n_instances = _counts(study, series)
    return {
        "StudyInstanceUID": study.study_instance_uid,
        "AccessionNumber": study.accession_number,
        "StudyDate": study.study_date,
        "StudyID": study.study_id,
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "ModalitiesInStudy": "\\".join(study.modalities),
        "StudyDescription": study.study_description,
        "series": n_series,
        "instances": n_instances,
    }


def to_json(pacs: str, matches: list[RowMatch], candidates: Mapping[int, RowCandidates]) -> dict[str, Any]:
    rows = []
    for m in matches:
        series = candidates[m.line].series if m.line in candidates else {}
        rows.append({
            "line": m.line,
            "status": m.status.value,
            "message": m.message,
            "studies": [_study_json(s, series.get(s.study_instance_uid)) for s in m.studies],
        })
    return {"pacs": pacs, "rows": rows}


def _write(text: str) -> None:
    """Print even where stdout cannot encode a patient's name (e.g. an ASCII-only terminal)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def _table(header: tuple[str, ...], cells: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *cells)]


def render(pacs: str, address: str, matches: list[RowMatch], candidates: Mapping[int, RowCandidates]) -> str:
    """The human preview: per row its outcome, then its studies as an indented table."""
    lines = [f"PACS {pacs} ({address})", ""]
    for m in matches:
        lines.append(f"line {m.line}: {m.status.value}: {m.message}")
        series = candidates[m.line].series if m.line in candidates else {}
        cells = []
        for s in m.studies:
            n_series, n_instances = _counts(s, series.get(s.study_instance_uid))
            cells.append((s.study_date, s.accession_number, s.study_id, s.patient_id, s.patient_name,
                          "\\".join(s.modalities), s.study_description,
                          "?" if n_series is None else str(n_series),
                          "?" if n_instances is None else str(n_instances)))
        if cells:
            header = ("DATE", "ACCESSION", "STUDY ID", "PATIENT ID", "PATIENT NAME", "MODALITIES",
                      "DESCRIPTION", "SERIES", "INSTANCES")
            lines += _table(header, cells, indent="    ")
    tally: dict[str, int] = {}
    for m in matches:
        tally[m.status.value] = tally.get(m.status.value, 0) + 1
    lines += ["", ", ".join(f"{n} {status}" for status, n in tally.items()) or "no rows"]
    return "\n".join(lines)
