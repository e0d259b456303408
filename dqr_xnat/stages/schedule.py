"""Per-PACS availability windows, as DQR users know them: weekday + hours, concurrency, utilisation.

Pure functions of a clock value, so the rules are tested without waiting for Tuesday night.

* No window configured: the PACS is always available, with its ``max_associations``.
* A window ``from``–``to`` on some days; ``to`` ≤ ``from`` runs past midnight and belongs to the
  day it starts on (``fri 22:00–06:00`` is open on Saturday 03:00).
* Inside a window, at most ``min(window.concurrency, max_associations)`` associations.
* Utilisation X %: after a request that took *d* seconds, wait ``(100/X - 1) × d`` before the next
  one (DQR's rule), so a PACS shared with clinical work keeps most of its capacity.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Sequence

from dqr_xnat.config import WEEKDAYS, AvailabilityWindow, PacsConfig


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _open_in(window: AvailabilityWindow, now: datetime) -> bool:
    start, end = _minutes(window.start), _minutes(window.end)
    minute = now.hour * 60 + now.minute
    today = WEEKDAYS[now.weekday()]
    yesterday = WEEKDAYS[(now.weekday() - 1) % 7]
    if start < end:
        return today in window.days and start <= minute < end
    # Past midnight: the evening part belongs to today, the morning part to yesterday's window.
    return (today in window.days and minute >= start) or (yesterday in window.days and minute < end)


def current_window(windows: Sequence[AvailabilityWindow], now: datetime) -> AvailabilityWindow | None:
    """The window open at ``now`` (the first listed wins), or None when all are closed."""
    for window in windows:
        if _open_in(window, now):
            return window
    return None


def is_available(pacs: PacsConfig, now: datetime) -> bool:
    return not pacs.availability or current_window(pacs.availability, now) is not None


def allowed_associations(pacs: PacsConfig, now: datetime) -> int:
    """How many associations may be open now (0 when the PACS is outside every window)."""
    if not pacs.availability:
        return pacs.max_associations
    window = current_window(pacs.availability, now)
    return 0 if window is None else min(window.concurrency, pacs.max_associations)


def utilisation_pause(pacs: PacsConfig, now: datetime, last_duration: float) -> float:
    """Seconds to wait after a request that took ``last_duration`` seconds."""
    window = current_window(pacs.availability, now) if pacs.availability else None
    if window is None or window.utilisation >= 100:
        return 0.0
    return (100.0 / window.utilisation - 1.0) * max(0.0, last_duration)


def next_opening(pacs: PacsConfig, now: datetime) -> datetime | None:
    """When the PACS next becomes available (now if it is), minute resolution, within a week."""
    if is_available(pacs, now):
        return now
    probe = now.replace(second=0, microsecond=0)
    for _ in range(7 * 24 * 60):
        probe += timedelta(minutes=1)
        if current_window(pacs.availability, probe) is not None:
            return probe
    return None
