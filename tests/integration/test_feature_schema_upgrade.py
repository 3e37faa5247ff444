"""Sessions stored under feature schema 1 (every unknown genre name pooled in `other`)
are rebuilt from the stored events when a schema-2 service (unknown names hashed into
genre slots) next refreshes the household, and the model fitted on the old vectors is
refitted — on each SQL backend."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from services.clustering.domain import features as F
from services.clustering.domain.sessions import build_sessions
from services.clustering.modeling import REFITS, ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events, week_start_days_ago

T0 = week_start_days_ago(40)


def test_schema_1_sessions_are_rebuilt_and_the_model_refitted(database):
    events, _ = household_events("acc-v1", ("parent", "teen"), days=20, start_ts=T0, seed=3)
    # the teen's phone also reports house names the vocabulary does not know
    events = [replace(e, genres=("anime", "k_drama")) if e.device_id == "phone-1" and i % 2 else e
              for i, e in enumerate(events)]
    old = ClusteringStore(database, vocabulary=F.GenreVocabulary(unknown="other"))
    old.migrate()
    old.ingest(events)
    version, envelope = ModelKeeper(old, lambda _a: "gmm").refresh("acc-v1")
    before = {s.session_id: s for s in old.closed_sessions("acc-v1")}
    assert {s.feature_version for s in before.values()} == {1} and envelope is not None

    new = ClusteringStore(database)                      # the default vocabulary: schema 2
    refits = REFITS.labels("feature_schema")._value.get()
    new_version, _ = ModelKeeper(new, lambda _a: "gmm").refresh("acc-v1")
    after = {s.session_id: s for s in new.closed_sessions("acc-v1")}
    assert after.keys() == before.keys()                 # same sessions, same ids
    assert {s.feature_version for s in after.values()} == {F.FEATURE_SCHEMA_VERSION}
    expected = {s.session_id: s.features for d in {e.device_id for e in events}
                for s in build_sessions([e for e in events if e.device_id == d])}
    changed = 0
    for sid, s in after.items():
        assert np.allclose(s.features, expected[sid], atol=1e-6)   # what a schema-2 builder gives
        changed += not np.allclose(s.features, before[sid].features)
    assert 0 < changed < len(after)                      # only sessions with unknown names moved
    assert all(s.person_id for s in after.values())
    assert REFITS.labels("feature_schema")._value.get() == refits + 1 and new_version == version + 1
    assert new.unknown_genres("acc-v1").keys() == {"anime", "k_drama"}  # still reported
    assert new.upgrade_feature_vectors("acc-v1") == 0    # done once
