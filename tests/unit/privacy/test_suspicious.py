from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.privacy.audit.domain import AuditEntry, EventType, Outcome
from services.privacy.audit.suspicious import (
    AlertThreshold,
    DetectorThresholds,
    SecurityEventKind,
    SuspiciousActivityDetector,
)
from tests.unit.privacy.factories import T0


class Stream:
    """Builds entries with increasing seq."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind, principal="ana", resource="", seconds=0.0, role="analyst", **details):
        e = AuditEntry(self.seq, T0 + timedelta(seconds=seconds), kind, principal, role,
                       resource, Outcome.SUCCESS, "", details)
        self.seq += 1
        return e


def test_mass_reads_fire_at_the_distinct_household_threshold():
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(minutes=1),
                                                        distinct_households=5))
    s = Stream()
    # re-reading the same household does not count twice
    assert det.observe_many(s(EventType.READ_HOUSEHOLD, resource="hh0", seconds=i) for i in range(10)) == []
    alerts = [det.observe(s(EventType.READ_HOUSEHOLD, resource=f"hh{i}", seconds=10 + i))
              for i in range(1, 6)]
    assert [len(a) for a in alerts] == [0, 0, 0, 1, 0]  # 5th distinct household fires once
    ev = alerts[3][0]
    assert (ev.kind, ev.principal, ev.count, ev.window) == (
        SecurityEventKind.MASS_HOUSEHOLD_READS, "ana", 5, timedelta(minutes=1))
    assert ev.details()["trigger_seq"] == ev.seq


def test_reads_outside_the_window_do_not_count_and_other_principals_are_separate():
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(seconds=10),
                                                        distinct_households=3))
    s = Stream()
    events = [s(EventType.READ_HOUSEHOLD, resource=f"hh{i}", seconds=20 * i) for i in range(6)]
    events += [s(EventType.READ_HOUSEHOLD, principal=f"p{i}", resource=f"hh{i}", seconds=200)
               for i in range(6)]
    assert det.observe_many(events) == []


def test_auth_failures_fire_rearm_and_fire_again():
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(seconds=60),
                                                        auth_failures=3))
    s = Stream()
    burst1 = [s(EventType.AUTHENTICATION_FAILURE, principal="eve", seconds=i) for i in range(6)]
    alerts = det.observe_many(burst1)
    assert len(alerts) == 1 and alerts[0].kind is SecurityEventKind.REPEATED_AUTH_FAILURES
    assert alerts[0].count == 3 and alerts[0].seq == 2
    # much later: the window emptied, so the rule is armed again
    burst2 = [s(EventType.AUTHENTICATION_FAILURE, principal="eve", seconds=1000 + i) for i in range(3)]
    alerts = det.observe_many(burst2)
    assert len(alerts) == 1 and alerts[0].count == 3


def test_bulk_export_by_count_and_by_records():
    t = DetectorThresholds(window=timedelta(minutes=5), exports=4, export_records=1000,
                           distinct_households=10_000)
    s = Stream()
    det = SuspiciousActivityDetector(t)
    alerts = det.observe_many(s(EventType.EXPORT, resource=f"hh{i}", seconds=i, record_count=1)
                              for i in range(4))
    assert [(a.kind, a.count) for a in alerts] == [(SecurityEventKind.BULK_EXPORT, 4)]
    det = SuspiciousActivityDetector(t)
    alerts = det.observe_many([s(EventType.EXPORT, principal="bob", resource="hh1", record_count=600),
                               s(EventType.EXPORT, principal="bob", resource="hh2", record_count=600)])
    assert [(a.kind, a.count) for a in alerts] == [(SecurityEventKind.BULK_EXPORT, 1200)]
    # a malformed record count does not crash and does not hide the export
    det = SuspiciousActivityDetector(t)
    assert det.observe(s(EventType.EXPORT, resource="hh", record_count="lots")) == []


def test_late_entry_outside_the_window_is_ignored():
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(seconds=10), auth_failures=2))
    s = Stream()
    det.observe(s(EventType.AUTHENTICATION_FAILURE, seconds=100))
    assert det.observe(s(EventType.AUTHENTICATION_FAILURE, seconds=50)) == []
    assert len(det.observe(s(EventType.AUTHENTICATION_FAILURE, seconds=101))) == 1


@given(st.lists(st.integers(0, 300), min_size=1, max_size=60), st.integers(1, 6))
@settings(max_examples=50, deadline=None)
def test_auth_alert_matches_a_brute_force_window_count(offsets, threshold):
    """Alert iff some failure sees >= threshold failures in (t - w, t] (sorted input)."""
    w = timedelta(seconds=30)
    det = SuspiciousActivityDetector(DetectorThresholds(window=w, auth_failures=threshold))
    s = Stream()
    times = sorted(offsets)
    alerts = det.observe_many(s(EventType.AUTHENTICATION_FAILURE, seconds=t) for t in times)
    counts = [sum(1 for u in times[: i + 1] if t - 30 < u <= t) for i, t in enumerate(times)]
    assert (len(alerts) > 0) == any(c >= threshold for c in counts)
    # the first alert is at the first entry reaching the threshold
    if alerts:
        assert alerts[0].seq == next(i for i, c in enumerate(counts) if c >= threshold)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window": timedelta(0)}, "window"),
    ({"distinct_households": 0}, "distinct_households"),
    ({"auth_failures": 1.5}, "auth_failures"),
    ({"exports": True}, "exports"),
    ({"bulk_readers": {"reporting": 0}}, r"bulk_readers\['reporting'\]"),
    ({"bulk_readers": {"reporting": True}}, r"bulk_readers\['reporting'\]"),
    ({"bulk_readers": {"reporting": 1.5}}, r"bulk_readers\['reporting'\]"),
    ({"bulk_readers": {"": 500}}, "non-empty"),
    ({"bulk_readers": ["reporting"]}, "mapping"),
])
def test_invalid_thresholds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectorThresholds(**kwargs)
    with pytest.raises(ValueError, match="entry"):
        SuspiciousActivityDetector().observe("not an entry")


def test_an_entry_dated_ahead_of_the_clock_does_not_make_later_entries_too_late():
    """attack34: the detector's clock was the newest entry time it saw, so one entry dated
    ahead (an appended record; AppendAudit allows 10 minutes of skew) put every later entry
    before the window's cutoff and no rule fired. It now counts as of the wall clock."""
    now = T0 + timedelta(hours=1)
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(minutes=10), distinct_households=5),
                                     clock=lambda: now)
    s = Stream()
    assert det.observe(s(EventType.INGEST, principal="mallory", seconds=3600 + 599)) == []
    alerts = det.observe_many(s(EventType.READ_HOUSEHOLD, principal="eve", resource=f"hh{i}", seconds=3600 - 5 + i)
                              for i in range(5))
    assert [(a.kind, a.principal, a.count) for a in alerts] == [(SecurityEventKind.MASS_HOUSEHOLD_READS, "eve", 5)]


def test_a_configured_bulk_reader_alerts_past_its_own_threshold_and_everyone_else_at_the_default():
    # session 35: HEARTH_AUDIT_BULK_READERS names an internal reporting service's principal
    # with its own threshold — higher, never unlimited; any other principal keeps the default.
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(minutes=10), distinct_households=5,
                                                        bulk_readers={"reporting": 12}))
    s = Stream()
    reporting = [det.observe(s(EventType.READ_HOUSEHOLD, principal="reporting", resource=f"hh{i}", seconds=i,
                               role="service")) for i in range(15)]
    assert [i for i, a in enumerate(reporting) if a] == [11]   # the 12th distinct household, once
    assert (reporting[11][0].principal, reporting[11][0].count) == ("reporting", 12)
    other = [det.observe(s(EventType.READ_HOUSEHOLD, principal="ana", resource=f"hh{i}", seconds=20 + i))
             for i in range(15)]
    assert [i for i, a in enumerate(other) if a] == [4]   # the default, 5
    assert DetectorThresholds().bulk_readers == {}   # none unless the operator names one
    # session 36: whose threshold was crossed travels with the alert (the metric's bounded
    # `threshold` label and the audit entry's details), so an operator tells them apart.
    assert (reporting[11][0].threshold, other[4][0].threshold) == (AlertThreshold.BULK_READER, AlertThreshold.DEFAULT)
    assert (reporting[11][0].details()["threshold"], other[4][0].details()["threshold"]) == ("bulk_reader", "default")


def test_a_bulk_readers_threshold_holds_only_for_the_service_role():
    # review35 R5: API keys and JWT subjects share one namespace of principal ids — a user
    # whose token's sub is the reporting service's name reads under the default, not 12.
    det = SuspiciousActivityDetector(DetectorThresholds(window=timedelta(minutes=10), distinct_households=5,
                                                        bulk_readers={"reporting": 12}))
    s = Stream()
    for start, role in ((0, "analyst"), (3600, "admin")):   # an hour apart: two windows
        as_user = [det.observe(s(EventType.READ_HOUSEHOLD, principal="reporting", resource=f"hh{i}",
                                 seconds=start + i, role=role)) for i in range(8)]
        assert [i for i, a in enumerate(as_user) if a] == [4], role
        assert as_user[4][0].threshold is AlertThreshold.DEFAULT, role
