"""The deletion worker's lease is fenced: a pass whose lease ran out (a peer that did not
answer for longer than HEARTH_DELETION_LEASE_S) and was claimed by another worker neither
goes on beside it nor renews or frees the lease the other holds (real SQLite store)."""

from __future__ import annotations

import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hearth.common.v1 import common_pb2

from services.common.erasure import ErasureScope
from services.common.identity import Principal
from services.common.ids import Role
from services.common.storage.sql import SqliteDatabase
from services.privacy.consent.store import ConsentStore
from services.privacy.deletion.app import DeletionCoordinator
from services.privacy.deletion.store import DeletionJobStore
from tests.helpers.waiting import wait_for


class _HeldPeers:
    """Data holders whose Erase waits until the test lets it answer (a peer that hangs)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.answer = threading.Event()

    def erase(self, service, scope, job_id):
        self.calls.append(service)
        self.answer.wait(60)
        return common_pb2.ErasureResult(service=service, deleted_ids_sha256=bytes(32), already_erased=True)

    def export(self, service, account_id):
        return {}

    def close(self):
        pass


def _store(tmp_path) -> DeletionJobStore:
    db = SqliteDatabase(tmp_path / "privacy.sqlite")
    ConsentStore(db, None).migrate()
    return DeletionJobStore(db)


def _lease(jobs: DeletionJobStore, job_id: str) -> float:
    with jobs.db.transaction() as tx:
        return float(tx.query("SELECT lease_until FROM deletion_jobs WHERE job_id = ?", (job_id,))[0][0])


def test_a_lease_is_renewed_and_released_only_by_its_holder(tmp_path):
    jobs = _store(tmp_path)
    coordinator = DeletionCoordinator(jobs, _HeldPeers(), None, Ed25519PrivateKey.generate())
    job_id = coordinator.request(ErasureScope("acct-1", "household"),
                                 principal=Principal("officer", Role("admin"))).job.job_id
    now = time.time()
    first = jobs.claim(job_id, now, 10.0)
    assert first is not None and jobs.claim(job_id, now + 1, 10.0) is None   # held
    second = jobs.claim(job_id, now + 11, 10.0)                               # ran out: taken
    assert second is not None and second != first
    assert jobs.renew(job_id, first, now + 12, 10.0) is None                  # not first's any more
    assert not jobs.release(job_id, first)
    assert _lease(jobs, job_id) == second
    renewed = jobs.renew(job_id, second, now + 12, 10.0)
    assert renewed == now + 22 and _lease(jobs, job_id) == renewed
    assert jobs.release(job_id, renewed) and _lease(jobs, job_id) == 0.0


def test_a_pass_whose_lease_was_taken_stops_and_leaves_the_new_holders_lease(tmp_path):
    jobs = _store(tmp_path)
    slow, other = _HeldPeers(), _HeldPeers()
    first = DeletionCoordinator(jobs, slow, None, Ed25519PrivateKey.generate(), lease_s=0.5)
    second = DeletionCoordinator(jobs, other, None, Ed25519PrivateKey.generate(), lease_s=600.0)
    try:
        job_id = first.request(ErasureScope("acct-2", "household"),
                               principal=Principal("officer", Role("admin"))).job.job_id
        assert first.run_due(wait=False) == 1
        wait_for(lambda: slow.calls, timeout_s=30, what="the first pass's Erase")
        # The first pass's lease runs out while its peer hangs; the second worker takes the job.
        wait_for(lambda: second.run_due(wait=False) == 1, timeout_s=30, interval_s=0.05, what="the second claim")
        wait_for(lambda: other.calls, timeout_s=30, what="the second pass's Erase")
        held_by_second = _lease(jobs, job_id)
        slow.answer.set()    # the first pass's call answers; its lease is the second's now
        wait_for(lambda: not first._advancing, timeout_s=30, what="the first pass to end")
        # It stopped after its one call (the job moved on under it: its save conflicts, or
        # its renewal finds the lease another's) and, above all, its release left the
        # second's lease alone: before, it reset the lease to 0, so a third pass could
        # claim the job while the second was still in its Erase.
        assert slow.calls == [slow.calls[0]], slow.calls
        assert _lease(jobs, job_id) == held_by_second
    finally:
        slow.answer.set(), other.answer.set()
        first.close(), second.close()
