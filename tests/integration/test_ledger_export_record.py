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


def test_an_older_export_noted_late_does_not_move_the_last_export_back(database):
    """Two exports overlapping (a run by hand beside the CronJob's, one slower): the one noted
    last may be the older. Until review34 it replaced the newer, and the gauge went back."""
    migrate(database, MIGRATIONS)
    jobs = DeletionJobStore(database)
    jobs.record_ledger_export(1_796_000_300.0, "newer", 4)
    jobs.record_ledger_export(1_796_000_000.0, "older", 3)
    assert jobs.last_ledger_export_at() == 1_796_000_300.0
    with database.transaction(readonly=True) as tx:
        assert [tuple(r) for r in tx.query("SELECT export_id, entries FROM ledger_exports")] == [("newer", 4)]
