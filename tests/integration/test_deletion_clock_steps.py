"""The deletion worker under clock steps (clock24; docs/operations.md, "Clock steps"): a
privacy replica's wall clock stepped forward or back, or one replica's clock behind
another's. Each test failed before session 24:

* a clock stepped forward (a year: the whole host, every process at once, so the service
  tokens did not stop it) made the next retention purge erase every household's data in a
  second; now a purge's end advances at most a day past the previous purge's;
* the retention purge, asked for once per check period, was not asked for again after a
  step back until the clock reached the period it had stepped to (a year: no purge);
* a job retried while the clock was a year ahead (and a lease taken then) waited that year
  once the clock was put right;
* a job requested by a replica whose clock is ahead of the one that completed it (or
  completed after a step back) failed every attempt: its receipt would say it completed
  before it was requested, which a receipt may not (receipts.py).

Real SQLite store, peers in process; times injected (no faketime, no waiting)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hearth.common.v1 import common_pb2

from services.common.erasure import ErasureScope, ids_digest
from services.common.errors import Unavailable
from services.common.identity import Principal
from services.common.ids import Role
from services.common.storage.sql import SqliteDatabase
from services.privacy.consent.store import ConsentStore
from prometheus_client import REGISTRY

from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.domain import JobState, ServiceStatus
from services.privacy.deletion.store import DeletionJobStore

DAY = 86400.0
OFFICER = Principal("officer", Role("admin"))


class _Peers:
    """Data holders that confirm at once, or refuse while ``down`` (a peer unreachable,
    or refusing the stepped replica's service token)."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.calls: list[str] = []

    def erase(self, service, scope, job_id):
        self.calls.append(service)
        if self.down:
            raise Unavailable(f"{service} is unavailable")
        return common_pb2.ErasureResult(service=service, deleted_ids_sha256=ids_digest([]), already_erased=True)

    def export(self, service, account_id):
        return {}

    def close(self):
        pass


def _store(tmp_path) -> DeletionJobStore:
    db = SqliteDatabase(tmp_path / "privacy.sqlite")
    ConsentStore(db, None).migrate()
    return DeletionJobStore(db)


def test_the_retention_purge_is_asked_for_again_after_the_clock_steps_back(tmp_path):
    coordinator = DeletionCoordinator(_store(tmp_path), _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=3600.0, retention_days=90.0)
    try:
        now = 1_800_000_000.0
        ahead = coordinator.maybe_request_retention(now + 400 * DAY)      # a step forward: a year
        assert ahead is not None and ahead.request_id == f"retention:{int((now + 400 * DAY) // 3600)}"
        back = coordinator.maybe_request_retention(now)                  # put right
        assert back is not None and back.request_id == f"retention:{int(now // 3600)}"
        assert coordinator.maybe_request_retention(now + 1) is None      # once a period
        assert coordinator.maybe_request_retention(now + 3600).request_id == f"retention:{int(now // 3600) + 1}"
    finally:
        coordinator.close(1.0)


def test_a_job_retried_while_the_clock_was_a_year_ahead_runs_once_the_clock_is_put_right(tmp_path):
    jobs = _store(tmp_path)
    key = Ed25519PrivateKey.generate()
    stepped = DeletionCoordinator(jobs, _Peers(down=True), None, key,
                                  clock=lambda: datetime.now(UTC) + timedelta(days=400))
    right = DeletionCoordinator(jobs, _Peers(), None, key)
    try:
        job_id = stepped.request(ErasureScope("acct-c", "household"), principal=OFFICER).job.job_id
        stepped.advance(job_id)   # every peer fails: its retry is set a year ahead
        job = jobs.get(job_id).job
        assert job.state is JobState.RUNNING
        assert any(p.status is ServiceStatus.RETRYING for p in job.services.values())
        # ... and the stepped replica was killed holding the job: its lease ends a year ahead.
        assert jobs.claim(job_id, time.time() + 400 * DAY, 10.0) is not None
        assert right.run_due(wait=True) == 1
        done = jobs.get(job_id)
        assert done.job.state is JobState.COMPLETED, done.job
        assert right.verify(done.receipt_json) == (True, "")
    finally:
        stepped.close(1.0)
        right.close(1.0)


def test_a_job_completed_by_a_replica_whose_clock_is_behind_gets_a_receipt_that_verifies(tmp_path):
    jobs = _store(tmp_path)
    key = Ed25519PrivateKey.generate()
    requester = DeletionCoordinator(jobs, _Peers(), None, key)
    behind = DeletionCoordinator(jobs, _Peers(), None, key, clock=lambda: datetime.now(UTC) - timedelta(minutes=2))
    try:
        job_id = requester.request(ErasureScope("acct-b", "household"), principal=OFFICER).job.job_id
        stored = behind.advance(job_id)
        assert stored.job.state is JobState.COMPLETED, stored.job
        assert stored.job.completed_at >= stored.job.requested_at
        assert behind.verify(stored.receipt_json) == (True, "")
    finally:
        requester.close(1.0)
        behind.close(1.0)


def test_a_clock_stepped_a_year_ahead_purges_at_most_a_day_past_the_previous_purge(tmp_path):
    coordinator = DeletionCoordinator(_store(tmp_path), _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=3600.0, retention_days=90.0)
    held = lambda: REGISTRY.get_sample_value("hearth_retention_purges_held_back_total") or 0.0   # noqa: E731
    try:
        now = 1_800_000_000.0
        first = coordinator.maybe_request_retention(now).job.scope.end
        assert first == (now // 3600) * 3600 - 90 * DAY
        later = coordinator.maybe_request_retention(now + 20 * 3600).job.scope.end   # under a day: as asked
        assert later == first + 20 * 3600
        before = held()
        stepped = coordinator.maybe_request_retention(now + 400 * DAY)
        assert stepped.job.scope.end == later + DAY, "the year's step erased everything older than 310 days ahead"
        assert stepped.request_id == f"retention:{int((now + 400 * DAY) // 3600)}"   # one purge a period
        assert held() == before + 1
        # A second replica asking for the same period gets that purge, not one a day further.
        replica = DeletionCoordinator(coordinator.jobs, _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=3600.0, retention_days=90.0)
        try:
            assert replica.maybe_request_retention(now + 400 * DAY + 60).job.job_id == stepped.job.job_id
        finally:
            replica.close(1.0)
        # Still stepped an hour later: another day, no more.
        assert coordinator.maybe_request_retention(now + 400 * DAY + 3600).job.scope.end == later + 2 * DAY
        # Put right: the purge asks for its own period again, nothing held back.
        right = coordinator.maybe_request_retention(now + 21 * 3600)
        assert right.job.scope.end == first + 21 * 3600 and held() == before + 3   # each replica's counts
    finally:
        coordinator.close(1.0)


def test_a_holder_whose_clock_stepped_back_learns_another_replica_took_its_job(tmp_path):
    """A lease claimed while the holder's clock was a year ahead: another replica takes the
    job (a lease that far ahead is a clock step's), and the holder, its clock put right,
    finds at its next renewal that the lease is no longer its own. Before, its renewal
    kept the year-ahead lease without asking the database, so its pass went on beside
    the other's."""
    jobs = _store(tmp_path)
    coordinator = DeletionCoordinator(jobs, _Peers(), None, Ed25519PrivateKey.generate())
    try:
        taken_id, kept_id = (coordinator.request(ErasureScope(a, "household"), principal=OFFICER).job.job_id
                             for a in ("acct-t", "acct-k"))
        now = time.time()
        ahead = jobs.claim(taken_id, now + 400 * DAY, 10.0)
        assert jobs.claim(taken_id, now, 10.0, future_bound_s=coordinator.future_bound_s) is not None
        assert jobs.renew(taken_id, ahead, now + 1, 10.0) is None
        # Not taken: the renewal brings the lease back to now + lease.
        mine = jobs.claim(kept_id, now + 400 * DAY, 10.0)
        assert jobs.renew(kept_id, mine, now + 1, 10.0) == now + 11
    finally:
        coordinator.close(1.0)


def test_a_purge_checked_daily_catches_up_after_privacy_was_stopped_a_week(tmp_path):
    """review24: with ``HEARTH_RETENTION_CHECK_S`` a day (or more) the target moves a day per
    check; a cap of a day past the previous end let a purge that fell behind (privacy stopped
    a week) stay a week behind for good (and with two days, fall further behind at every
    check): data kept past the retention forever. It must catch up in a bounded number of
    checks."""
    coordinator = DeletionCoordinator(_store(tmp_path), _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=DAY, retention_days=90.0)
    try:
        now = 1_800_000_000.0
        coordinator.maybe_request_retention(now)
        now += 8 * DAY                                               # stopped a week
        ends = [coordinator.maybe_request_retention(now + k * DAY).job.scope.end for k in range(10)]
        target = lambda k: ((now + k * DAY) // DAY) * DAY - 90 * DAY   # noqa: E731
        assert ends[-1] == target(9), f"still {(target(9) - ends[-1]) / DAY:.0f} days behind after 10 daily checks"
        assert all(b > a for a, b in zip(ends, ends[1:]))           # held back, but advancing at every check
    finally:
        coordinator.close(1.0)

    coordinator = DeletionCoordinator(_store(tmp_path / "two"), _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=2 * DAY, retention_days=90.0)
    try:
        now = 1_800_000_000.0
        first = coordinator.maybe_request_retention(now).job.scope.end
        ends = [coordinator.maybe_request_retention(now + k * 2 * DAY).job.scope.end for k in range(1, 6)]
        assert ends[-1] == first + 10 * DAY, "a purge every two days fell behind at every check"
    finally:
        coordinator.close(1.0)


def test_the_purge_is_not_stuck_after_a_day_with_the_clock_a_year_ahead(tmp_path, monkeypatch):
    """review24: purges requested while the clock was a year ahead are stored with a
    ``created_at`` a year ahead, so they stayed the "newest" purges after the clock was put
    right; once more than the 24 looked at were stepped (a day of hourly checks), the
    previous end was theirs for a year and every later purge was held at it + a day: no
    data erased past it for the step's length. Purges stamped later than now must not
    count."""
    import services.privacy.deletion.store as store_module

    wall = [1_800_000_000.0]
    monkeypatch.setattr(store_module, "time", type("_Clock", (), {"time": staticmethod(lambda: wall[0])}))
    coordinator = DeletionCoordinator(_store(tmp_path), _Peers(), None, Ed25519PrivateKey.generate(),
                                      retention_check_s=3600.0, retention_days=90.0)
    try:
        start = wall[0]
        coordinator.maybe_request_retention(start)
        for hour in range(1, 31):                                    # a year ahead for 30 hourly checks
            wall[0] = start + 400 * DAY + hour * 3600
            coordinator.maybe_request_retention(wall[0])
        for day in range(1, 40):                                     # put right: daily, then hourly, checks
            wall[0] = start + day * DAY
            end = coordinator.maybe_request_retention(wall[0]).job.scope.end
        assert end == (wall[0] // 3600) * 3600 - 90 * DAY, \
            f"the purge is {(((wall[0] // 3600) * 3600 - 90 * DAY) - end) / DAY:.1f} days behind"
    finally:
        coordinator.close(1.0)
