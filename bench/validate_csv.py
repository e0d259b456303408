"""Benchmark: how long parse_csv takes on a generated 10,000-row CSV (target well under 2 s).

Run: .venv/bin/python bench/validate_csv.py [ROWS]. Not a test: timings vary between machines.
"""

from __future__ import annotations

import sys
import time

from dqr_xnat.stages.csv_parse import parse_csv

HEADER = (
    "Accession Number,Study Date,Patient ID,Patient Name,DOB,Modality,Study Instance UID,"
    "Subject,Session,Relabel Patient Name,Relabel Study Date\r\n"
)


def make_csv(rows: int) -> bytes:
    """A realistic mix of cells: most rows use several search and relabel columns."""
    lines = [HEADER]
    for i in range(rows):
        day = 1 + i % 28
        lines.append(
            f"A{i:08d},2021{1 + i % 12:02d}{day:02d}-2021{1 + i % 12:02d}28,PID{i:06d},"
            f'"DOE^J*",19{50 + i % 40}0{1 + i % 9}{day:02d},MR\\CT,1.2.840.10008.{i}.{day},'
            f'Subj{i:05d},Subj{i:05d}_MR1,"ANON^{i}",{"" if i % 3 else "20200101"}\r\n'
        )
    return "".join(lines).encode("utf-8")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    data = make_csv(rows)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        parsed = parse_csv(data, "bench.csv")
        best = min(best, time.perf_counter() - start)
    assert parsed.valid and len(parsed.rows) == rows, parsed.errors[:3]
    print(f"parse_csv: {rows} rows, {len(data) / 1e6:.1f} MB, best of 5: {best:.3f} s")


if __name__ == "__main__":
    main()
