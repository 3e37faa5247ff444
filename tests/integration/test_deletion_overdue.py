"""The overdue-job age says what is stuck (session 36): a device/person/window erasure whose
step waits for its household's job (review34 N6, ``_WaitForHousehold``) still counts — its
requester's clock runs from its own request — but in its own series,
``hearth_deletion_oldest_open_job_age_seconds{waiting="household_job"}``; a job working on
its own is ``{waiting="none"}``. Until then one unlabelled age mixed both: a device request
older than the stuck household job it waits for made the alert point at a job that is not
stuck. Real stores, SQLite and PostgreSQL (the mark is found in the stored JSON)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.erasure import ErasureScope
from services.common.identity import Principal
from services.common.ids import Role
from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from services.privacy.consent.store import ConsentStore
from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.domain import fail_service, start_job
from services.privacy.deletion.store import DeletionJobStore

OFFICER = Principal("officer", Role.ADMIN)


@pytest.fixture(params=["sqlite", "postgres"])
def jobs(request, tmp_path):
    if request.param == "sqlite":
        db = SqliteDatabase(tmp_path / "privacy.sqlite")
    else:
        db = PostgresDatabase(request.getfixturevalue("postgres_dsn"), f"overdue_{uuid.uuid4().hex[:10]}", max_size=2)
    ConsentStore(db, None).migrate()
    yield DeletionJobStore(db)
    db.close()


def _aged(jobs: DeletionJobStore, job_id: str, age_s: float) -> None:
    """The job as if requested ``age_s`` ago (its row's creation time, which the gauge reads)."""
    with jobs.db.transaction() as tx:
        tx.execute(f"UPDATE {jobs.table} SET created_at = ? WHERE job_id = ?", (time.time() - age_s, job_id))


def _fail(jobs: DeletionJobStore, coordinator: DeletionCoordinator, job_id: str, error: str, **wait) -> None:
    stored = jobs.get(job_id)
    now = coordinator._clock()
    job = fail_service(start_job(stored.job, now), "attribution", error, now, coordinator.policy, **wait)
    jobs.save(stored, job, now + timedelta(seconds=60))


def test_a_request_waiting_for_its_household_job_is_aged_apart_from_the_job_that_is_stuck(jobs):
    coordinator = DeletionCoordinator(jobs, None, None, Ed25519PrivateKey.generate())
    assert [coordinator.oldest_open_age_s(w) for w in (None, False, True)] == [0.0, 0.0, 0.0]
    # The device request came first (2 h ago); its household's erasure an hour later, stuck
    # since (it retries a store that keeps failing); the device job waits for it.
    device = coordinator.request(ErasureScope("acct-o", "device", device_id="tv-1"), principal=OFFICER).job.job_id
    household = coordinator.request(ErasureScope("acct-o", "household"), principal=OFFICER).job.job_id
    _aged(jobs, device, 7200)
    _aged(jobs, household, 3000)
    _fail(jobs, coordinator, household, "UNAVAILABLE: attribution is down")
    _fail(jobs, coordinator, device, f"waiting for household job {household} to erase attribution",
          wait_until=coordinator._clock() + timedelta(seconds=60), waiting_for=household)
    # A job working on its own whose error text quotes the mark is not taken for a waiting one.
    other = coordinator.request(ErasureScope("acct-p", "device", device_id="tv-2"), principal=OFFICER).job.job_id
    _aged(jobs, other, 60)
    _fail(jobs, coordinator, other, 'INTERNAL: "waiting_for": "job-x"')

    everything, own, waiting = (coordinator.oldest_open_age_s(w) for w in (None, False, True))
    assert everything == pytest.approx(7200, abs=60)   # the oldest open request: the legal clock
    assert waiting == pytest.approx(7200, abs=60)      # ... which waits for its household's job
    assert own == pytest.approx(3000, abs=60)          # the job that is stuck itself

    # Once the household job has confirmed and the device job's step is done waiting, it
    # is a job working on its own again.
    stored = jobs.get(device)
    now = coordinator._clock()
    jobs.save(stored, fail_service(stored.job, "attribution", "UNAVAILABLE", now, coordinator.policy),
              now + timedelta(seconds=60))
    assert coordinator.oldest_open_age_s(True) == 0.0
    assert coordinator.oldest_open_age_s(False) == pytest.approx(7200, abs=60)
