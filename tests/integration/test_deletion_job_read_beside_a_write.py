"""Reading a deletion job (``GET /v1/delete/{job}``: privacy's GetDeletion, polled by every
client waiting for its erasure; an export's list of the household's jobs) takes no write
lock (review33, the class of review28's consent read and R5's withdrawn list): until then
``DeletionJobStore._row`` read in a write transaction — on SQLite ``BEGIN IMMEDIATE``, the
database's one write lock — so each poll waited behind any write of privacy's database (an
audit batch, a key rotation, another job's step) and, past the 30 s busy timeout, failed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from services.common.erasure import ErasureScope
from services.common.storage.sql import SqliteDatabase, migrate
from services.privacy.deletion.domain import new_job
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.migrations import MIGRATIONS
from tests.helpers.held_transaction import answered_beside_a_held_write


def test_reading_a_deletion_job_does_not_wait_for_a_write_in_progress(tmp_path: Path):
    db = SqliteDatabase(tmp_path / "privacy.db")
    try:
        migrate(db, MIGRATIONS)
        jobs = DeletionJobStore(db)
        job = new_job("job-r", ErasureScope("acct-r", "device", device_id="tv-1"), "olivia", "privacy_officer",
                      datetime.now(UTC))
        jobs.create(job, "req-r", "test", next_due=job.requested_at)
        answers = answered_beside_a_held_write(
            db, lambda: (jobs.get("job-r").job.job_id, [s.job.job_id for s in jobs.for_account("acct-r")]))
        assert answers == ("job-r", ["job-r"])
    finally:
        db.close()


def test_reading_a_households_data_keys_does_not_wait_for_a_write_in_progress(tmp_path: Path):
    """``DataKeyStore.load`` of one household (GetDataKey's refresh, every store's key fetch past
    REFRESH_S) read in a write transaction until review33, though ``load_many`` — the same
    read for many households — already used a read one."""
    import os

    from services.privacy.keys.domain import WrappedDek
    from services.privacy.keys.store import DataKeyStore

    db = SqliteDatabase(tmp_path / "privacy.db")
    try:
        migrate(db, MIGRATIONS)
        keys = DataKeyStore(db)
        assert keys.insert_new(WrappedDek("acct-k", 1, "k1", os.urandom(60), datetime.now(UTC)))
        answers = answered_beside_a_held_write(db, lambda: [(r.account_id, r.dek_version) for r in keys.load("acct-k")])
        assert answers == [("acct-k", 1)]
    finally:
        db.close()
