"""A privacy replica whose clock is far behind the others' (session 25, clock25), two
replicas = two stores on one real PostgreSQL schema, the behind one's wall clock injected.

Before: leases and due times are written and compared on each replica's own clock, and a
time later than now + ~66 min (``FUTURE_MARGIN_S`` + the longest backoff) is taken for a
clock step's. A replica two hours behind therefore saw every lease the others held as free
and took it (their passes stopped: "its lease ran out and another worker took it"), and
every retry's due time as due: it retried at every poll, and the others, reading its due
times two hours in the past, did too, so the backoff was gone (the drill in
docs/operations.md, "Clock steps": jobs whose peer was down failed after their attempts in
seconds). Now a replica whose clock is off the database server's by more than a quarter of
the lease takes no lease and asks for no retention purge until it agrees."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY

from services.common.erasure import ErasureScope
from services.common.identity import Principal
from services.common.ids import Role
from services.common.storage.sql import PostgresDatabase, SqliteDatabase, clock_offset
from services.privacy.consent.store import ConsentStore
from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.domain import JobState, RetryPolicy, ServiceStatus
from services.privacy.deletion.store import DeletionJobStore
from tests.integration.test_deletion_clock_steps import _Peers   # confirm at once, or refuse while down

OFFICER = Principal("officer", Role("admin"))
BEHIND_S = 2 * 3600.0


@pytest.fixture
def shared_schema(postgres_dsn):
    schema = f"behind_{uuid.uuid4().hex[:10]}"
    dbs = [PostgresDatabase(postgres_dsn, schema, max_size=2) for _ in range(2)]
    ConsentStore(dbs[0], None).migrate()
    yield [DeletionJobStore(db) for db in dbs]
    for db in dbs:
        db.close()


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_a_replica_two_hours_behind_takes_no_lease_and_no_retry_before_its_due_time(shared_schema):
    jobs_right, jobs_behind = shared_schema
    offset = [BEHIND_S]
    key = Ed25519PrivateKey.generate()
    right_peers, behind_peers = _Peers(down=True), _Peers(down=True)
    right = DeletionCoordinator(jobs_right, right_peers, None, key,
                                policy=RetryPolicy(base_delay=timedelta(minutes=1)))
    behind = DeletionCoordinator(jobs_behind, behind_peers, None, key, wall=lambda: time.time() - offset[0],
                                 retention_check_s=3600.0)
    try:
        held_id, retried_id = (right.request(ErasureScope(a, "household"), principal=OFFICER).job.job_id
                               for a in ("acct-held", "acct-retried"))
        # One job whose pass holds its lease on the right replica; the other retried there
        # (its peer is down): its next attempt is a backoff away.
        assert jobs_right.claim(held_id, time.time(), right.lease_s) is not None
        right.advance(retried_id)
        retried = jobs_right.get(retried_id).job
        assert any(p.status is ServiceStatus.RETRYING for p in retried.services.values())
        attempts = sum(p.attempts for p in retried.services.values())

        assert not right.clock_disagrees()     # its worker loop measures every third of a lease
        assert behind.run_due(wait=True) == 0, "the replica two hours behind took the others' jobs"
        assert behind_peers.calls == []
        assert sum(p.attempts for p in jobs_right.get(retried_id).job.services.values()) == attempts
        assert behind.maybe_request_retention() is None                 # no purge of a period two hours old
        assert _gauge("hearth_deletion_clock_disagrees") == 1.0
        assert _gauge("hearth_deletion_clock_offset_seconds") == pytest.approx(-BEHIND_S, abs=5.0)

        # Put right: it takes jobs again (the held one once its holder lets it go).
        offset[0] = 0.0
        behind._clock_checked_at = None                                 # measure now, not a third of a lease later
        behind_peers.down = False
        jobs_right.release(held_id, _lease(jobs_right, held_id))
        assert behind.run_due(wait=True) == 1
        assert jobs_right.get(held_id).job.state is JobState.COMPLETED
        assert _gauge("hearth_deletion_clock_disagrees") == 0.0
        assert behind.maybe_request_retention() is not None
    finally:
        right.close(1.0)
        behind.close(1.0)


def test_replicas_that_agree_with_each_other_go_on_when_the_database_clock_is_off(shared_schema):
    """The database server's clock an hour behind both replicas (the libfaketime drill:
    PostgreSQL started an hour behind, docs/operations.md "Clock steps"): the replicas,
    which compare leases on their own clocks, agree with each other, so they go on; the
    offset is reported. Before the exemption every deletion stopped until the server's
    clock was put right."""
    ahead = lambda: time.time() + 3600.0                                  # noqa: E731
    first, second = (DeletionCoordinator(jobs, _Peers(), None, Ed25519PrivateKey.generate(), wall=ahead)
                     for jobs in shared_schema)
    try:
        assert first.clock_disagrees()            # a first measurement off the server's: not yet
        for replica in (second, first, second):   # their worker loops measure every third of a lease
            replica._clock_checked_at = None
            replica.clock_disagrees()
        assert not first.clock_disagrees() and not second.clock_disagrees()
        job_id = first.request(ErasureScope("acct-db", "household"), principal=OFFICER).job.job_id
        assert second.run_due(wait=True) == 1, "every replica stopped for the database server's clock"
        assert shared_schema[0].get(job_id).job.state is JobState.COMPLETED
        assert _gauge("hearth_deletion_clock_disagrees") == 0.0
        assert _gauge("hearth_deletion_clock_offset_seconds") == pytest.approx(3600.0, abs=5.0)
    finally:
        first.close(1.0)
        second.close(1.0)


def _right_and_a_year_ahead(shared_schema) -> tuple[DeletionCoordinator, DeletionCoordinator]:
    """Two replicas with retention on (hourly checks), one with a clock a year ahead."""
    key = Ed25519PrivateKey.generate()
    return (DeletionCoordinator(shared_schema[0], _Peers(), None, key, retention_check_s=3600.0),
            DeletionCoordinator(shared_schema[1], _Peers(), None, key, retention_check_s=3600.0,
                                wall=lambda: time.time() + 400 * 86400.0))


def test_a_replica_a_year_ahead_asks_for_no_retention_purge_for_the_others_to_run(shared_schema):
    """Session 24 found a privacy replica a year ahead "held by the tokens": its purge's
    Erase calls were refused. But its purge job is stored, and a right replica beside it
    (read its due time a year ahead as a clock step's: due) ran it with tokens the peers
    accept: the purge advanced a day past the previous one's at every hourly check of the
    stepped replica, 24 days of data erased a day. Now the stepped replica asks for none."""
    jobs_right = shared_schema[0]
    right, ahead = _right_and_a_year_ahead(shared_schema)
    try:
        first = right.maybe_request_retention()
        assert first is not None
        assert ahead.maybe_request_retention() is None, "the replica a year ahead asked for a purge"
        assert right.run_due(wait=True) == 1            # only the right replica's own purge
        with jobs_right.db.transaction() as tx:
            assert tx.query("SELECT count(*) FROM deletion_jobs WHERE account_id = '*'")[0][0] == 1
    finally:
        right.close(1.0)
        ahead.close(1.0)


def _lease(jobs: DeletionJobStore, job_id: str) -> float:
    with jobs.db.transaction() as tx:
        return float(tx.query("SELECT lease_until FROM deletion_jobs WHERE job_id = ?", (job_id,))[0][0])


def test_the_clock_offset_is_measured_against_postgresql_only(shared_schema, tmp_path):
    """SQLite's "now" is the process's own clock: nothing to compare with."""
    measured = clock_offset(shared_schema[0].db)
    assert measured is not None and abs(measured[0]) < 1.0 + measured[1]
    assert clock_offset(shared_schema[0].db, lambda: time.time() + 600)[0] == pytest.approx(600, abs=1.0)
    assert clock_offset(SqliteDatabase(tmp_path / "x.db")) is None


def test_a_replica_that_takes_no_jobs_for_its_clock_does_not_poll_the_database_every_5_ms(shared_schema):
    """review25: a replica refusing jobs for its clock still woke for the earliest due time
    on its own clock: two hours ahead, a job the right replica retries a minute later is
    due to it at once, so its worker loop woke every 5 ms (the loop's margin) and queried
    the database at each wake, for as long as its clock stayed off (hours of a core and
    ~200 queries a second). It now waits its poll period, like a loop with nothing due."""
    jobs_right, jobs_ahead = shared_schema
    key = Ed25519PrivateKey.generate()
    right = DeletionCoordinator(jobs_right, _Peers(down=True), None, key,
                                policy=RetryPolicy(base_delay=timedelta(minutes=1)))
    ahead = DeletionCoordinator(jobs_ahead, _Peers(), None, key, wall=lambda: time.time() + BEHIND_S, poll_s=1.0)
    polls = []
    next_due = jobs_ahead.next_due
    jobs_ahead.next_due = lambda: (polls.append(time.monotonic()), next_due())[1]
    try:
        job_id = right.request(ErasureScope("acct-spin", "household"), principal=OFFICER).job.job_id
        right.advance(job_id)                   # its peer is down: retried a minute from now
        assert not right.clock_disagrees()      # its offset stored: the ahead one is the odd one out
        ahead.start()
        time.sleep(2.0)
        assert _gauge("hearth_deletion_clock_disagrees") == 1.0
        assert len(polls) <= 4, f"{len(polls)} polls of the database in 2 s by a replica taking no jobs"
    finally:
        right.close(1.0)
        ahead.close(1.0)


def test_a_replica_a_year_ahead_left_alone_purges_by_the_database_servers_clock(shared_schema):
    """review25: a replica off the server's clock with no live peer row (the right replica
    restarting for more than three leases, or starting a few seconds after it) is let go on
    from its second measurement, since it cannot tell its clock from the server's. A year
    ahead, it then asked for its own period's purge, a day past the previous end, and the
    right replica ran it once back (its due time a year ahead reads as a clock step's): a
    day of data within the retention erased at each such gap. A replica exempted while
    ahead of the server now takes the period of the earlier clock, the server's."""
    jobs_right = shared_schema[0]
    right, ahead = _right_and_a_year_ahead(shared_schema)
    try:
        first = right.maybe_request_retention()
        with jobs_right.db.transaction() as tx:      # the right replica gone for three leases
            tx.execute("DELETE FROM deletion_clocks")
        assert ahead.clock_disagrees()               # its first measurement: not yet
        ahead._clock_checked_at = None
        assert not ahead.clock_disagrees()           # alone: goes on
        ahead.maybe_request_retention()
        with jobs_right.db.transaction() as tx:
            ids = [r[0] for r in tx.query("SELECT request_id FROM deletion_jobs WHERE account_id = '*'")]
        ends = [jobs_right.by_request(i).job.scope.end for i in ids]
        assert max(ends) < first.job.scope.end + 2 * 3600.0, \
            f"a purge {(max(ends) - first.job.scope.end) / 86400.0:.2f} days past the right replica's: {ids}"
    finally:
        right.close(1.0)
        ahead.close(1.0)
