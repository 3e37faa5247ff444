"""A single viewer stays one person while their household streams in, through the service
(ClusteringApp: events ingested day by day, each day's refresh folding them in as the
keeper does), on real stores; a member who really joins is still found.

The single viewer watches comedies on the TV at 21h for 60 days, then also starts binging a
crime series at the same hours. The stream's newcomer test saw a new person in the binges
(their share rose from nothing after a change point and they are explained better by a
component of their own) and the household showed two persons from then on. A person it
adds must now also differ from everyone else by *when* they watch
(persons.differ_in_hours): the grandparent who starts watching the same TV at 10h does."""

from __future__ import annotations

import numpy as np

from services.clustering.app import ClusteringApp
from services.clustering.domain.events import ViewingEvent
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import week_start_days_ago

T0 = week_start_days_ago(150)
DAY = 86400
# who: (hour, genres, series, titles per session)
VIEWING = {"comedies": (21, ("comedy", "drama"), "sitcom", (1, 3)),
           "binges": (21, ("crime", "thriller"), "noir", (4, 7)),
           "grandparent": (10, ("documentary", "news"), "nature", (2, 4))}


def _events(account: str, who: tuple[str, ...], first_day: int, days: int, seed: int) -> list[ViewingEvent]:
    """Sessions on the shared TV most days, one per kind of viewing in ``who``."""
    rng = np.random.default_rng(seed)
    events = []
    for day in range(first_day, first_day + days):
        for w in who:
            if rng.random() < 0.15:
                continue
            hour, genres, series, (lo, hi) = VIEWING[w]
            t0 = T0 + day * DAY + (hour + rng.normal(0, 0.7)) * 3600
            for i in range(int(rng.integers(lo, hi))):
                events.append(ViewingEvent(f"{account}-{w}-{int(t0)}-{i}", account, "tv-1", "tv", t0 + i * 1500,
                                           "heartbeat", f"{series}-{day}-{i}", f"{series}-s1", genres,
                                           float(rng.uniform(1200, 1400)), "adult"))
    return events


def _stream(database, account: str, events: list[ViewingEvent], days: int) -> tuple[ClusteringApp, list[int]]:
    """Ingest the events a day at a time, refreshing after each day; the household's
    person count as GET /v1/household reports it after every day."""
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)
    counts = []
    for day in range(days):
        lo, hi = T0 + day * DAY, T0 + (day + 1) * DAY
        app.store.ingest([e for e in events if lo <= e.ts < hi])
        app.keeper.refresh(account)
        _, extras = app.household(account, 10_000)
        counts.append(extras.n_persons)
    return app, counts


def test_a_single_viewer_who_starts_binging_stays_one_person(database):
    account = "acc-single"
    events = (_events(account, ("comedies",), 0, 100, seed=1)
              + _events(account, ("binges",), 60, 20, seed=2))
    app, counts = _stream(database, account, events, 100)
    assert set(counts[20:]) == {1}, counts            # one person at every day once fitted
    view, extras = app.household(account, 10_000)
    assert len({s.person_id for s in view.sessions}) == 1
    assert not [d for d in extras.drift_events if d.drift_type == "composition"]


def test_a_grandparent_joining_on_the_same_tv_is_still_found(database):
    account = "acc-joiner"
    events = (_events(account, ("comedies",), 0, 100, seed=1)
              + _events(account, ("grandparent",), 60, 40, seed=3))
    app, counts = _stream(database, account, events, 100)
    assert counts[55] == 1 and counts[-1] == 2
    view, extras = app.household(account, 10_000)
    assert [d for d in extras.drift_events if d.drift_type == "composition"]
    mornings = [s.person_id for s in view.sessions if s.start_ts - T0 > 60 * DAY
                and ((s.start_ts - T0) % DAY) / 3600 < 15]
    evenings = {s.person_id for s in view.sessions if ((s.start_ts - T0) % DAY) / 3600 >= 15}
    top = max(set(mornings), key=mornings.count)
    assert top not in evenings and mornings.count(top) >= 0.8 * len(mornings)
