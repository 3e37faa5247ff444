"""bench.utc_offset moves a household to another UTC offset through the session builder:
the same sessions and truth, only the time features change (a whole week's shift changes
nothing), and its report holds the figures it promises (docs/benchmarks.md, "UTC offset
sensitivity (session 22)")."""

from __future__ import annotations

import numpy as np
import pytest

from bench import utc_offset as U
from bench import worlds as W
from services.clustering.domain import features as F

TIME = np.r_[np.arange(F.HOUR.start, F.HOUR.stop), np.arange(F.DOW.start, F.DOW.stop)]


@pytest.fixture(scope="module")
def household():
    return W.generate(W.TUNING, families=("living_room",), worlds_per_family=1, households_per_world=1,
                      keep_events=True)[0]


def test_no_shift_gives_the_household_back(household):
    same = U.shifted(household, 0)
    np.testing.assert_array_equal(same.features, household.features)
    np.testing.assert_array_equal(same.start_ts, household.start_ts)
    assert same.session_ids == household.session_ids


def test_a_shift_moves_the_time_features_only_and_keeps_sessions_and_truth(household):
    moved = U.shifted(household, 12)
    other = np.setdiff1d(np.arange(F.FEATURE_DIM), TIME)
    np.testing.assert_allclose(moved.start_ts, household.start_ts - 12 * 3600.0)
    np.testing.assert_allclose(moved.end_ts, household.end_ts - 12 * 3600.0)
    np.testing.assert_array_equal(moved.features[:, other], household.features[:, other])
    # 12 hours: the hour of day is on the other side of the circle
    np.testing.assert_allclose(moved.features[:, F.HOUR], -household.features[:, F.HOUR], atol=1e-5)
    assert np.abs(moved.features[:, F.DOW] - household.features[:, F.DOW]).max() > 0.1
    np.testing.assert_array_equal(moved.person, household.person)
    np.testing.assert_array_equal(moved.device_id, household.device_id)
    assert all(a.ts - b.ts == pytest.approx(-12 * 3600.0) for a, b in zip(moved.events, household.events))
    assert moved.session_ids != household.session_ids


def test_a_day_keeps_the_hour_but_not_the_weekday_and_a_week_changes_nothing(household):
    day, week = U.shifted(household, 24), U.shifted(household, 168)
    np.testing.assert_allclose(day.features[:, F.HOUR], household.features[:, F.HOUR], atol=1e-5)
    assert np.abs(day.features[:, F.DOW] - household.features[:, F.DOW]).max() > 0.1
    np.testing.assert_allclose(week.features, household.features, atol=1e-5)


def test_a_household_without_events_is_refused():
    h = W.generate(W.TUNING, families=("living_room",), worlds_per_family=1, households_per_world=1)[0]
    with pytest.raises(ValueError):
        U.shifted(h, 3)


def test_the_report_gives_every_method_per_shift_pooled_and_over_worlds(household, monkeypatch):
    monkeypatch.setattr(U, "generate", lambda split, quick, n=None: [household])
    report = U.run(W.TUNING, shifts=(0, 12), population_prior=False)
    assert report["shifts_h"] == [0, 12] and set(report["by_shift"]) == {"0", "12"}
    for block in report["by_shift"].values():
        assert set(block["pooled"]) == set(U.METHODS)
        for stat in ("median", "min", "max"):
            assert set(block[stat]["hearth"]) == set(U.FIGURES)
        assert list(block["worlds"]) == [household.world_id]
    with pytest.raises(ValueError):
        U.run(W.REPORTING)


def test_with_the_offset_sent_a_shift_changes_no_feature(household):
    """Session 23: events that carry their UTC offset give the session builder the
    household's local time back, so at every shift (sent as its real offset, 21 h as
    UTC-3) the features are h = 0's to the bit, while the timestamps did move."""
    assert [U.real_offset(h) for h in U.SHIFTS_H] == [0, 3, 6, 9, -12, -9, -6, -3]
    for h in U.SHIFTS_H:
        moved = U.shifted(household, U.real_offset(h), send_offset=True)
        assert moved.features.tobytes() == household.features.tobytes(), h
        np.testing.assert_allclose(moved.start_ts, household.start_ts - U.real_offset(h) * 3600.0)
        assert {e.utc_offset_minutes for e in moved.events} == {round(60 * U.real_offset(h))}
    U.assert_features_equal([U.shifted(household, -9, send_offset=True)], [household])
    with pytest.raises(AssertionError):
        U.assert_features_equal([U.shifted(household, -9)], [household])
    with pytest.raises(ValueError):
        U.shifted(household, 15, send_offset=True)     # beyond +14 h: no real offset


def test_the_quiet_hour_anchor_undoes_a_shift_without_the_offset(household):
    """The model-side anchor prototype (session 23, measured, not in the model): each
    household's time features rotated so that its quietest hour lands on a fixed hour,
    so a shift of a few hours that no event reports is undone (up to float rounding)."""
    q = U.quiet_hour(household.features)
    assert U.quiet_hour(U.shifted(household, 3).features) == (q - 3) % 24
    a, b = U.anchored(household, 9.75), U.anchored(U.shifted(household, 3), 9.75)
    assert U.quiet_hour(a.features) == 9.75
    np.testing.assert_allclose(b.features, a.features, atol=1e-5)
    other = np.setdiff1d(np.arange(F.FEATURE_DIM), TIME)
    np.testing.assert_array_equal(a.features[:, other], household.features[:, other])
