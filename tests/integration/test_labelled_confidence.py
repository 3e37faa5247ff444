"""Feedback that confirms a household's persons (RecordLabels with the ids it answered)
refits the household with those labels; the labels only name the device-first fit's
persons, so every other session keeps the person and probability it had — the
confidence maps included, whose household shift reads the fit's personal-device groups.
Real store, the RecordLabels path (ClusteringApp.record_labels -> a full refit)."""

from __future__ import annotations

import time

import pytest

from services.clustering.app import ClusteringApp
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events

T0 = time.time() - 90 * 86400


def test_confirming_feedback_leaves_the_other_answers_as_they_were(database):
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)
    events, _ = household_events("acc-l", ("kid", "parent", "teen"), days=40, start_ts=T0, seed=3)
    store.ingest(events)
    _, envelope = app.keeper.refresh("acc-l")
    groups = envelope.model.device_group_count
    assert envelope.model.n_persons >= 2 and groups >= 1
    before, _ = app.household("acc-l", 1000)
    person_of = {s.session_id: s.person_id for s in before.sessions}
    # one session of each person confirmed with the id it was answered with
    confirmed = {}
    for s in before.sessions:
        confirmed.setdefault(s.person_id, s.session_id)
    labels = [("acc-l", sid, pid, "feedback:profile_confirmed") for pid, sid in confirmed.items()]
    assert app.record_labels(labels) == (len(labels), 0)
    _, envelope = app.keeper.load("acc-l")
    assert envelope.model.device_group_count == groups
    after, _ = app.household("acc-l", 1000)
    others = [s for s in after.sessions if s.session_id not in confirmed.values()]
    assert others and all(s.person_id == person_of[s.session_id] for s in others)
    for s in others:
        assert after.person_probability[s.session_id] == pytest.approx(before.person_probability[s.session_id],
                                                                       abs=1e-6)
