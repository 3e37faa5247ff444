"""A household fitted on every session at once (an import of its history; likewise a
refit on drift, labels, erasure or request) answers the sessions that arrive after the
fit through the at-arrival map of a mature model ("streamed"), and the sessions the fit
included through the "fitted" map: stored (GetHousehold) and answered (AssignSession by
id). Real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import numpy as np
import pytest

from services.clustering.app import ClusteringApp
from services.clustering.domain import model as M
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events, week_start_days_ago
from tests.integration.test_settled_confidence import assert_one_more_day_is_answered_at_arrival
from tests.integration.test_settled_confidence import flat_maps  # noqa: F401 - the fixture

T0 = week_start_days_ago(90)


def test_an_imported_household_answers_new_sessions_at_arrival(database, flat_maps):  # noqa: F811
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)
    history, _ = household_events("acc-i", ("kid", "parent", "teen"), days=40, start_ts=T0, seed=3)
    store.ingest(history)
    _, envelope = app.keeper.refresh("acc-i")
    imported = store.closed_sessions("acc-i")
    model = envelope.model
    assert envelope.included == len(imported) and not model.streamed and model.n_persons > 1
    assert model.n_sessions >= M.YOUNG_MODEL_SESSIONS
    # one more day, less than a micro-batch: answered by the fitted model, not included
    stored = assert_one_more_day_is_answered_at_arrival(app, store, "acc-i", envelope.included, flat_maps["streamed"])
    np.testing.assert_allclose([stored[s.session_id] for s in imported], flat_maps["fitted"], atol=1e-6)
    assert app.assign("acc-i", session_id=imported[0].session_id).confidence == pytest.approx(flat_maps["fitted"])
