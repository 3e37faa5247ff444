"""The off-site ledger export's note in privacy's database (``ledger_exports``, privacy
migration 22): what hearth_ledger_last_export_timestamp_seconds reads. On both backends —
the chart's CronJob exports from PostgreSQL."""

from __future__ import annotations

from services.common.storage.sql import migrate
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.migrations import MIGRATIONS


def test_the_last_ledger_export_is_the_one_read_back(database):
    migrate(database, MIGRATIONS)
    jobs = DeletionJobStore(database)
    assert jobs.last_ledger_export_at() is None   # never exported: the gauge is NaN
    jobs.record_ledger_export(1_796_000_000.25, "e1", 3)
    assert jobs.last_ledger_export_at() == 1_796_000_000.25
    jobs.record_ledger_export(1_796_000_300.5, "e2", 4)   # the next export replaces it
    assert jobs.last_ledger_export_at() == 1_796_000_300.5
    with database.transaction(readonly=True) as tx:
        assert [tuple(r) for r in tx.query("SELECT name, export_id, entries FROM ledger_exports")] == [
            ("deletion-ledger", "e2", 4)]
