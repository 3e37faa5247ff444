"""What the service stores (GetHousehold, ResolvePersons) and answers (AssignSession by
id) for sessions its streamed model already includes comes through the "settled"
confidence map; the sessions that just arrived keep the at-arrival ("streamed") map.
Real store (SQLite and PostgreSQL), events ingested day by day as a stream."""

from __future__ import annotations

import numpy as np
import pytest

from services.clustering.app import ClusteringApp
from services.clustering.domain import model as M
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events, week_start_days_ago

T0 = week_start_days_ago(90)


@pytest.fixture(params=[False, True], ids=["map", "map-and-household-shift"])
def flat_maps(monkeypatch, request) -> dict[str, float]:
    """Every device map flat at its own value: a stored probability says which map made it.
    With the household shift (DEVICE_CONFIDENCE_SHIFT) a constant one per map, so the
    keeper's stored answers show it was applied to each kind of answer."""
    from scipy.special import expit, logit
    values = {name: 0.51 + 0.04 * i for i, name in enumerate(M.DEVICE_CONFIDENCE_MAPS)}
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_MAPS", {n: ([0.0, 1.0], [v, v]) for n, v in values.items()})
    intercepts = {n: 0.1 * (i + 1) if request.param else 0.0 for i, n in enumerate(values)}
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_SHIFT",
                        {n: (intercepts[n], (0.0,) * len(M.HOUSEHOLD_EVIDENCE)) for n in values})
    return {n: float(expit(logit(v) + intercepts[n])) for n, v in values.items()}


def test_included_sessions_are_stored_and_answered_through_the_settled_map(database, flat_maps):
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)
    events, _ = household_events("acc-s", ("kid", "parent", "teen"), days=40, start_ts=T0, seed=3)
    by_day: dict[int, list] = {}
    for e in events:
        by_day.setdefault(int((e.ts - T0) // 86400), []).append(e)
    last_days = [d for d in sorted(by_day) if d >= 35]
    for day in sorted(by_day):
        if day not in last_days:
            store.ingest(by_day[day])
            app.keeper.refresh("acc-s")
    _, envelope = app.keeper.load("acc-s")
    included_before = envelope.included
    # the last days arrive together (more than a micro-batch): one update folds them in
    store.ingest([e for d in last_days for e in by_day[d]])
    _, envelope = app.keeper.refresh("acc-s")
    sessions = store.closed_sessions("acc-s")
    assert envelope.included == len(sessions) and envelope.model.streamed and envelope.model.n_persons > 1
    assert envelope.model.n_sessions >= M.YOUNG_MODEL_SESSIONS
    view, _ = app.household("acc-s", 1000)
    stored = view.person_probability
    before = [s.session_id for s in sessions[:included_before]]
    new = [s.session_id for s in sessions[included_before:]]
    assert before and new
    np.testing.assert_allclose([stored[s] for s in before], flat_maps["settled"], atol=1e-6)
    np.testing.assert_allclose([stored[s] for s in new], flat_maps["streamed"], atol=1e-6)
    # ResolvePersons serves the stored answer of the session covering the instant
    old = sessions[0]
    (session_id, probs), = app.resolve_persons([("acc-s", old.device_id, old.start_ts + 1)])
    assert session_id == old.session_id
    assert max(probs.values()) == pytest.approx(flat_maps["settled"], abs=1e-6)
    # AssignSession by id: an included session is answered as stored
    assert app.assign("acc-s", session_id=old.session_id).confidence == pytest.approx(flat_maps["settled"])
    # one more day (less than a micro-batch): stored and answered, not yet included
    assert_one_more_day_is_answered_at_arrival(app, store, "acc-s", envelope.included, flat_maps["streamed"])


def assert_one_more_day_is_answered_at_arrival(app: ClusteringApp, store: ClusteringStore, account: str,
                                               included: int, at_arrival: float) -> dict[str, float]:
    """One more day of the household's events (fewer sessions than a micro-batch): its
    sessions are stored and answered through the at-arrival map, not folded in. Returns
    the stored probabilities (GetHousehold)."""
    late = household_events(account, ("kid", "parent", "teen"), days=1, start_ts=T0 + 41 * 86400, seed=4)[0]
    store.ingest(late)
    _, after = app.keeper.refresh(account)
    pending = store.closed_sessions(account)[after.included:]
    assert after.included == included and pending
    view, _ = app.household(account, 1000)
    np.testing.assert_allclose([view.person_probability[s.session_id] for s in pending], at_arrival, atol=1e-6)
    assert app.assign(account, session_id=pending[0].session_id).confidence == pytest.approx(at_arrival)
    return view.person_probability
