"""Sessions stored under feature schema 1 (every unknown genre name pooled in `other`)
are rebuilt from the stored events when a schema-2 service (unknown names hashed into
genre slots) next refreshes the household, and the model fitted on the old vectors is
refitted — on each SQL backend."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from services.clustering.domain import features as F
from services.clustering.domain.sessions import build_sessions
from services.clustering.modeling import REFITS, ModelKeeper
from services.clustering.store import ClusteringStore
from services.common.storage.sql import PostgresDatabase
from tests.helpers.households import household_events, week_start_days_ago
from tests.helpers.incremental_sessions import assert_sessions_of_stored_events, random_event
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

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


@pytest.mark.parametrize("racer_arrives", ["after_the_upgrade_read_the_events", "before_the_upgrade_commits"])
def test_an_upgrade_racing_an_ingest_of_the_household_loses_no_event_and_fails_neither(postgres_dsn, racer_arrives):
    """``upgrade_feature_vectors`` deletes and re-inserts a household's sessions (same
    ids); an ingest of the household on another replica rebuilds them too (PostgreSQL,
    read committed). Until session 23 the upgrade took no household lock, so:
    an ingest committing after the upgrade read the events and before it deleted the
    sessions had its sessions replaced by the upgrade's, built without its events (stored
    in no session, for good); an ingest arriving after the upgrade deleted and re-inserted
    waited on the deleted rows, then inserted the same session ids again (a primary-key
    violation: the batch failed). Now the upgrade takes the household's lock, like every
    other writer of it, and the ingest runs after it: incrementally, on the upgraded
    sessions."""
    schema = f"upgrade{os.getpid()}_{time.monotonic_ns()}"
    upgrade_db, ingest_db = (PostgresDatabase(postgres_dsn, schema, max_size=2) for _ in range(2))
    try:
        account, rng = "acc-upgrade-race", random.Random(23)
        events = [random_event(rng, account, i, T0 + 60.0 * i) for i in range(30)]
        assert any(set(e.genres) & {"anime", "telenovela"} for e in events)   # names schema 1 pooled
        old = ClusteringStore(upgrade_db, vocabulary=F.GenreVocabulary(unknown="other"))
        old.migrate()
        old.ingest(events)
        upgrader, ingester = ClusteringStore(upgrade_db), ClusteringStore(ingest_db)   # two replicas, schema 2
        batch = [random_event(rng, account, i, T0 + 60.0 * i) for i in (30, 31)]      # extends the session
        ingested: list = []
        transaction = upgrade_db.transaction

        def race(tx) -> None:
            """The other replica's ingest, now; returns once it finished or waits on us."""
            me = tx.query("SELECT pg_backend_pid()")[0][0]

            def ingest() -> None:
                try:
                    ingested.append(ingester.ingest(batch))
                except Exception as exc:   # noqa: BLE001 - asserted below
                    ingested.append(exc)

            racer = threading.Thread(target=ingest)
            racer.start()

            def done_or_blocked() -> bool:
                if not racer.is_alive():
                    return True
                with ingest_db.transaction() as probe:
                    return probe.query("SELECT count(*) FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))",
                                       (me,))[0][0] >= 1
            wait_for(done_or_blocked, what="the ingest finished or waiting for the upgrade")
            threads.append(racer)

        threads: list[threading.Thread] = []

        @contextlib.contextmanager
        def racing(readonly: bool = False):
            with transaction(readonly) as tx:
                if readonly:
                    yield tx
                    return
                query = tx.query

                def query_then_race(sql, params=()):
                    rows = query(sql, params)
                    if racer_arrives.startswith("after_the_upgrade_read") and not threads \
                            and "FROM events" in sql:
                        race(tx)
                    return rows

                tx.query = query_then_race
                yield tx
                if racer_arrives.startswith("before_the_upgrade_commits"):
                    race(tx)

        upgrade_db.transaction = racing
        upgrader.upgrade_feature_vectors(account)
        upgrade_db.transaction = transaction
        assert threads, "the race did not run"
        threads[0].join(SLOW_MACHINE_S)
        assert len(ingested) == 1 and not isinstance(ingested[0], Exception), ingested
        assert ingested[0].accepted == 2
        # Every stored event is in the session the full rebuild would give, at schema 2.
        stored = [s for s in build_sessions(events + batch)]
        with upgrade_db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT session_id, start_ts, end_ts, event_count, feature_version FROM sessions "
                            "WHERE account_id = ? ORDER BY start_ts", (account,))
        assert [(r[0], float(r[1]), float(r[2]), int(r[3]), int(r[4])) for r in rows] == [
            (s.session_id, s.start_ts, s.end_ts, len(s.event_ids), F.FEATURE_SCHEMA_VERSION) for s in stored]
        assert_sessions_of_stored_events(upgrader, account)
    finally:
        upgrade_db.close()
        ingest_db.close()
