"""A background loop during a database outage logs its failure's traceback once, not
once a pass (services/common/failure_log.py). Until session 21 clustering's model refresh
logged a full traceback for every account it failed to refresh, for as long as the
outage lasted."""

from __future__ import annotations

import logging

from services.clustering.app import ClusteringApp
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from services.common.errors import Unavailable


def test_a_refresh_loop_failing_50_times_logs_one_traceback_and_says_when_it_recovers(database, caplog,
                                                                                       monkeypatch):
    caplog.set_level(logging.INFO, logger="hearth.clustering.app")
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=True)
    try:
        real_transaction = database.transaction
        attempts = []

        def outage(*args, **kwargs):
            attempts.append(1)
            raise Unavailable(f"database unavailable: PoolTimeout: no connection in 3.{len(attempts)} s")

        monkeypatch.setattr(database, "transaction", outage)
        for i in range(50):
            app.schedule_refresh(f"acct-outage-{i}")
        app.drain(120)
        assert len(attempts) >= 50
        logged = [r for r in caplog.records if r.name == "hearth.clustering.app"]
        tracebacks = [r for r in logged if r.exc_info is not None]
        assert len(tracebacks) == 1, [r.getMessage() for r in logged]
        assert "background model refresh failed" in tracebacks[0].getMessage()
        assert len(logged) == 1, [r.getMessage() for r in logged]   # no line per failure either

        monkeypatch.setattr(database, "transaction", real_transaction)
        app.schedule_refresh("acct-outage-0")
        app.drain(120)
        recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
        assert len(recovered) == 1 and recovered[0].startswith(
            "background model refresh recovered after 50 failures"), recovered
    finally:
        app.close()
