"""Every table of a data service that holds an account id is among the tables its erasure
purges physically and keeps out of PostgreSQL's planner statistics (``_ERASED_TABLES``:
``Database.purge_erased``, ``migrate(personal_tables=...)``; docs/privacy.md §11).
review23: chaos23's ``refits_owed`` (migration 13: an account id and a time) was deleted by
a household erasure but not in the list, so on PostgreSQL its dead tuple and its
``pg_statistic`` sample (the account ids as most-common values) outlived the erasure."""

from __future__ import annotations

import pytest

from services.attribution import store as attribution_store
from services.clustering import store as clustering_store
from services.common.storage.sql import SqliteDatabase
from services.feedback import store as feedback_store


@pytest.mark.parametrize("module,store_class", [(clustering_store, clustering_store.ClusteringStore),
                                                (attribution_store, attribution_store.AttributionStore),
                                                (feedback_store, feedback_store.FeedbackStore)],
                         ids=["clustering", "attribution", "feedback"])
def test_every_table_with_an_account_id_is_a_personal_table(tmp_path, module, store_class):
    db = SqliteDatabase(tmp_path / "s.db")
    try:
        store_class(db).migrate()
        with db.transaction(readonly=True) as tx:
            tables = [r[0] for r in tx.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
            holding = sorted(t for t in tables if "account_id" in {r[1] for r in tx.query(f"PRAGMA table_info({t})")})
    finally:
        db.close()
    assert holding and set(holding) <= set(module._ERASED_TABLES), sorted(set(holding) - set(module._ERASED_TABLES))
