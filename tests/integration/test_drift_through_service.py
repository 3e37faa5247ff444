"""Drift and refit-on-drift through the running clustering service (real gRPC server,
background model refresh, privacy for consent and data keys): events arrive a couple
of days at a time, as a household's devices send them, and nothing calls Refit.

* A member joining: the model's person count follows (1 -> 2), the service reports the
  change as a drift event (GetHousehold.drift_events, hearth_drift_events_total) and
  the household's sessions of the newcomer go to the new person.
* A member's habits shifting: the detector's alarm makes the service refit the
  household (hearth_model_refits_total{reason="drift"}, last_refit moves), and the
  member's sessions after the shift still go to one person."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.clustering.modeling import DRIFT_EVENTS, REFITS
from tests.helpers.households import household_events, week_start_days_ago
from tests.integration.test_clustering_grpc import NOWHERE, _pb, call

T0 = week_start_days_ago(120)
DAY = 86400


@pytest.fixture
def stub(start_service):
    privacy, _ = start_service("privacy")
    _, channel = start_service("clustering", privacy_addr=f"127.0.0.1:{privacy.port}", feedback_addr=NOWHERE)
    return cpb_grpc.ClusteringServiceStub(channel)


def _send(stub, events) -> None:
    response = call(stub.IngestEvents, iter([cpb.IngestEventsRequest(events=[_pb(e) for e in events])]))
    assert response.accepted == len(events)


def _settled(stub, account: str, timeout_s: float = 120.0) -> cpb.GetHouseholdResponse:
    """The household once the background refresh has caught up: the service says its
    assignments have settled (what a caller is told to wait for, docs/operations.md)."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id=account, max_sessions=10_000))
        if h.model_version > 0 and h.status.settled:
            return h
        assert time.monotonic() < deadline, f"model of {account} did not catch up: {h.status}"
        time.sleep(0.2)


def _stream(stub, account: str, persons, first_day: int, last_day: int, change=None):
    """Events of ``persons`` two days at a time, each batch settled before the next."""
    for day in range(first_day, last_day, 2):
        events, _ = household_events(account, persons, days=2, start_ts=T0 + day * DAY, seed=day)
        _send(stub, [change(e) for e in events] if change else events)
        _settled(stub, account)


def test_a_member_joining_is_found_and_reported_as_drift(stub):
    account = "acc-join"
    composition_before = DRIFT_EVENTS.labels("composition")._value.get()
    events, _ = household_events(account, ("parent",), days=40, start_ts=T0, seed=1)
    _send(stub, events)
    alone = _settled(stub, account)
    assert alone.status.persons == 1 and not alone.drift_events

    _stream(stub, account, ("parent", "kid"), 40, 80)
    joined = _settled(stub, account)
    assert joined.status.persons == 2
    reported = [d for d in joined.drift_events if d.refit_triggered]
    assert reported and {d.drift_type for d in reported} & {"composition"}
    assert DRIFT_EVENTS.labels("composition")._value.get() > composition_before
    kid = {s.person_id for s in joined.sessions if s.device_id == "tablet-1" and s.start.seconds > T0 + 70 * DAY}
    parent = {s.person_id for s in joined.sessions if s.device_id == "tv-1"}
    assert len(kid) == 1 and kid.isdisjoint(parent)          # the newcomer is a person of their own


def test_a_newcomer_on_a_shared_tv_is_found_within_30_sessions_and_ids_stay(stub):
    """Two members (the parent on the TV, the kid on a tablet) for 40 days, then a
    grandparent starts watching the parent's TV in the mornings. No new device says
    so: the model's newcomer test must find them while the events stream in. Through
    the service: a composition drift event no later than the 30th session after the
    grandparent's first, three persons, the parent's and the kid's ids unchanged, and
    the grandparent's later sessions a person of their own."""
    account = "acc-newcomer"
    events, truth = household_events(account, ("parent", "kid"), days=40, start_ts=T0, seed=3)
    _send(stub, events)
    two = _settled(stub, account)
    assert two.status.persons == 2 and not two.drift_events
    parent = {s.person_id for s in two.sessions if s.device_id == "tv-1"}
    kid = {s.person_id for s in two.sessions if s.device_id == "tablet-1"}
    assert len(parent) == len(kid) == 1 and parent != kid

    starts = []
    for day in range(40, 64, 2):
        batch, day_truth = household_events(account, ("parent", "kid", "grandparent"), days=2,
                                            start_ts=T0 + day * DAY, seed=100 + day)
        starts += day_truth
        _send(stub, batch)
        _settled(stub, account)
    after = _settled(stub, account)
    starts.sort(key=lambda t: t[1])
    first_new = next(i for i, (who, _) in enumerate(starts) if who == "grandparent")
    deadline = starts[min(first_new + 30, len(starts) - 1)][1]
    joins = [d for d in after.drift_events if d.drift_type == "composition" and d.refit_triggered]
    assert joins, "the newcomer was not reported"
    assert starts[first_new][1] - 60 <= min(d.detected_at.seconds for d in joins) <= deadline
    assert after.status.persons == 3
    late = T0 + 56 * DAY
    by_person = {}
    for s in after.sessions:
        if s.start.seconds > late:
            hour = ((s.start.seconds - T0) % DAY) / 3600   # start_ts + hour (households.py)
            who = "grandparent" if s.device_id == "tv-1" and hour < 15 else (
                "parent" if s.device_id == "tv-1" else "kid")
            by_person.setdefault(who, []).append(s.person_id)
    assert set(by_person["parent"]) == parent and set(by_person["kid"]) == kid   # ids stay
    newcomer = by_person["grandparent"]
    top = max(set(newcomer), key=newcomer.count)
    assert top not in parent | kid and newcomer.count(top) >= 0.8 * len(newcomer)


def test_habits_shifting_trigger_a_refit_through_the_service(stub):
    account = "acc-shift"
    refits_before = REFITS.labels("drift")._value.get()
    events, _ = household_events(account, ("parent",), days=40, start_ts=T0, seed=1)
    _send(stub, events)
    before = _settled(stub, account)
    assert before.status.persons == 1 and not before.drift_events

    # Same person, same TV: ten hours earlier, other genres, teen-rated titles.
    def shifted(e):
        return replace(e, ts=e.ts - 10 * 3600, genres=("comedy", "documentary"), maturity="teen")

    _stream(stub, account, ("parent",), 40, 80, change=shifted)
    after = _settled(stub, account)
    alarms = [d for d in after.drift_events if d.refit_triggered]
    assert alarms, "the habit shift raised no drift alarm"
    assert REFITS.labels("drift")._value.get() > refits_before
    first_alarm = min(d.detected_at.seconds for d in alarms)
    assert after.status.last_refit.ToNanoseconds() > before.status.last_refit.ToNanoseconds()
    late = {s.person_id for s in after.sessions if s.start.seconds > max(first_alarm, T0 + 60 * DAY)}
    assert len(late) == 1                                   # the shifted member is one person
