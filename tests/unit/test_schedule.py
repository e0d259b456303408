"""Availability windows: DQR's weekday/hours, concurrency and utilisation rules."""

from datetime import datetime

import pytest

from dqr_xnat.config import AvailabilityWindow, PacsConfig
from dqr_xnat.stages.schedule import (
    allowed_associations,
    current_window,
    is_available,
    next_opening,
    utilisation_pause,
)

# 2026-12-04 is a Friday.
FRI_2300 = datetime(2026, 12, 4, 23, 0)
SAT_0300 = datetime(2026, 12, 5, 3, 0)
SAT_0700 = datetime(2026, 12, 5, 7, 0)
MON_1200 = datetime(2026, 12, 7, 12, 0)


def pacs(*windows: AvailabilityWindow, max_associations: int = 4) -> PacsConfig:
    return PacsConfig(name="p", ae_title="P", host="127.0.0.1", port=104, calling_ae_title="ME",
                      max_associations=max_associations, availability=windows)


NIGHT = AvailabilityWindow(days=("fri",), start="22:00", end="06:00", concurrency=2, utilisation=50)
OFFICE = AvailabilityWindow(days=("mon", "tue"), start="08:00", end="18:00", concurrency=8)


def test_no_window_means_always_available_with_full_concurrency():
    p = pacs()
    assert is_available(p, MON_1200) and allowed_associations(p, MON_1200) == 4
    assert utilisation_pause(p, MON_1200, 10.0) == 0.0


def test_window_past_midnight_belongs_to_the_day_it_starts():
    p = pacs(NIGHT)
    assert current_window(p.availability, FRI_2300) is NIGHT
    assert current_window(p.availability, SAT_0300) is NIGHT
    assert current_window(p.availability, SAT_0700) is None
    assert current_window(p.availability, datetime(2026, 12, 4, 3, 0)) is None  # Friday morning


def test_concurrency_is_capped_by_window_and_pacs_limit():
    assert allowed_associations(pacs(NIGHT), FRI_2300) == 2
    assert allowed_associations(pacs(OFFICE, max_associations=3), MON_1200) == 3
    assert allowed_associations(pacs(NIGHT), MON_1200) == 0


@pytest.mark.parametrize("percent, expected", [(100, 0.0), (50, 2.0), (25, 6.0)])
def test_utilisation_pause_follows_dqr_rule(percent, expected):
    window = AvailabilityWindow(days=("fri",), start="00:00", end="24:00", utilisation=percent)
    assert utilisation_pause(pacs(window), FRI_2300, 2.0) == pytest.approx(expected)


def test_next_opening():
    p = pacs(NIGHT)
    assert next_opening(p, FRI_2300) == FRI_2300
    assert next_opening(p, SAT_0700) == datetime(2026, 12, 11, 22, 0)
