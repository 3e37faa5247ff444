"""Durable state of deletion jobs (privacy service, deletion room).

``DeletionJobStore`` keeps each job as ``deletion.job_to_dict`` JSON plus the columns the
worker queries (state, next_due, lease). Every update is a compare-and-swap on
``version`` so two replicas (or a replica and its own restarted self) never overwrite a
newer state; the lease keeps two replicas from calling the same services at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.errors import AlreadyExists, Conflict, NotFound
from services.common.storage.sql import Database
from services.privacy.deletion.domain import DeletionJob, job_from_dict, job_to_dict


@dataclass(frozen=True)
class StoredJob:
    job: DeletionJob   # or the table's own job type (a batch rotation's: keys/batch.py)
    request_id: str
    reason: str
    version: int
    erasures: dict            # service -> {"deleted_counts": {...}, "already_erased": bool}
    receipt_json: str | None
    trace_context: str = ""  # JSON W3C carrier of the request (telemetry.context_carrier)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


# The off-site deletion ledger's row in ledger_exports (the CronJob's one file).
LEDGER_EXPORT_NAME = "deletion-ledger"

# A job a step of which waits for another job: deletion.job_to_dict writes a step's
# "waiting_for" key only while it is set (json.dumps' separators; "_" escaped for LIKE). A
# value cannot hold it: a quote inside a JSON string is written \". A replica of a release
# before session 36 rewrites the job without it: the job then counts as not waiting.
WAITING_PATTERN = '%"waiting\\_for": "%'

# No stored time is later than this (year 33658): "no bound" in due/claim.
_NEVER = 1e12


class DeletionJobStore:
    """Also the store of batch data key rotations (``keys/batch.py``: ``table``
    ``rotation_jobs``, its own codec): the same idempotent create, compare-and-swap and
    leases, over a table of the same columns. A job is any object with ``job_id``,
    ``state`` (a str enum) and ``scope`` (with ``account_id``, compared on a repeated
    ``request_id``)."""

    def __init__(self, db: Database, table: str = "deletion_jobs",
                 codec: tuple[Callable[[Any], dict], Callable[[dict], Any]] = (job_to_dict, job_from_dict)) -> None:
        self.db = db
        self.table = table
        self._to_dict, self._from_dict = codec

    def create(self, job: DeletionJob, request_id: str, reason: str, next_due: datetime | None,
               trace_context: str = "") -> StoredJob:
        """Insert a new job; if ``request_id`` was used before, return that job instead
        (idempotent request) when its scope is the same, else AlreadyExists."""
        data = json.dumps(self._to_dict(job), sort_keys=True)
        with self.db.transaction() as tx:
            inserted = tx.execute(
                f"INSERT INTO {self.table} (job_id, request_id, account_id, reason, state, next_due, "
                "lease_until, version, job_json, erasures_json, receipt_json, created_at, trace_context) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, 1, ?, '{}', NULL, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (job.job_id, request_id, job.scope.account_id, reason, job.state.value, _ts(next_due),
                 data, time.time(), trace_context))
            if inserted:
                self._created(tx, job)
        if inserted:
            return StoredJob(job, request_id, reason, 1, {}, None, trace_context)
        existing = self.by_request(request_id)
        if existing.job.scope != job.scope:
            raise AlreadyExists("request_id was already used for a different scope", "request_id")
        return existing

    def _created(self, tx, job) -> None:
        """In the transaction that inserted ``job``: rows it keeps beside its own (a
        subclass's; ``RotationJobStore`` writes each household's outcome)."""

    def _row(self, where: str, params: tuple) -> StoredJob | None:
        # A read transaction (review33): GetDeletion is polled by every client waiting for its
        # erasure, and in a write one (SQLite: the one write lock) each poll waited behind any
        # write of privacy's database. A job's changes are compare-and-swapped on its version.
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT job_json, request_id, reason, version, erasures_json, receipt_json, "
                            f"trace_context FROM {self.table} WHERE {where}", params)
        if not rows:
            return None
        r = rows[0]
        return StoredJob(self._from_dict(json.loads(r[0])), r[1], r[2], int(r[3]), json.loads(r[4]), r[5],
                         r[6])

    def get(self, job_id: str) -> StoredJob:
        found = self._row("job_id = ?", (job_id,))
        if found is None:
            raise NotFound(f"unknown job {job_id!r}", "job_id")
        return found

    def by_request(self, request_id: str) -> StoredJob:
        found = self._row("request_id = ?", (request_id,))
        if found is None:
            raise NotFound(f"no job for request {request_id!r}", "request_id")
        return found

    def save(self, stored: StoredJob, job: DeletionJob, next_due: datetime | None,
             erasures: dict | None = None, receipt_json: str | None = None) -> StoredJob:
        """Compare-and-swap on ``stored.version``; Conflict when another writer won."""
        erasures = stored.erasures if erasures is None else erasures
        receipt_json = stored.receipt_json if receipt_json is None else receipt_json
        with self.db.transaction() as tx:
            changed = tx.execute(
                f"UPDATE {self.table} SET state = ?, next_due = ?, version = ?, job_json = ?, "
                "erasures_json = ?, receipt_json = ? WHERE job_id = ? AND version = ?",
                (job.state.value, _ts(next_due), stored.version + 1,
                 json.dumps(self._to_dict(job), sort_keys=True), json.dumps(erasures, sort_keys=True),
                 receipt_json, job.job_id, stored.version))
        if changed != 1:
            raise Conflict(f"job {job.job_id} changed concurrently", "job_id")
        return StoredJob(job, stored.request_id, stored.reason, stored.version + 1, erasures, receipt_json,
                         stored.trace_context)

    def due(self, now: float, limit: int = 100, future_bound_s: float | None = None) -> list[str]:
        """Ids of jobs that need work at ``now`` and are not leased by a live worker.
        ``future_bound_s``: a due time or lease end later than ``now`` + it was written by
        a clock stepped forward: the job is due, the lease free (app.FUTURE_MARGIN_S)."""
        far = now + future_bound_s if future_bound_s is not None else _NEVER
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT job_id FROM {self.table} WHERE state IN ('pending', 'running') "
                            "AND (next_due IS NULL OR next_due <= ? OR next_due > ?) "
                            "AND (lease_until < ? OR lease_until > ?) "
                            "ORDER BY next_due LIMIT ?", (now, far, now, far, limit))
        return [r[0] for r in rows]

    def open_jobs(self, limit: int = 1000) -> list[StoredJob]:
        """Pending and running jobs, oldest first."""
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT job_id FROM {self.table} WHERE state IN ('pending', 'running') "
                            "ORDER BY created_at LIMIT ?", (limit,))
        return [job for job in (self._row("job_id = ?", (r[0],)) for r in rows) if job is not None]

    def next_due(self) -> float | None:
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT MIN(next_due) FROM {self.table} WHERE state IN ('pending', 'running')")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def oldest_open_created_at(self, waiting: bool | None = None) -> float | None:
        """Creation time of the oldest pending or running job (the overdue alert); ``waiting``
        True: of those a step of which waits for another job (``WAITING_PATTERN``), False:
        of the others, None: of all."""
        where, params = "", ()
        if waiting is not None:
            where, params = f" AND job_json {'' if waiting else 'NOT '}LIKE ? ESCAPE '\\'", (WAITING_PATTERN,)
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT MIN(created_at) FROM {self.table} WHERE state IN ('pending', 'running')"
                            + where, params)
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    # A lease is its expiry time, and that value is also the holder's fencing token: a
    # claim writes ``now + lease_s`` (a replica can claim only after the previous lease ran
    # out, so no two claims write the same value) and the holder renews and releases only
    # the value it holds. Until session 20 renew and release matched the job alone: a pass
    # whose lease had run out while a peer did not answer renewed or freed the lease the
    # next replica had taken, so a third pass could claim the job beside the two.
    def claim(self, job_id: str, now: float, lease_s: float, future_bound_s: float | None = None) -> float | None:
        """Take a job whose lease has run out (or ends later than ``now`` +
        ``future_bound_s``: a clock step's, see ``due``): the lease held (its token), or None."""
        until = now + lease_s
        far = now + future_bound_s if future_bound_s is not None else _NEVER
        with self.db.transaction() as tx:
            taken = tx.execute(f"UPDATE {self.table} SET lease_until = ? WHERE job_id = ? "
                               "AND (lease_until < ? OR lease_until > ?)", (until, job_id, now, far)) == 1
        return until if taken else None

    def renew(self, job_id: str, held: float, now: float, lease_s: float) -> float | None:
        """The lease ``held`` (a claim's or a renewal's token) renewed from now; None when
        it is no longer this holder's (it ran out and another replica claimed the job)."""
        until = max(now + lease_s, held)
        if held > now + lease_s:
            # Written while this replica's clock was ahead (a step since put right): brought
            # back to now + lease_s, and checked — another replica may have taken it (``due``
            # treats a lease that far ahead as free). Until session 24 it was kept unchecked
            # until the clock caught up, while the other replica's pass ran beside this one.
            until = now + lease_s
        elif until == held:
            return held
        with self.db.transaction() as tx:
            kept = tx.execute(f"UPDATE {self.table} SET lease_until = ? WHERE job_id = ? AND lease_until = ?",
                              (until, job_id, held)) == 1
        return until if kept else None

    def extend_lease(self, job_id: str, now: float, lease_s: float) -> None:
        """Hold a job for ``lease_s`` from now without having claimed it (a direct
        ``DeletionCoordinator.advance``: tools and tests); never shortens a lease."""
        with self.db.transaction() as tx:
            tx.execute(f"UPDATE {self.table} SET lease_until = ? WHERE job_id = ? AND lease_until < ?",
                       (now + lease_s, job_id, now + lease_s))

    def release(self, job_id: str, held: float) -> bool:
        """Free the lease ``held`` at once (the job may be claimed again); False when it
        was no longer this holder's."""
        with self.db.transaction() as tx:
            return tx.execute(f"UPDATE {self.table} SET lease_until = 0 WHERE job_id = ? AND lease_until = ?",
                              (job_id, held)) == 1

    def last_retention_end(self, reason: str, newest: int = 24, stamped_by: float | None = None) -> float | None:
        """The latest end among the newest ``newest`` retention purges (account "*",
        ``reason``) that did not fail: how far the purge has erased (None: never).
        ``stamped_by``: also among the newest ``newest`` created no later than it. Purges
        requested while the clock was ahead (a step since put right) stay the "newest" by
        their ``created_at`` until the clock catches up; until review24, after more than
        ``newest`` of them (a day of hourly checks a year ahead) every later purge was
        held at their end + a day, for the step's length: nothing erased past it."""
        query = (f"SELECT job_json FROM {self.table} WHERE account_id = '*' AND reason = ? "
                 "AND state <> 'failed'{} ORDER BY created_at DESC LIMIT ?")
        with self.db.transaction() as tx:
            rows = tx.query(query.format(""), (reason, newest))
            if stamped_by is not None:
                rows = list(rows) + list(tx.query(query.format(" AND created_at <= ?"), (reason, stamped_by, newest)))
        ends = [job_from_dict(json.loads(r[0])).scope.end for r in rows]
        return max((e for e in ends if e is not None), default=None)

    def record_clock(self, worker: str, offset_s: float, server_now: float, live_s: float) -> list[float]:
        """Store ``worker``'s clock offset from the database server's (measured at the
        server's ``server_now``) and return the offsets of the other workers measured within
        ``live_s`` of it; rows of workers gone for a day are removed."""
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO deletion_clocks (worker, offset_s, measured_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (worker) DO UPDATE SET offset_s = excluded.offset_s, "
                       "measured_at = excluded.measured_at", (worker, offset_s, server_now))
            tx.execute("DELETE FROM deletion_clocks WHERE measured_at < ?", (server_now - 86400.0,))
            rows = tx.query("SELECT offset_s FROM deletion_clocks WHERE worker <> ? AND measured_at >= ?",
                            (worker, server_now - live_s))
        return [float(r[0]) for r in rows]

    def record_ledger_export(self, exported_at: float, export_id: str, entries: int,
                             name: str = LEDGER_EXPORT_NAME) -> None:
        """Note a successful off-site ledger export (``hearth ledger export``, after its file
        is in place): what hearth_ledger_last_export_timestamp_seconds reads. Never moves it
        back: an export noted after a newer one (two runs overlapping, one slower) is not
        the last (review34)."""
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO ledger_exports (name, exported_at, export_id, entries) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET exported_at = excluded.exported_at, "
                       "export_id = excluded.export_id, entries = excluded.entries "
                       "WHERE excluded.exported_at > ledger_exports.exported_at",
                       (name, float(exported_at), export_id, int(entries)))

    def last_ledger_export_at(self, name: str = LEDGER_EXPORT_NAME) -> float | None:
        """When the last successful off-site ledger export was exported; None: never."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT exported_at FROM ledger_exports WHERE name = ?", (name,))
        return float(rows[0][0]) if rows else None

    def for_account(self, account_id: str) -> list[StoredJob]:
        with self.db.transaction(readonly=True) as tx:   # an export's read (``_row``)
            ids = [r[0] for r in tx.query(f"SELECT job_id FROM {self.table} WHERE account_id = ? "
                                          "ORDER BY created_at, job_id", (account_id,))]
        return [self.get(i) for i in ids]
