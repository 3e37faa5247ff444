"""Batch data key rotation as a durable job: privacy's ``RequestDataKeyRotations`` /
``GetDataKeyRotations`` (gateway ``POST /v1/keys/rotate-households`` → 202 + job id,
``GET /v1/keys/rotate-households/{job_id}``; ``hearth keys rotate-households``).

Until session 27 a batch (``RotateDataKeys``) ran inside one call: one settle (~70 s) plus
each household's re-encryption, so a batch of any size outlived the gateway's 300 s
deadline, and the caller learnt nothing of the households it had not reached. Now the
request stores a job and returns at once, the way a deletion does, and with the deletion
jobs' own store (``DeletionJobStore`` over its ``rotation_jobs`` table: the idempotent
``request_id``, compare-and-swap on every update, leases): the job survives its caller
going away and the privacy process's restart (a SIGKILL mid-batch is resumed by whichever
replica claims the job next, the restarted one included, within a lease).

A job fixes its households when it is requested (up to ``limit`` whose newest data key is
older than ``older_than_days``, oldest first). A pass of the worker then

1. begins each pending household's rotation (``KeyService.begin_rotation``: a new version,
   or the rotation under way resumed) and stores the version it rotates to — so a pass
   resumed after a crash finishes that rotation and never begins a second one;
2. waits out one settle for all of them (renewing the lease);
3. finishes each (``DataKeyRotation.finish``: every store's Rekey, the completion rule,
   the retirement), storing each household's outcome as it goes, audited per household
   (``key_rotation``, the requester's principal) as the synchronous batch was.

Outcomes per household: ``completed``; ``erased`` (erased before or during the batch: its
key was shredded, nothing to rotate); ``skipped`` (no data key: nothing of it is
encrypted); ``retrying`` (a store failed), retried every ``retry_s`` (the rotation sweep's
period) up to ``max_attempts`` times, then ``failed`` — the rotation itself stays under way and the sweep keeps finishing it. The job
is ``completed`` once every household is completed, erased or skipped, ``failed`` once
every one has a final outcome and at least one failed.

A household whose stores' purge of the old ciphertexts did not finish is ``completed`` (its
older versions destroyed, rotation.py's completion rule) with those purge steps in
``incomplete_purges`` and named in its ``detail``. Session 27's first rule made it ``held``
(retried, its older versions kept live): reversed the same session — destroying the version
is what leaves the unreachable remnants unreadable (docs/privacy.md §10).
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import audit, identity, telemetry
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.failure_log import FailureLog
from services.common.telemetry import pseudonym
from services.common.text import MAX_REQUEST_ID_CHARS, check_text
from services.privacy.deletion.domain import JobState
from services.privacy.deletion.store import DeletionJobStore, StoredJob
from services.privacy.keys.rotation import MAX_BATCH, MAX_DAYS, DataKeyRotation, describe_purges

log = logging.getLogger("hearth.privacy.keys.batch")
_TRACER = telemetry.tracer("hearth.privacy.keys.batch")

TABLE = "rotation_jobs"
HOUSEHOLDS_TABLE = "rotation_job_households"
REASON = "data key rotation"
MAX_ATTEMPTS = 30   # a household retried every sweep period (60 s): half an hour, then failed
MAX_OPEN_PER_PRINCIPAL = 1   # open (pending or running) batches one principal may have
RPC = "hearth.privacy.v1.Keys/RequestDataKeyRotations"


class Outcome(enum.StrEnum):
    PENDING = "pending"        # not begun yet
    BEGUN = "begun"            # its new version made: settling, then re-encrypted
    COMPLETED = "completed"
    ERASED = "erased"
    SKIPPED = "skipped"
    RETRYING = "retrying"      # a store failed: retried
    FAILED = "failed"          # retried max_attempts times (the sweep still owns the rotation)


FINAL = frozenset({Outcome.COMPLETED, Outcome.ERASED, Outcome.SKIPPED, Outcome.FAILED})
KEY_TABLE_PURGE_RESULTS = ("complete", "incomplete", "failed")   # RotationBatch.key_table_purges


@dataclass(frozen=True, slots=True)
class BatchScope:
    """What the batch was asked for; compared when a ``request_id`` is used again."""

    older_than_days: float
    limit: int

    @property
    def account_id(self) -> str:   # the job store's column: a batch names no one household
        return "*"


@dataclass(frozen=True, slots=True)
class HouseholdRotation:
    outcome: Outcome = Outcome.PENDING
    dek_version: int = 0                  # the version its rotation re-encrypts to (once begun)
    created_at: float | None = None       # when that version was made (the settle runs from it)
    resumed: bool = False                 # the rotation was under way before this batch
    attempts: int = 0                     # failed attempts so far
    next_attempt_at: float | None = None
    detail: str = ""                      # why retrying, failed, erased or skipped; the purges
                                          # that did not finish, once completed
    reencrypted: Mapping[str, int] = field(default_factory=dict)
    destroyed: tuple[int, ...] = ()
    incomplete_purges: tuple[dict, ...] = ()   # once completed (rotation.incomplete_purges)


@dataclass(frozen=True, slots=True)
class RotationBatch:
    job_id: str
    scope: BatchScope
    principal: str
    role: str
    requested_at: float
    households: Mapping[str, HouseholdRotation]
    state: JobState = JobState.RUNNING
    completed_at: float | None = None
    # Privacy's own key-table purge (the retired wrapped keys' physical purge, run once by
    # each pass that retired households, ``_purge_key_tables``), counted by its result:
    # ``complete``; ``incomplete`` (the database said it did not finish: a checkpoint kept
    # busy by a reader, a VACUUM refused); ``failed`` (it raised; the rotation sweep runs it
    # again). Until session 30 only privacy's log said so (review29).
    key_table_purges: Mapping[str, int] = field(default_factory=dict)
    key_table_purge_detail: str = ""      # the last one not complete: what it said

    @property
    def terminal(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED)

    def counts(self) -> dict[str, int]:
        """Households per outcome (every outcome listed, 0 included)."""
        out = {o.value: 0 for o in Outcome}
        for h in self.households.values():
            out[h.outcome.value] += 1
        return out

    def settled(self) -> RotationBatch:
        """The job's state from its households' outcomes (terminal once all are final)."""
        if not all(h.outcome in FINAL for h in self.households.values()):
            return self
        failed = any(h.outcome is Outcome.FAILED for h in self.households.values())
        return replace(self, state=JobState.FAILED if failed else JobState.COMPLETED,
                       completed_at=self.completed_at or time.time())


def household_to_dict(h: HouseholdRotation) -> dict[str, Any]:
    return {"outcome": h.outcome.value, "dek_version": h.dek_version, "created_at": h.created_at,
            "resumed": h.resumed, "attempts": h.attempts, "next_attempt_at": h.next_attempt_at,
            "detail": h.detail, "reencrypted": dict(h.reencrypted), "destroyed": list(h.destroyed),
            "incomplete_purges": list(h.incomplete_purges)}


def household_from_dict(h: Mapping[str, Any]) -> HouseholdRotation:
    return HouseholdRotation(_outcome(h["outcome"]), int(h["dek_version"]), h["created_at"], bool(h["resumed"]),
                             int(h["attempts"]), h["next_attempt_at"], str(h["detail"]), dict(h["reencrypted"]),
                             tuple(h["destroyed"]), tuple(h.get("incomplete_purges", ())))


def header_to_dict(job: RotationBatch) -> dict[str, Any]:
    """The job without its households (``RotationJobStore`` keeps those a row each)."""
    return {"job_id": job.job_id, "older_than_days": job.scope.older_than_days, "limit": job.scope.limit,
            "principal": job.principal, "role": job.role, "requested_at": job.requested_at,
            "state": job.state.value, "completed_at": job.completed_at,
            "key_table_purges": dict(job.key_table_purges), "key_table_purge_detail": job.key_table_purge_detail}


def batch_to_dict(job: RotationBatch) -> dict[str, Any]:
    """The whole job as one JSON object: how session 27 stored it (``job_json``)."""
    return {**header_to_dict(job), "households": {a: household_to_dict(h) for a, h in job.households.items()}}


def batch_from_dict(data: Mapping[str, Any]) -> RotationBatch:
    return RotationBatch(
        job_id=data["job_id"], scope=BatchScope(float(data["older_than_days"]), int(data["limit"])),
        principal=data["principal"], role=data["role"], requested_at=float(data["requested_at"]),
        state=JobState(data["state"]), completed_at=data.get("completed_at"),
        households={a: household_from_dict(h) for a, h in data["households"].items()},
        # absent from a job stored before session 30
        key_table_purges={str(k): int(n) for k, n in data.get("key_table_purges", {}).items()},
        key_table_purge_detail=str(data.get("key_table_purge_detail", "")))


def _outcome(stored: str) -> Outcome:
    """A household's stored outcome; ``held`` (session 27's first rule, reversed, stored by
    a replica that ran it) is read as ``retrying``: its next attempt completes it."""
    return Outcome.RETRYING if stored == "held" else Outcome(stored)


class RotationJobStore(DeletionJobStore):
    """The deletion jobs' store over the batch rotations' table (idempotent create,
    compare-and-swap, leases), with each household's outcome in a row of its own
    (``rotation_job_households``, privacy migration 21) and only the job's header in
    ``job_json``: a step that stores one household's outcome writes that row and the
    header. Until session 28 every step rewrote the whole job — every household's outcome —
    so a job's writes grew with the square of its size (a 5,000-household job: ~1.5 MB per
    step, docs/benchmarks.md "The batch job's record per household"). A job stored whole
    by a replica of the release before (``households`` in ``job_json``) is read as it is,
    and moved to rows at its next save."""

    def __init__(self, db) -> None:
        super().__init__(db, TABLE, (header_to_dict, batch_from_dict))

    def _created(self, tx, job: RotationBatch) -> None:
        if not job.terminal:
            self._refuse_another_open_batch(tx, job)
        self._write_households(tx, job, list(job.households))

    def _refuse_another_open_batch(self, tx, job: RotationBatch) -> None:
        """In the new open job's insert: RESOURCE_EXHAUSTED (the transaction rolls back)
        when its principal already has ``MAX_OPEN_PER_PRINCIPAL`` other open batches. The
        request's own check (``BatchRotations._refuse_a_second_open_batch``) reads before
        this transaction, one request at a time per replica only: requests at two replicas
        at the same instant both passed it (attack29). The principal is locked for the
        transaction (PostgreSQL; SQLite's write transaction already serialises inserts), so
        of two such inserts the second counts the first once it has committed."""
        tx.lock_household(f"rotation-batches-of:{job.principal}")
        rows = tx.query(f"SELECT job_id, job_json FROM {self.table} WHERE state IN ('pending', 'running') "
                        "AND job_id <> ?", (job.job_id,))
        mine = [job_id for job_id, data in rows if json.loads(data).get("principal") == job.principal]
        if len(mine) >= MAX_OPEN_PER_PRINCIPAL:
            raise ResourceExhausted(f"a batch rotation of yours is still running ({', '.join(mine)}): wait for it "
                                    "(GET /v1/keys/rotate-households/{job_id}) or send its request_id again",
                                    "request_id")

    def _row(self, where: str, params: tuple) -> StoredJob | None:
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT job_json, request_id, reason, version, erasures_json, receipt_json, "
                            f"trace_context, job_id FROM {self.table} WHERE {where}", params)
            if not rows:
                return None
            r = rows[0]
            data = json.loads(r[0])
            if "households" not in data:   # a header: its households are rows (one stored whole by 27 has them)
                data["households"] = {a: json.loads(o) for a, o in tx.query(
                    f"SELECT account_id, outcome_json FROM {HOUSEHOLDS_TABLE} WHERE job_id = ? ORDER BY account_id",
                    (r[7],))}
        return StoredJob(batch_from_dict(data), r[1], r[2], int(r[3]), json.loads(r[4]), r[5], r[6])

    def save(self, stored: StoredJob, job: RotationBatch, next_due: datetime | None,
             erasures: dict | None = None, receipt_json: str | None = None, *,
             households: Sequence[str] | None = None) -> StoredJob:
        """Compare-and-swap on ``stored.version`` (Conflict when another writer won): the
        header, and the rows of ``households`` (default: those whose outcome is not the
        very object ``stored`` holds, i.e. the ones this step replaced)."""
        if households is None:
            households = [a for a, h in job.households.items() if stored.job.households.get(a) is not h]
        with self.db.transaction() as tx:
            whole = tx.query(f"SELECT job_json FROM {self.table} WHERE job_id = ? AND version = ?",
                             (job.job_id, stored.version))
            changed = tx.execute(
                f"UPDATE {self.table} SET state = ?, next_due = ?, version = ?, job_json = ? "
                "WHERE job_id = ? AND version = ?",
                (job.state.value, next_due.timestamp() if next_due is not None else None, stored.version + 1,
                 json.dumps(header_to_dict(job), sort_keys=True), job.job_id, stored.version))
            if changed != 1:
                raise Conflict(f"job {job.job_id} changed concurrently", "job_id")
            if whole and "households" in json.loads(whole[0][0]):
                households = list(job.households)   # moved out of job_json: every row
            self._write_households(tx, job, households)
        return StoredJob(job, stored.request_id, stored.reason, stored.version + 1, stored.erasures,
                         stored.receipt_json, stored.trace_context)

    @staticmethod
    def _write_households(tx, job: RotationBatch, accounts: Sequence[str]) -> None:
        tx.executemany(f"INSERT INTO {HOUSEHOLDS_TABLE} (job_id, account_id, outcome_json) VALUES (?, ?, ?) "
                       "ON CONFLICT (job_id, account_id) DO UPDATE SET outcome_json = excluded.outcome_json",
                       [(job.job_id, a, json.dumps(household_to_dict(job.households[a]), sort_keys=True))
                        for a in accounts])


def rotation_job_store(db) -> RotationJobStore:
    """The batch rotations' job store."""
    return RotationJobStore(db)


class BatchRotations:
    """Requests, status and the worker of batch data key rotations (module docstring)."""

    def __init__(self, jobs: RotationJobStore, rotation: DataKeyRotation, *, lease_s: float = 10.0,
                 retry_s: float = 60.0, poll_s: float = 1.0, max_attempts: int = MAX_ATTEMPTS,
                 wall: Callable[[], float] = time.time) -> None:
        self.jobs = jobs
        self.rotation = rotation
        self.keys = rotation.keys
        self.lease_s = lease_s
        self.retry_s = retry_s if retry_s > 0 else 60.0
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self._wall = wall
        self._stop = threading.Event()
        self._wake = threading.Event()
        # The one-open-batch check and the job's creation, one request at a time in this
        # replica: requests sent together all saw no open batch and each stored one (attack29).
        self._requesting = threading.Lock()
        self._thread: threading.Thread | None = None
        self.pass_failures = FailureLog(log, "batch data key rotation pass")

    # ---- requests ------------------------------------------------------------------------

    def request(self, older_than_days: float, limit: int, request_id: str = "",
                principal: identity.Principal | None = None) -> StoredJob:
        """Store a job over the households whose newest data key is older than
        ``older_than_days`` (up to ``limit``, oldest first), or return the job of a repeated
        ``request_id``; the worker runs it. Nothing is begun here."""
        if not 0 < older_than_days <= MAX_DAYS:   # past it no date is that far back
            raise InvalidArgument(f"must be in (0, {MAX_DAYS}]", "older_than_days")
        if not 0 < limit <= MAX_BATCH:
            raise InvalidArgument(f"must be in 1..{MAX_BATCH}", "limit")
        check_text(request_id, "request_id", max_chars=MAX_REQUEST_ID_CHARS)
        principal = principal or identity.current_principal()
        with self._requesting:
            if not self._known_request(request_id):   # a repeated request_id answers its job, open or not
                self._refuse_a_second_open_batch(principal)
            now = self._wall()
            before = datetime.fromtimestamp(now, UTC) - timedelta(days=older_than_days)
            households = self.keys.store.newest_created_before(before.isoformat(), limit)
            job = RotationBatch(f"rot-{uuid.uuid4().hex}", BatchScope(float(older_than_days), int(limit)),
                                principal.id, principal.role.value, now,
                                {a: HouseholdRotation() for a in households}).settled()
            stored = self.jobs.create(job, request_id or f"auto:{job.job_id}", REASON,
                                      next_due=None if job.terminal else datetime.fromtimestamp(now, UTC),
                                      trace_context=json.dumps(telemetry.context_carrier(), sort_keys=True))
        self._wake.set()
        return stored

    def get(self, job_id: str) -> StoredJob:
        return self.jobs.get(job_id)

    def _known_request(self, request_id: str) -> bool:
        if not request_id:
            return False
        try:
            self.jobs.by_request(request_id)
        except NotFound:
            return False
        return True

    def _refuse_a_second_open_batch(self, principal: identity.Principal) -> None:
        """At most ``MAX_OPEN_PER_PRINCIPAL`` open batches per principal. The request
        answers at once, so the gateway's in-flight bound (one rotation per principal)
        never held it back: one privacy officer's burst of requests with new request ids
        stored a job each (up to ~200 KB for 1,000 households, kept for good), 150 in ten
        seconds here (attack28). A second batch would wait behind the first anyway (one
        job at a time). Called under ``_requesting``, so requests sent together to one
        privacy replica open one batch (attack29: 30 concurrent gRPC requests opened
        three); two at two privacy replicas at the same instant both pass this read, and
        the job store counts again inside the insert
        (``RotationJobStore._refuse_another_open_batch``)."""
        mine = [j.job.job_id for j in self.jobs.open_jobs() if j.job.principal == principal.id]
        if len(mine) >= MAX_OPEN_PER_PRINCIPAL:
            raise ResourceExhausted(f"a batch rotation of yours is still running ({', '.join(mine)}): wait for it "
                                    "(GET /v1/keys/rotate-households/{job_id}) or send its request_id again",
                                    "request_id")

    # ---- the worker ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dek-rotation-jobs", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # noqa: BLE001 - a database outage: the next poll tries again
                self.pass_failures.failed()
            else:
                self.pass_failures.succeeded()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def run_due(self) -> int:
        """Claim each due job (one at a time: a pass waits out a settle) and advance it."""
        ran = 0
        for job_id in self.jobs.due(self._wall()):
            if self._stop.is_set():
                break
            lease = self.jobs.claim(job_id, self._wall(), self.lease_s)
            if lease is None:
                continue
            ran += 1
            held = _Lease(self.jobs, job_id, lease, self.lease_s, self._wall)
            try:
                self.advance(job_id, held)
            except Conflict:   # another replica stored a newer state: it carries on
                log.info("batch rotation %s: another replica advanced it; this pass stops", job_id)
            finally:
                held.release()
        return ran

    def advance(self, job_id: str, lease: _Lease | None = None) -> StoredJob:
        stored = self.jobs.get(job_id)
        parent = telemetry.extract_context(json.loads(stored.trace_context or "{}"))
        with telemetry.safe_span(_TRACER, "keys.rotate_households", context=parent,
                                 attributes={"hearth.job_id": job_id}):
            return self._advance(stored, lease)

    def _advance(self, stored: StoredJob, lease: _Lease | None) -> StoredJob:
        job: RotationBatch = stored.job
        if job.terminal:
            return stored
        if all(h.outcome in FINAL for h in job.households.values()):
            # A pass stopped (privacy killed, its lease lost) between its last household's
            # save and its key-table purge's: the households are final, the job is not
            # (below): settled here, that purge not counted (the rotation sweep runs it).
            return self.jobs.save(stored, job.settled(), None, households=[])
        principal = identity.Principal(job.principal, identity.Role(job.role))
        # 1. begin every pending household (its version stored before anything else).
        begun = dict(job.households)
        for account, h in job.households.items():
            if h.outcome is Outcome.PENDING:
                begun[account] = self._begin(account, h, job.requested_at)
        if begun != dict(job.households):
            job = replace(job, households=begun).settled()
            stored = self.jobs.save(stored, job, self._next_due(job))
        # 2. one settle for all.
        settling = [h.created_at for h in job.households.values()
                    if h.outcome is Outcome.BEGUN and h.created_at is not None]
        if settling and not self._wait(max(settling) + self.rotation.settle_s, lease):
            return stored
        # 3. re-encrypt each household that is due with its purge deferred, then purge each
        # store once for all of them, then retire each (rotation.purge_deferred says why
        # this order keeps the guarantees), storing each outcome. Until session 28 each
        # household's finish purged on its own: on PostgreSQL a whole-table rewrite per
        # household and store (28 households on a 200,000-event schema: 276 s).
        reencrypted: list[tuple[str, int]] = []
        for account, h in sorted(job.households.items()):
            if self._stop.is_set() or (lease is not None and not lease.held):
                return stored
            if h.outcome in FINAL or h.outcome is Outcome.PENDING:
                continue
            if h.next_attempt_at is not None and h.next_attempt_at > self._wall():
                continue
            failed, target = self._reencrypt(account, h)
            if failed is None:
                reencrypted.append((account, target))
                continue
            job = replace(job, households={**job.households, account: failed}).settled()
            stored = self.jobs.save(stored, job, self._next_due(job), households=[account])
        if not reencrypted or self._stop.is_set() or (lease is not None and not lease.held):
            return stored
        try:
            self.rotation.purge_deferred(reencrypted)
        except Exception as exc:  # noqa: BLE001 - a store down: every household retried next pass
            why = f"{type(exc).__name__}: {exc}"
            retried = {a: self._retry(job.households[a], Outcome.RETRYING, why.replace(a, pseudonym(a)))
                       for a, _ in reencrypted}
            job = replace(job, households={**job.households, **retried}).settled()
            return self.jobs.save(stored, job, self._next_due(job), households=list(retried))
        # Privacy's own key tables are purged once for the pass too, after its last
        # retirement (also when the pass stops early): until session 29 each household's
        # retirement purged them (on PostgreSQL a VACUUM FULL of data_keys and
        # digest_keys, a WAL switch and a CHECKPOINT per household). Its result goes into
        # the job while this pass still holds it (since session 30), in the same write that
        # makes the job final: each retirement is saved with the job still running (not
        # ``settled``), so no reader sees it ``completed`` without its last pass counted
        # (until review30 R15 the last household's save completed it, the counts followed).
        try:
            for account, _ in reencrypted:
                if self._stop.is_set() or (lease is not None and not lease.held):
                    break
                done = self._finish(account, job.households[account], principal)
                job = replace(job, households={**job.households, account: done})
                stored = self.jobs.save(stored, job, self._next_due(job), households=[account])
        finally:
            result, detail = self._purge_key_tables()
        if lease is not None and not lease.held:
            return stored
        purges = {**{r: 0 for r in KEY_TABLE_PURGE_RESULTS}, **job.key_table_purges}
        purges[result] += 1
        job = replace(job, key_table_purges=purges,
                      key_table_purge_detail=detail or job.key_table_purge_detail).settled()
        return self.jobs.save(stored, job, self._next_due(job), households=[])

    def _purge_key_tables(self) -> tuple[str, str]:
        """(``complete`` | ``incomplete`` | ``failed``, what an unfinished one said)."""
        try:
            step = self.keys.store.purge_owed()
        except Exception as exc:  # noqa: BLE001 - the tombstones noted it: the rotation sweep purges
            log.warning("the purge of the retired wrapped keys failed: the rotation sweep runs it", exc_info=True)
            return "failed", f"{type(exc).__name__}: {exc}; the rotation sweep runs it again"
        if not step.get("complete", True):
            log.warning("the purge of the retired wrapped keys did not finish: %s", step.get("action", ""))
            return "incomplete", f"{step.get('store', '')} {step.get('where', '')}: {step.get('action', '')}"
        return "complete", ""

    def _reencrypt(self, account: str, h: HouseholdRotation) -> tuple[HouseholdRotation | None, int]:
        """Re-encrypt a settled household in every store, its purge deferred: (None, the
        version) when done, else (its next state, 0): settling still, erased, finished
        outside the batch (``_finish`` reports it), or a store failed (retried)."""
        try:
            under_way = self.keys.begin_rotation(account, create=False)
            if under_way is None:   # finished meanwhile: _finish says so
                return None, h.dek_version
            target, _, created_at = under_way
            if created_at.timestamp() + self.rotation.settle_s > self._wall():
                return replace(h, next_attempt_at=created_at.timestamp() + self.rotation.settle_s), 0
            self.rotation.reencrypt(account, target)
        except FailedPrecondition:
            return replace(h, outcome=Outcome.ERASED, next_attempt_at=None,
                           detail="the household was erased during the batch: its key is destroyed"), 0
        except Exception as exc:  # noqa: BLE001 - a store down: retried by the next pass
            return self._retry(h, Outcome.RETRYING,
                               f"{type(exc).__name__}: {exc}".replace(account, pseudonym(account))), 0
        return None, target

    def _begin(self, account: str, h: HouseholdRotation, requested_at: float) -> HouseholdRotation:
        try:
            # Not again when its key is newer than this job (another batch or call rotated
            # it meanwhile): what the job asked for is done. Until attack28 every queued
            # batch began a rotation of its own, so one privacy officer's burst of batch
            # requests rotated every household once per request, one after the other.
            begun = self.keys.begin_rotation(account, unless_created_after=datetime.fromtimestamp(requested_at, UTC))
            if begun is None:
                return replace(h, outcome=Outcome.COMPLETED, next_attempt_at=None,
                               detail="rotated after this batch was requested (by another batch or call): "
                                      "not rotated again")
            target, resumed, created_at = begun
        except FailedPrecondition:
            return replace(h, outcome=Outcome.ERASED, detail="the household was erased: its key is destroyed")
        except NotFound:
            return replace(h, outcome=Outcome.SKIPPED, detail="no data key: nothing of it is encrypted")
        except Exception as exc:  # noqa: BLE001 - retried by the next pass
            return self._retry(h, Outcome.RETRYING, f"{type(exc).__name__}: {exc}")
        return replace(h, outcome=Outcome.BEGUN, dek_version=target, created_at=created_at.timestamp(),
                       resumed=resumed, next_attempt_at=None)

    def _finish(self, account: str, h: HouseholdRotation, principal: identity.Principal) -> HouseholdRotation:
        try:
            under_way = self.keys.begin_rotation(account, create=False)
            if under_way is None:   # finished meanwhile (the sweep, a re-run, another replica)
                return replace(h, outcome=Outcome.COMPLETED, next_attempt_at=None,
                               detail="finished outside this batch (the sweep or another call)")
            target, _, created_at = under_way
            if created_at.timestamp() + self.rotation.settle_s > self._wall():
                return replace(h, next_attempt_at=created_at.timestamp() + self.rotation.settle_s)
            # The requester's principal for what finish() audits (key_destroyed); the
            # stores' Rekey is still called as svc:privacy (GrpcPeers).
            with identity.acting_as(principal):
                done = self.rotation.finish(account, target, h.resumed, created_at, purge_keys=False)
        except FailedPrecondition:
            return replace(h, outcome=Outcome.ERASED, next_attempt_at=None,
                           detail="the household was erased during the batch: its key is destroyed")
        except Exception as exc:  # noqa: BLE001 - a store down: retried by the next pass
            return self._retry(h, Outcome.RETRYING, f"{type(exc).__name__}: {exc}".replace(account, pseudonym(account)))
        # Each household is audited by name with the requester's principal, as the
        # synchronous batch did (review26): the request's own record names none.
        audit.record(audit.KEY_ROTATION, audit.household_resource(account), principal=principal,
                     details={"rpc": RPC, "dek_version": done.dek_version, "resumed": done.resumed})
        detail = ""
        if done.incomplete_purges:
            detail = ("completed; the purge of the old ciphertexts did not finish in "
                      + describe_purges(done.incomplete_purges).replace(account, pseudonym(account))
                      + ": remnants may remain there under a destroyed version — they open under no key Hearth "
                        "holds; if the old version leaked, fix the store's configuration (docs/privacy.md §11) "
                        "and purge")[:1000]
        return replace(h, outcome=Outcome.COMPLETED, dek_version=done.dek_version, next_attempt_at=None,
                       detail=detail, reencrypted=dict(done.reencrypted), destroyed=tuple(done.destroyed),
                       incomplete_purges=tuple(done.incomplete_purges))

    def _retry(self, h: HouseholdRotation, outcome: Outcome, detail: str) -> HouseholdRotation:
        attempts = h.attempts + 1
        if attempts >= self.max_attempts:
            return replace(h, outcome=Outcome.FAILED, attempts=attempts, next_attempt_at=None,
                           detail=f"{detail[:400]} (after {attempts} attempts; the rotation stays under way and "
                                  "the sweep keeps finishing it)")
        # A household whose begin failed stays pending (begun again by the next pass).
        return replace(h, outcome=Outcome.PENDING if h.outcome is Outcome.PENDING else outcome, attempts=attempts,
                       next_attempt_at=self._wall() + self.retry_s, detail=detail[:500])

    def _next_due(self, job: RotationBatch) -> datetime | None:
        if job.terminal:
            return None
        times = [h.next_attempt_at or self._wall() for h in job.households.values() if h.outcome not in FINAL]
        return datetime.fromtimestamp(min(times), UTC) if times else None

    def _wait(self, until: float, lease: _Lease | None) -> bool:
        """Wait until ``until`` (the settle's end), renewing the lease; False when the
        process stops or the lease was lost."""
        while (left := until - self._wall()) > 0:
            if self._stop.wait(min(left, self.lease_s / 3.0)):
                return False
            if lease is not None and not lease.renew():
                return False
        return True


class _Lease:
    """The lease a pass holds on its job (the store's fencing token), renewed by a
    heartbeat thread every third of the lease while the pass runs, so a Rekey slower than
    the lease keeps it and a killed holder's job is claimed again within a lease."""

    def __init__(self, jobs: DeletionJobStore, job_id: str, token: float, lease_s: float,
                 wall: Callable[[], float]) -> None:
        self._jobs, self._job_id, self._token, self._lease_s, self._wall = jobs, job_id, token, lease_s, wall
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="dek-rotation-lease", daemon=True)
        self._beat.start()

    @property
    def held(self) -> bool:
        return self._token is not None

    def renew(self) -> bool:
        with self._lock:
            if self._token is None:
                return False
            try:
                self._token = self._jobs.renew(self._job_id, self._token, self._wall(), self._lease_s)
            except Exception:  # noqa: BLE001 - the next beat tries again; the lease may run out
                return True
            if self._token is None:
                log.warning("batch rotation %s: its lease ran out and another replica took it; this pass stops",
                            self._job_id)
            return self._token is not None

    def _heartbeat(self) -> None:
        while not self._done.wait(self._lease_s / 3.0):
            if not self.renew():
                return

    def release(self) -> None:
        self._done.set()
        with self._lock:
            if self._token is not None:
                self._jobs.release(self._job_id, self._token)
                self._token = None
