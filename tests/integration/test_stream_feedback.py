"""Feedback on a streamed household, through the service (ClusteringApp.record_labels ->
ModelKeeper.refresh(force="labels")), on real stores: the label refit leaves the
household a stream's (its new arrivals keep the streamed confidence maps), and a label
given before the first fit names a person of that fit with the id the caller gave."""

from __future__ import annotations

import time

from services.clustering.app import ClusteringApp
from services.clustering.domain.model import MIN_SESSIONS
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events

T0 = time.time() - 90 * 86400
PERSONS = ("kid", "parent", "teen")


def _app(database) -> ClusteringApp:
    store = ClusteringStore(database)
    store.migrate()
    return ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)


def _stream(app: ClusteringApp, account: str, days: range, seed: int) -> None:
    """The household's events arrive day by day, each day's folded in as it comes."""
    events, _ = household_events(account, PERSONS, days=days.stop, start_ts=T0, seed=seed)
    for day in days:
        lo, hi = T0 + day * 86400, T0 + (day + 1) * 86400
        app.store.ingest([e for e in events if lo <= e.ts < hi])
        app.keeper.refresh(account)


def test_a_label_on_a_streamed_household_keeps_it_streamed(database):
    app = _app(database)
    _stream(app, "acc-s", range(30), seed=4)
    _, envelope = app.keeper.load("acc-s")
    assert envelope.model.streamed
    fit_sessions = envelope.model.fit_sessions
    session = app.store.closed_sessions("acc-s")[-1]
    label = [("acc-s", session.session_id, session.person_id, "feedback:profile_confirmed")]
    assert app.record_labels(label) == (1, 0)
    _, envelope = app.keeper.load("acc-s")
    assert envelope.model.streamed and envelope.model.fit_sessions == fit_sessions
    assert {s.session_id: s.person_id for s in app.store.closed_sessions("acc-s")}[session.session_id] \
        == session.person_id


def test_a_label_before_the_first_fit_keeps_the_callers_person_id(database):
    app = _app(database)
    events, _ = household_events("acc-c", PERSONS, days=20, start_ts=T0, seed=5)
    app.store.ingest([e for e in events if e.ts < T0 + 86400])
    app.keeper.refresh("acc-c")
    first = app.store.closed_sessions("acc-c")
    assert 0 < len(first) < MIN_SESSIONS
    # the caller says the first session is person "p7" (a person the household has not named)
    assert app.record_labels([("acc-c", first[0].session_id, "p7", "feedback:profile_corrected")]) == (1, 0)
    _, envelope = app.keeper.load("acc-c")
    assert envelope.model.active_variant == "cold_start"
    for day in range(1, 20):
        lo, hi = T0 + day * 86400, T0 + (day + 1) * 86400
        app.store.ingest([e for e in events if lo <= e.ts < hi])
        app.keeper.refresh("acc-c")
    _, envelope = app.keeper.load("acc-c")
    assert envelope.model.active_variant == "gmm" and "p7" in envelope.model.person_ids
    stored = {s.session_id: s.person_id for s in app.store.closed_sessions("acc-c")}
    assert stored[first[0].session_id] == "p7"
    assert app.assign("acc-c", session_id=first[0].session_id).probabilities["p7"] == 1.0
