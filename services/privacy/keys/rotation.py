"""Data key (DEK) rotation of one household: privacy's ``RotateDataKey``
(docs/privacy.md "Data key rotation"; runbook: docs/operations.md "Rotating a household's
data key").

A rotation is a state machine whose state is the household's key rows, so it needs no
job table of its own, and every step is idempotent:

1. **begin** (``KeyService.begin_rotation``): version n+1 is created, unless a rotation
   is already under way (a live version older than the newest that is not retired):
   that one is resumed. Never after a shred (the insert and the shred take the same
   household lock; the erasure wins).
2. **settle**: wait until ``settle_s`` after version n+1 was created. Until then a store
   may still seal new values under version n: each privacy replica's view of a
   household is up to ``keys.app.REFRESH_S`` (5 s) old, and each store keeps the
   "newest" key it was given for up to ``field_crypto.DEFAULT_TTL_S`` (60 s). After it,
   nothing seals under an older version (the default is the sum plus 5 s).
3. **re-encrypt**: each data-holding service's ``DataHolder/Rekey(account, n+1)``,
   repeated until a pass finds nothing under an older version (a write in flight during
   the first one). Each store purges the old ciphertexts physically, as after an erasure;
   a purge step that reports itself incomplete (a WAL kept or recycled, Redis's files not
   rewritten) does not stop the rotation: it is reported (the answer's
   ``incomplete_purges``, ``hearth_dek_rotation_purges_incomplete_total``, a warning), and
   step 4 is what leaves those remnants under no key Hearth holds.
4. **retire** (``KeyService.finish_rotation``): every older live version is destroyed
   (tombstone, purged), version 1 included since session 27: the digests of erased ids
   are keyed with the household's digest key, kept apart from the data keys
   (``keys.domain.DIGEST_KEY_VERSION``; derived from version 1 before it goes, for a
   household from before). Unless a data holder's ``Rekey`` answered without
   ``digests_keyed_apart`` (a release before session 27, which keys its digests with
   version 1 itself): version 1 is then retired and kept, as that release did.

**Progress per store is durable** (session 28, ``RekeyMarkers``, table ``rotation_rekeys``):
once a store's Rekey passes found nothing older and its purge ran after them, the rotation
marks it, and a resumed rotation (the sweep, a re-run, another replica, a batch claimed
again) skips it instead of calling its Rekey again — idempotent, but on PostgreSQL a purge
rewrites whole tables, and on a default PostgreSQL (``wal_recycle`` on: every purge
incomplete, its note kept) each re-run was another ``VACUUM FULL``. A **batch** re-encrypts
every household of a pass with the purge deferred (``reencrypt``), purges each store once
(``purge_deferred``), then retires each household (``finish``): one table rewrite per store
per batch pass instead of one per household (``purge_deferred`` says why that order keeps
the guarantees).

A crash anywhere leaves a rotation under way (step 1 done, step 4 not): the next
``RotateDataKey`` of the household resumes it, and so does every privacy replica's sweep
(``resume_unfinished``, every ``SWEEP_S``), for rotations begun longer than
``settle_s + ABANDONED_S`` ago. Two replicas working on the same household at once do the
same idempotent steps (the stores serialise ``Rekey`` in the household's lock; a tombstone
is written only over a live key). A household erased meanwhile: its key is shredded, the
stores' ``Rekey`` fails (FAILED_PRECONDITION, no key) and the rotation stops there; it
never creates a key after the shred.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from prometheus_client import Counter

from services.common import audit
from services.common.errors import (
    FailedPrecondition, HearthError, InvalidArgument, NotFound, ResourceExhausted, Unavailable)
from services.common.field_crypto import DEFAULT_TTL_S
from services.common.telemetry import pseudonym
from services.privacy.keys.app import REFRESH_S, KeyService

log = logging.getLogger("hearth.privacy.keys.rotation")

SETTLE_S = REFRESH_S + DEFAULT_TTL_S + 5.0
PASSES = 5
SWEEP_S = 60.0
# A rotation begun more than settle_s + this ago is taken as abandoned (its caller crashed
# or gave up) by the sweep; a live call finishes well within it.
ABANDONED_S = 240.0
MAX_BATCH = 1000
MAX_DAYS = 36500   # as the gateway's RotateDataKeysIn


def max_calls_for(max_workers: int) -> int:
    """How many ``RotateDataKey`` calls one privacy replica runs at once: each holds one of
    its ``max_workers`` RPC threads through the settle (~70 s), and the same threads serve
    every store's ``GetDataKey``, consent checks and deletions (review26: 16 concurrent
    rotations took all 16 and a new household's first events failed mesh-wide)."""
    return max(1, max_workers // 8)

ROTATIONS = Counter("hearth_dek_rotations_total",
                    "Household data key rotations finished (completed: older versions destroyed, whatever a "
                    "store's purge reported), refused because the household was erased (erased), or stopped by "
                    "an error and left for a retry or the sweep (failed)",
                    ["outcome"])
for _outcome in ("completed", "erased", "failed"):
    ROTATIONS.labels(_outcome)
# Session 27's first completion rule held a rotation open ("held", older versions kept) while
# a purge was incomplete; it was reversed the same session (docs/privacy.md §10): a rotation
# completes, and each store whose purge of the old ciphertexts did not finish is counted here.
PURGES_INCOMPLETE = Counter("hearth_dek_rotation_purges_incomplete_total",
                            "Data key rotations completed while a store's purge of the old ciphertexts reported "
                            "itself incomplete (remnants may remain there under a destroyed version: they open "
                            "under no key Hearth holds), per data-holding service",
                            ["service"])

class Rekeyed(NamedTuple):
    """One data holder's answer to ``DataHolder/Rekey``."""

    reencrypted: int
    # The purge steps of the old ciphertexts, as Erase's: {"store", "where", "action",
    # "complete"} — what the completion rule reads.
    purges: Sequence[dict] = ()
    # Whether the data holder keys erased-id digests apart from data key version 1
    # (RekeyResponse.digests_keyed_apart): false from a release before session 27.
    digests_keyed_apart: bool = True


# rekey(service, account_id, dek_version[, defer_purge=True]) -> Rekeyed (a bare count, or
# (count, keyed apart), from callers that know nothing of purges: none reported). Called
# with ``defer_purge`` only by a batch (``DataKeyRotation.reencrypt``).
Rekey = Callable[..., "Rekeyed | int | tuple[int, bool]"]


class StoreProgress(NamedTuple):
    """One data holder's durable progress in one rotation (``RekeyMarkers``)."""

    reencrypted: int
    keyed_apart: bool
    purged: bool                 # its purge ran after its last re-encryption of the household
    purges: tuple[dict, ...]     # that purge's steps, each named by its "service"
    marked_at: float


class RekeyMarkers:
    """The durable marker of a store's finished part of a rotation (privacy's
    ``rotation_rekeys``, migration 20): keyed by household, target version and service, so
    a marker never speaks for another rotation of the household. Written only after the
    store answered (a crash before it: the Rekey is run again, idempotent), deleted when
    the rotation retires its older versions or finds the household erased.

    Why skipping a marked store is safe: a store is marked only once a Rekey pass found
    nothing under an older version after the settle, when nothing seals under one any
    more, and its purge ran after that pass; the retirement that follows needs every
    store marked. What a marker cannot see is a store's database restored from a backup
    taken before its re-encryption while the rotation is still under way (values under the
    old version again): as before, the retirement then leaves them unreadable — don't
    restore a store while a rotation is under way (docs/operations.md)."""

    TABLE = "rotation_rekeys"

    def __init__(self, db) -> None:
        self.db = db

    def of(self, account_id: str, dek_version: int) -> dict[str, StoreProgress]:
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query(f"SELECT service, reencrypted, keyed_apart, purged, purges, marked_at FROM {self.TABLE} "
                            "WHERE account_id = ? AND dek_version = ?", (account_id, dek_version))
        return {s: StoreProgress(int(n), bool(apart), bool(purged), tuple(json.loads(purges)), float(at))
                for s, n, apart, purged, purges, at in rows}

    def mark(self, account_id: str, dek_version: int, service: str, done: StoreProgress) -> None:
        with self.db.transaction() as tx:
            tx.execute(f"INSERT INTO {self.TABLE} (account_id, dek_version, service, reencrypted, keyed_apart, "
                       "purged, purges, marked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (account_id, dek_version, service) DO UPDATE SET "
                       "reencrypted = excluded.reencrypted, keyed_apart = excluded.keyed_apart, "
                       "purged = excluded.purged, purges = excluded.purges, marked_at = excluded.marked_at",
                       (account_id, dek_version, service, done.reencrypted, int(done.keyed_apart), int(done.purged),
                        json.dumps(list(done.purges), sort_keys=True), done.marked_at))

    def mark_purged(self, service: str, households: Sequence[tuple[str, int]], purges: Sequence[dict],
                    at: float) -> None:
        """The one purge of ``service`` that ran after these households' re-encryption."""
        with self.db.transaction() as tx:
            tx.executemany(f"UPDATE {self.TABLE} SET purged = 1, purges = ?, marked_at = ? "
                           "WHERE account_id = ? AND dek_version = ? AND service = ?",
                           [(json.dumps(list(purges), sort_keys=True), at, a, v, service) for a, v in households])

    def forget(self, account_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute(f"DELETE FROM {self.TABLE} WHERE account_id = ?", (account_id,))


def _rekeyed(answer: Rekeyed | int | tuple[int, bool]) -> Rekeyed:
    if isinstance(answer, Rekeyed):
        return answer
    if isinstance(answer, int):
        return Rekeyed(answer)
    count, apart = answer
    return Rekeyed(count, (), bool(apart))


def incomplete_purges(purges: Sequence[dict]) -> list[dict]:
    """The purge steps that say they did not finish, as {"service", "store", "where",
    "action"}: reported with the completed rotation (docs/privacy.md §10)."""
    return [{"service": str(p.get("service", "?")), "store": str(p.get("store", "?")),
             "where": str(p.get("where", ""))[:300], "action": str(p.get("action", ""))[:300]}
            for p in purges if not p.get("complete", False)]


def describe_purges(steps: Sequence[dict]) -> str:
    """One line per incomplete purge step, for a log line or a batch household's detail."""
    return "; ".join(f"{p['service']}: {p['store']} {p['where']} ({p['action']})" for p in steps)


@dataclass
class RotationOutcome:
    account_id: str
    dek_version: int
    reencrypted: dict[str, int] = field(default_factory=dict)
    destroyed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    resumed: bool = False
    # The stores' purge steps of the old ciphertexts that reported themselves incomplete
    # (incomplete_purges): the rotation completed all the same.
    incomplete_purges: list[dict] = field(default_factory=list)


def _from_rpc(exc: grpc.RpcError, service: str) -> HearthError:
    code = exc.code() if isinstance(exc.code(), grpc.StatusCode) else None
    details = f"{service}: {exc.details() or 'no details'}"[:300]
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"the household was erased during the rotation ({details})", "account_id")
    return Unavailable(f"re-encryption did not finish ({details}); the rotation resumes when run again "
                       "or by the privacy service's sweep", "account_id")


class DataKeyRotation:
    def __init__(self, keys: KeyService, rekey: Rekey, services: Sequence[str], *, settle_s: float = SETTLE_S,
                 passes: int = PASSES, sweep_s: float = SWEEP_S, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None, max_calls: int = 2) -> None:
        self.keys = keys
        self.markers = RekeyMarkers(keys.store.db)
        self._rekey = rekey
        self.services = tuple(services)
        self.settle_s = settle_s
        self.passes = passes
        self.sweep_s = sweep_s
        self._wall = wall
        self._stop = threading.Event()
        # The settle is waited out on the stop event: a privacy process stopping (SIGTERM)
        # must not wait up to 70 s for a rotation's settle (the chart kills it after 20 s).
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        # SQLite: the first sweep after a start runs the key table's purge once (see sweep).
        self._purge_due = True
        self.max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls)
        for service in self.services:   # exported at 0 from the start (dashboards, rate())
            PURGES_INCOMPLETE.labels(service)

    # ---- one household ----------------------------------------------------------------

    @contextmanager
    def _admitted(self, field: str):
        """One of ``max_calls`` slots for a call that waits out a settle holding an RPC
        worker (a rotation, a batch); refused before anything is begun (no new version):
        the caller retries later."""
        if not self._calls.acquire(blocking=False):
            raise ResourceExhausted(f"{self.max_calls} data key rotation(s) already under way on this privacy "
                                    "replica (each waits out its settle holding a worker): retry when one has "
                                    "finished", field)
        try:
            yield
        finally:
            self._calls.release()

    def rotate(self, account_id: str) -> RotationOutcome:
        with self._admitted("account_id"):
            try:
                target, resumed, created_at = self.keys.begin_rotation(account_id)  # type: ignore[misc]
            except FailedPrecondition:
                ROTATIONS.labels("erased").inc()
                raise
            return self.finish(account_id, target, resumed, created_at)

    def finish(self, account_id: str, target: int, resumed: bool, created_at: datetime,
               purge_keys: bool = True) -> RotationOutcome:
        """Steps 2-4 of a rotation begun (``KeyService.begin_rotation``) at ``created_at``
        towards ``target``: the settle's rest, every store's Rekey, the completion rule
        and the retirement. Also the batch job's step per household (keys/batch.py), which
        passes ``purge_keys`` False and purges privacy's key tables once for its pass."""
        outcome = RotationOutcome(account_id, target, resumed=resumed)
        try:
            wait = created_at.timestamp() + self.settle_s - self._wall()
            if wait > 0:
                self._sleep(wait)
            if self._stop.is_set():
                raise Unavailable("the privacy service is stopping: the rotation is under way, run it again "
                                  "(it resumes)", "account_id")
            store_purges: list[dict] = []
            keyed_apart = True
            progress = self.markers.of(account_id, target)
            for service in self.services:
                done = progress.get(service)
                if done is None or not done.purged:
                    # Not marked, or re-encrypted by a batch whose purge has not run: Rekey
                    # (with its purge) now. A store marked purged is skipped (RekeyMarkers).
                    fresh = self._rekey_all(service, account_id, target)
                    done = fresh._replace(reencrypted=fresh.reencrypted + (done.reencrypted if done else 0))
                    self.markers.mark(account_id, target, service, done)
                outcome.reencrypted[service] = done.reencrypted
                store_purges.extend(done.purges)
                keyed_apart = keyed_apart and done.keyed_apart
            # The completion rule: older versions are destroyed once every store's Rekey
            # found nothing left under them, whatever the purge of the old ciphertexts
            # reported. Destroying the version is what makes the remnants a purge could not
            # reach (recycled WAL, a replication slot's or archive's WAL, Redis's files)
            # unreadable — crypto-shredding, as an erasure does; keeping it live would keep
            # them readable, and a leaked version is already in other hands either way.
            # Session 27's first rule held the rotation open instead (every rotation on a
            # default PostgreSQL, wal_recycle on, held for ever): reversed the same session.
            outcome.incomplete_purges = incomplete_purges(store_purges)
            if not keyed_apart:
                log.warning("a data holder of a release before session 27 keys erased-id digests with data key "
                            "version 1: the rotation of %s keeps version 1 (finish the upgrade, then rotate "
                            "again to destroy it)", pseudonym(account_id))
            purges: list[dict] = []
            outcome.destroyed, outcome.kept = self.keys.finish_rotation(account_id, target, purges,
                                                                        keep_first=not keyed_apart,
                                                                        purge=purge_keys)
        except FailedPrecondition:
            ROTATIONS.labels("erased").inc()
            self._forget_progress(account_id)
            raise
        except Exception:
            ROTATIONS.labels("failed").inc()
            raise
        ROTATIONS.labels("completed").inc()
        self._forget_progress(account_id)
        for service in sorted({p["service"] for p in outcome.incomplete_purges}):
            PURGES_INCOMPLETE.labels(service).inc()
        if outcome.incomplete_purges:
            log.warning("data key rotation of %s completed at v%d, but a purge of the old ciphertexts did not "
                        "finish in %s: remnants may remain there under destroyed version(s) %s — they open under "
                        "no key Hearth holds (but under kept version(s) %s, if any, until a rotation after the "
                        "upgrade); if an old version leaked, fix the store's configuration (docs/privacy.md §11) "
                        "and purge", pseudonym(account_id), target,
                        describe_purges(outcome.incomplete_purges).replace(account_id, pseudonym(account_id))[:600],
                        outcome.destroyed, outcome.kept)
        if outcome.destroyed:
            audit.record(audit.KEY_DESTROYED, audit.household_resource(account_id),
                         details={"reason": "data key rotation", "dek_version": target,
                                  "destroyed_versions": ",".join(map(str, outcome.destroyed))})
        log.info("data key of %s rotated to v%d (destroyed %s, kept %s, re-encrypted %s)", pseudonym(account_id),
                 target, outcome.destroyed, outcome.kept, outcome.reencrypted)
        return outcome

    def _forget_progress(self, account_id: str) -> None:
        try:
            self.markers.forget(account_id)
        except Exception:  # noqa: BLE001 - stale markers name a finished version: never read again
            log.warning("could not delete the rotation markers of %s", pseudonym(account_id), exc_info=True)

    def _rekey_all(self, service: str, account_id: str, target: int, defer_purge: bool = False) -> StoreProgress:
        """Rekey passes until one finds nothing under an older version: the values
        re-encrypted, whether the data holder keys its digests apart, and each purge
        step's latest state (per store and place: every pass purges the database again,
        Redis's files only after a pass that changed something), named by ``service``.
        ``defer_purge``: the batch's passes (no purge; ``purged`` is then true only for a
        data holder of an older release, which ignores the flag and purges anyway)."""
        total = 0
        latest: dict[tuple[str, str], dict] = {}
        for _ in range(self.passes):
            try:
                raw = (self._rekey(service, account_id, target, defer_purge=True) if defer_purge
                       else self._rekey(service, account_id, target))
            except grpc.RpcError as exc:
                raise _from_rpc(exc, service) from None
            answer = _rekeyed(raw)
            total += answer.reencrypted
            latest.update({(str(p.get("store")), str(p.get("where"))): {**p, "service": service}
                           for p in answer.purges})
            if answer.reencrypted == 0:
                return StoreProgress(total, answer.digests_keyed_apart, not defer_purge or bool(latest),
                                     tuple(latest.values()), self._wall())
        raise Unavailable(f"{service} still held values under an older data key version after {self.passes} "
                          "passes (writes under the old key kept arriving): run the rotation again", "account_id")

    # ---- a batch: re-encrypt every household, purge each store once, retire each -------

    def reencrypt(self, account_id: str, target: int) -> None:
        """A batch's step 3 for one household begun and settled: every store's Rekey with
        its purge deferred, each store marked as it answers (a store marked before — a pass
        cut by a crash — is not called again). The household is retired by ``finish`` once
        ``purge_deferred`` ran for its stores."""
        progress = self.markers.of(account_id, target)
        for service in self.services:
            if service not in progress:
                self.markers.mark(account_id, target, service, self._rekey_all(service, account_id, target,
                                                                               defer_purge=True))

    def purge_deferred(self, households: Sequence[tuple[str, int]]) -> None:
        """After ``reencrypt`` of every household of a batch pass: each store's purge, once
        — one more Rekey of the last household without ``defer_purge`` (it finds nothing
        left, or a value a late write sealed, and purges the whole store: on PostgreSQL the
        notes every deferred Rekey left, so ``VACUUM FULL`` once for the batch; SQLite a
        checkpoint; Redis's files, noted owed by the deferred calls). Its purge steps are
        every household's, as each household's own purge was before.

        Why this order keeps the guarantees (the threat: a copy of an old version taken
        before the rotation — the reason to rotate — opening the old ciphertexts in a
        store's files, or a later theft of privacy's key store and a KEK opening them):
        * an older version is destroyed only by ``finish``, which needs every store
          marked purged, i.e. re-encrypted (a pass found nothing older) *and* purged after
          that — so no household loses a version while a store still holds a value under
          it, and none is retired before the purge of its old ciphertexts was attempted;
        * an incomplete purge is reported for every household it covered, as each
          household's own incomplete purge was (``incomplete_purges``, the metric), and
          the store keeps its note, so its next purge (any erasure or rotation) tries again;
        * what the deferral changes: a household's old ciphertexts stay in dead tuples and
          WAL, under a still-live version, until the batch's purge rather than its own —
          at most one batch pass (the re-encryption of its households; the settle is
          waited before it). A holder of a leaked version reads them only with the store's
          files, until the purge, as before; a suspected leak is the single rotation's case
          (``rotate``: purged at once, per household), a policy batch is routine.
        * a crash anywhere: markers not purged are finished by the next pass (the job
          claimed again) or, once abandoned, by ``finish`` (the sweep, a re-run), which
          Rekeys such a store with its purge. Re-running this purge is cheap (PostgreSQL:
          nothing noted is left once one was complete)."""
        for service in self.services:
            owed = [(a, v) for a, v in households
                    if (p := self.markers.of(a, v).get(service)) is not None and not p.purged]
            if not owed:
                continue
            for last, version in reversed(owed):
                try:
                    done = self._rekey_all(service, last, version)
                except FailedPrecondition:   # that household was erased meanwhile: purge through another
                    continue
                self.markers.mark_purged(service, owed, done.purges, self._wall())
                break

    # ---- many households ----------------------------------------------------------------

    def rotate_older_than(self, days: float, limit: int) -> list[RotationOutcome]:
        """Rotate up to ``limit`` households whose newest data key is older than ``days``
        days, oldest first: every one begun first, so they settle together (one wait, not
        one per household). A household erased meanwhile is skipped."""
        if not 0 < days <= MAX_DAYS:   # past it no date is that far back (OverflowError: INTERNAL until review26)
            raise InvalidArgument(f"must be in (0, {MAX_DAYS}]", "older_than_days")
        if not 0 < limit <= MAX_BATCH:
            raise InvalidArgument(f"must be in 1..{MAX_BATCH}", "limit")
        before = datetime.fromtimestamp(self._wall(), UTC) - timedelta(days=days)
        with self._admitted("limit"):
            begun = []
            for account_id in self.keys.store.newest_created_before(before.isoformat(), limit):
                try:
                    begun.append((account_id, *self.keys.begin_rotation(account_id)))
                except (FailedPrecondition, NotFound):
                    continue
            done = []
            for b in begun:
                try:
                    done.append(self.finish(*b))
                except FailedPrecondition:   # erased during the settle: its key is shredded (review26)
                    continue
                # The call's own key_rotation record names no household (its request names
                # none), and a first rotation destroys no version: each household is
                # recorded here, with the caller's principal (review26).
                audit.record(audit.KEY_ROTATION, audit.household_resource(done[-1].account_id),
                             details={"rpc": "hearth.privacy.v1.Keys/RotateDataKeys",
                                      "dek_version": done[-1].dek_version, "resumed": done[-1].resumed})
            return done

    def resume_unfinished(self, limit: int = 100) -> int:
        """Finish rotations begun over ``settle_s + ABANDONED_S`` ago (the sweep)."""
        finished = 0
        for account_id in self.keys.store.rotations_in_progress(limit):
            try:
                begun = self.keys.begin_rotation(account_id, create=False)
                if begun is None:   # finished meanwhile
                    continue
                target, _, created_at = begun
                if created_at.timestamp() > self._wall() - self.settle_s - ABANDONED_S:
                    continue
                if any(not p.purged and p.marked_at > self._wall() - ABANDONED_S
                       for p in self.markers.of(account_id, target).values()):
                    # A batch pass re-encrypted it lately and its one purge of the store is
                    # still to come: finishing it here would purge per household again.
                    continue
                self.finish(account_id, target, True, created_at)
                finished += 1
            except (FailedPrecondition, NotFound):
                continue
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                log.warning("resuming the data key rotation of %s failed: %s", pseudonym(account_id),
                            str(exc).replace(account_id, pseudonym(account_id))[:300])
        return finished

    def start(self) -> None:
        if self._thread is None and self.sweep_s > 0:
            self._thread = threading.Thread(target=self._loop, name="dek-rotation-sweep", daemon=True)
            self._thread.start()

    def sweep(self) -> int:
        """One sweep: finish abandoned rotations, then run the physical purge of the key
        table a destruction noted and did not run (privacy killed between the tombstone's
        commit and its purge: the old wrapped key stayed in the WAL / dead tuples, and
        nothing retried it — a re-run finds the version destroyed and destroys nothing).
        PostgreSQL: every sweep (a no-op unless a purge is noted); SQLite, which notes
        nothing: the first sweep after a start (the restart after such a kill)."""
        finished = self.resume_unfinished()
        if self._purge_due:
            # Once after a start: digest keys a privacy replica of the release before
            # session 27 left live when it shredded their households (a rolling upgrade).
            self.keys.store.shred_orphan_digest_keys(datetime.now(UTC).isoformat())
        if self._purge_due or self.keys.store.db.dialect != "sqlite":
            self.keys.store.purge_owed()
            self._purge_due = False
        return finished

    def _loop(self) -> None:
        while not self._stop.wait(self.sweep_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a database outage: the next sweep tries again
                log.warning("data key rotation sweep failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
