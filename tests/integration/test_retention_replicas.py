"""The retention purge's cap with several privacy replicas (session 25, clock25): a purge's
end advances at most max(a day, two check periods) past the previous purge's, whichever
replica asks. Two replicas = two stores, each with its own connections, on one real
database (SQLite file, PostgreSQL schema); times injected."""

from __future__ import annotations

import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from services.privacy.consent.store import ConsentStore
from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.store import DeletionJobStore

DAY = 86400.0
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgres"])
def two_replicas(request, tmp_path):
    """Two deletion coordinators, each on its own connection(s) to one database."""
    if request.param == "sqlite":
        open_db = lambda: SqliteDatabase(tmp_path / "privacy.sqlite")   # noqa: E731
    else:
        dsn, schema = request.getfixturevalue("postgres_dsn"), f"retention_{uuid.uuid4().hex[:10]}"
        open_db = lambda: PostgresDatabase(dsn, schema, max_size=2)      # noqa: E731
    dbs = [open_db(), open_db()]
    ConsentStore(dbs[0], None).migrate()
    replicas = [DeletionCoordinator(DeletionJobStore(db), None, None, Ed25519PrivateKey.generate(),
                                    retention_check_s=HOUR, retention_days=90.0) for db in dbs]
    yield replicas
    for replica, db in zip(replicas, dbs):
        replica.close(1.0)
        db.close()


def _purges(jobs: DeletionJobStore) -> list[tuple[str, float]]:
    with jobs.db.transaction() as tx:
        rows = tx.query("SELECT request_id FROM deletion_jobs WHERE account_id = '*' ORDER BY created_at")
    return [(r[0], jobs.by_request(r[0]).job.scope.end) for r in rows]


def test_a_purge_catching_up_advances_one_cap_per_check_whichever_replicas_ask(two_replicas):
    """Privacy stopped a day and a half: the purge must catch up a day per check. Before
    session 25 the first replica stored the period's purge held back to a day
    (``retention:<period>:held``) and the second, reading that purge's end as the previous
    one, found the target within a day of it and stored the period's unheld purge beside it:
    a day and a half erased in one check (up to two caps with two replicas)."""
    first, second = two_replicas
    now = 1_800_000_000.0
    start = first.maybe_request_retention(now).job.scope.end
    now += 1.5 * DAY                                       # privacy stopped a day and a half
    held = first.maybe_request_retention(now)
    assert held.job.scope.end == start + DAY
    other = second.maybe_request_retention(now + 30)       # the other replica, same check period
    purges = _purges(first.jobs)
    assert max(end for _, end in purges) == start + DAY, \
        f"one check advanced the purge {(max(end for _, end in purges) - start) / DAY:.2f} days: {purges}"
    assert other.job.job_id == held.job.job_id and len(purges) == 2
    # The next check, on either replica: another day at most (here the rest: half a day and an hour).
    nxt = second.maybe_request_retention(now + HOUR)
    assert nxt.job.scope.end == start + 1.5 * DAY + HOUR
    assert first.maybe_request_retention(now + HOUR + 60).job.job_id == nxt.job.job_id
