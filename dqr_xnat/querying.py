"""One CSV row -> the studies it really matches on one PACS (queries plus our own check).

The PACS's answer is never trusted: every candidate goes through
:func:`dqr_xnat.stages.verify.check_study`, so a PACS that ignores a key (dcmqrscp and qrscp ignore
ModalitiesInStudy; qrscp also PatientBirthDate), matches case-insensitively (Orthanc, qrscp
wildcards) or lacks list matching can never bring in a study the row did not ask for. Candidates
that fail are dropped and counted. Criteria the PACS neither matched nor returned are reported as
``unverified``: they must be checked on the retrieved DICOM before upload.

Series-level answers are fetched for a study only when needed: ModalitiesInStudy is a criterion
and the PACS did not return modalities, or the project filters series.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

from dqr_xnat.adapters.pacs import PacsClient, merge_studies
from dqr_xnat.errors import PacsError
from dqr_xnat.model import CsvRow, SeriesFilter, SeriesInfo, StudyInfo
from dqr_xnat.stages.queries import build_queries
from dqr_xnat.stages.verify import check_study, series_kept

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowCandidates:
    """The studies one row matches on one PACS, after our check.

    ``studies`` passed the check (in the PACS's order); ``dropped`` counts answers that failed it.
    ``unverified`` maps a StudyInstanceUID to the criteria still to be checked on its DICOM.
    ``series`` maps a StudyInstanceUID to its series (after the project's series filter) for the
    studies whose series were fetched; ``series_dropped`` counts series the filter removed.
    """

    studies: tuple[StudyInfo, ...] = ()
    dropped: int = 0
    unverified: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    series: Mapping[str, tuple[SeriesInfo, ...]] = field(default_factory=dict)
    series_dropped: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("unverified", "series", "series_dropped"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def unverified_keys(self) -> tuple[str, ...]:
        """Every criterion unverified for at least one study, in a stable order."""
        return tuple(dict.fromkeys(k for keys in self.unverified.values() for k in keys))


def _needs_series(query: Mapping[str, str], study: StudyInfo, series_filter: SeriesFilter | None) -> bool:
    if series_filter is not None and series_filter != SeriesFilter():
        return True
    return bool(query.get("ModalitiesInStudy", "").strip()) and not study.modalities


def _with_series_facts(study: StudyInfo, series: Sequence[SeriesInfo]) -> StudyInfo:
    """Fill what the PACS left out at study level from its series-level answer (dcmqrscp, qrscp)."""
    counts = [s.number_of_instances for s in series]
    return dataclasses.replace(
        study,
        modalities=study.modalities or tuple(dict.fromkeys(s.modality for s in series if s.modality.strip())),
        number_of_series=study.number_of_series if study.number_of_series is not None else len(series),
        number_of_instances=(
            study.number_of_instances if study.number_of_instances is not None
            else sum(n for n in counts if n is not None) if series and None not in counts else None
        ),
    )


#: The pseudo-criterion "the series filter's description patterns": checked on the retrieved DICOM
#: when the PACS does not return SeriesDescription (dcmqrscp, qrscp).
SERIES_DESCRIPTION = "SeriesDescription"


def _apply_series_filter(
    series: Sequence[SeriesInfo], rules: SeriesFilter
) -> tuple[tuple[SeriesInfo, ...], tuple[SeriesInfo, ...], bool]:
    """(kept, dropped, undecided): a series whose description the PACS did not return is kept
    when its modality passes, and the description rules are applied to its DICOM after retrieval
    (so a "Dose Report" exclusion holds on every PACS)."""
    has_description_rules = bool(rules.include or rules.also_include or rules.exclude)
    modality_only = dataclasses.replace(rules, include=(), also_include=(), exclude=())
    kept: list[SeriesInfo] = []
    dropped: list[SeriesInfo] = []
    undecided = False
    for one in series:
        if has_description_rules and not one.series_description.strip():
            decided = series_kept(one, modality_only)
            undecided = undecided or decided
        else:
            decided = series_kept(one, rules)
        (kept if decided else dropped).append(one)
    return tuple(kept), tuple(dropped), undecided


def query_row(client: PacsClient, row: CsvRow, *, series_filter: SeriesFilter | None = None) -> RowCandidates:
    """Run the row's C-FINDs (one per listed value), merge, and keep what passes our check.

    Raises
    ------
    PacsError
        A query failed (after the adapter's retries), or the row needs too many queries.
    """
    try:
        identifiers = build_queries(row.query)
    except ValueError as exc:
        raise PacsError(str(exc)) from None
    found: list[StudyInfo] = []
    for identifier in identifiers:
        found.extend(client.find_studies(identifier))
    kept: list[StudyInfo] = []
    dropped = 0
    unverified: dict[str, tuple[str, ...]] = {}
    series_of: dict[str, tuple[SeriesInfo, ...]] = {}
    series_dropped: dict[str, int] = {}
    for study in merge_studies(found):
        uid = study.study_instance_uid
        series = client.find_series(uid) if _needs_series(row.query, study, series_filter) else None
        if series is not None:
            study = _with_series_facts(study, series)
        check = check_study(row.query, study, series)
        if not check.ok:
            dropped += 1
            continue
        kept.append(study)
        if check.unverified:
            unverified[uid] = check.unverified
        if series is not None:
            if series_filter is not None:
                chosen, removed, undecided = _apply_series_filter(series, series_filter)
                series_of[uid], series_dropped[uid] = tuple(chosen), len(removed)
                if undecided:
                    unverified[uid] = (*unverified.get(uid, ()), SERIES_DESCRIPTION)
            else:
                series_of[uid] = tuple(series)
    if dropped:
        log.info("line %d: PACS '%s' returned %d candidate(s) failing our check (dropped)",
                 row.line, client.name, dropped)
    return RowCandidates(tuple(kept), dropped, unverified, series_of, series_dropped)


def query_rows(
    client: PacsClient,
    rows: Sequence[CsvRow],
    *,
    concurrency: int | None = None,
    series_filter: SeriesFilter | None = None,
) -> dict[int, RowCandidates | PacsError]:
    """Query every row; a row that fails becomes its error, never the whole job's.

    ``concurrency`` threads (default: the PACS's max_associations) run rows in parallel; the
    association limiter still bounds what reaches the PACS, so more threads only queue.
    """
    workers = max(1, min(concurrency or client.config.max_associations, len(rows) or 1))

    def one(row: CsvRow) -> RowCandidates | PacsError:
        try:
            return query_row(client, row, series_filter=series_filter)
        except PacsError as exc:
            return exc
        except Exception as exc:  # a bug or an unusable answer must not sink the other rows
            log.error("line %d: unexpected %s while querying PACS '%s'", row.line, type(exc).__name__, client.name)
            log.debug("traceback", exc_info=True)  # may hold DICOM values: debug only
            return PacsError(f"unexpected error while querying: {type(exc).__name__}: {exc}",
                             pacs=client.name)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dqr-query") as pool:
        results = list(pool.map(one, rows))
    return {row.line: result for row, result in zip(rows, results)}
