"""The audit log's tables and its reads (queries, single entries, stored tree heads, the
JSONL export) over SQLite/PostgreSQL.

Tables (migrations 10 and 11, ``AUDIT_MIGRATIONS``):

``audit_entries``  one row per entry: ``seq`` (PK, dense from 0), the entry's canonical
                   bytes (the signed leaf data: the truth), its leaf hash and chain hash,
                   ``record_id`` (idempotency key, see below) and copies of the fields
                   queries filter on (``ts`` as Unix seconds, event type, principal, role,
                   resource, outcome, trace id). Query results are decoded from the
                   canonical bytes, never from the copies; ``verify`` checks the copies
                   agree with the canonical bytes. Indexes: (principal, seq), trace_id
                   and ts: what QueryAudit filters use, nothing more (each index costs
                   every append).
``audit_state``    one row (id = 1): the writer state ``AuditState.to_bytes()`` and its
                   size. Updated with compare-and-swap on ``size``, so a second writer on
                   the same database (another replica) fails its batch instead of forking
                   the log; the loser reloads the state and retries.
``audit_sth``      signed tree heads (``tree_size`` PK, STH JSON): the latest, and of the
                   earlier ones the last of each history interval (writer.py ``_thins``;
                   until session 30 one per committed batch, which older logs keep).

The writes are writer.py's (group commit); proofs and verification are proofs.py's;
the row layout is rows.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.storage.sql import Database, Migration, migrate
from services.privacy.audit.domain import SignedTreeHead, canonical_json, format_ts, parse_ts
from services.privacy.audit.rows import ENTRY_COLUMNS, StoredEntry, entry_from_canonical, export_line

AUDIT_MIGRATIONS = [
    Migration(10, "audit_log", """
CREATE TABLE IF NOT EXISTS audit_entries (
    seq {bigint} PRIMARY KEY,
    ts {double} NOT NULL,
    event_type TEXT NOT NULL,
    principal TEXT NOT NULL,
    role TEXT NOT NULL,
    resource TEXT NOT NULL,
    outcome TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    record_id TEXT,
    canonical {blob} NOT NULL,
    leaf_hash {blob} NOT NULL,
    chain_hash {blob} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_entries_record_id ON audit_entries (record_id);
CREATE INDEX IF NOT EXISTS audit_entries_principal ON audit_entries (principal, seq);
CREATE INDEX IF NOT EXISTS audit_entries_resource ON audit_entries (resource, seq);
CREATE INDEX IF NOT EXISTS audit_entries_trace ON audit_entries (trace_id);
CREATE TABLE IF NOT EXISTS audit_state (
    id INTEGER PRIMARY KEY,
    size {bigint} NOT NULL,
    state {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_sth (
    tree_size {bigint} PRIMARY KEY,
    sth_json TEXT NOT NULL
)
"""),
    # Write cost: every secondary index costs each appended row a B-tree insert, and one
    # keyed by a random value (record_id is a uuid4) dirties a random page per row (a
    # 4 KiB WAL frame each once the index outgrows the batch), the largest single cost
    # of a durable append. record_id is an idempotency key, looked up only for retries:
    # the writer keeps the ids of the recent entries in memory and finds older ones
    # through ``ts`` (a retry carries its record's original ts), an index whose inserts
    # land at its right edge and that also serves QueryAudit's time window. The
    # resource index never served a query: prefix filters use substr(), which neither
    # SQLite nor PostgreSQL can answer from a B-tree.
    Migration(11, "audit_log_write_indexes", """
DROP INDEX IF EXISTS audit_entries_record_id;
DROP INDEX IF EXISTS audit_entries_resource;
CREATE INDEX IF NOT EXISTS audit_entries_ts ON audit_entries (ts)
"""),
]

MAX_QUERY_LIMIT = 10_000
# The canonical bytes a QueryAudit page holds at most (always at least one entry): its
# answer carries each entry about three times (canonical bytes, details_json and the
# details map), well below HEARTH_GRPC_MAX_RESPONSE_BYTES (64 MiB) at 8 MiB.
QUERY_PAGE_BYTES = 8 << 20
DEFAULT_QUERY_LIMIT = 100
# The pages of the whole-log reads (VerifyAudit, the export): rows per page (and at most
# QUERY_PAGE_BYTES of canonical bytes), stored tree heads per page.
ROWS_PAGE = 2_000
HEADS_PAGE = 1_000


@dataclass(frozen=True)
class AuditQuery:
    principal_id: str = ""
    resource_prefix: str = ""
    event_type: str = ""
    trace_id: str = ""
    outcome: str = ""
    start: datetime | None = None    # [start, end) on ts
    end: datetime | None = None
    after_seq: int | None = None     # entries with seq > after_seq
    limit: int = DEFAULT_QUERY_LIMIT


class AuditStore:
    """Reads of the log's tables; the writer (writer.py) is the only one that writes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self) -> list[int]:
        """Apply the privacy service's migrations (the audit tables are among them)."""
        from services.privacy.migrations import MIGRATIONS

        return migrate(self.db, MIGRATIONS)

    def sth_at(self, tree_size: int) -> SignedTreeHead | None:
        """The stored STH of exactly ``tree_size``, if the table kept one (writer.py ``_thins``)."""
        with self.db.transaction() as tx:
            row = tx.query("SELECT sth_json FROM audit_sth WHERE tree_size = ?", (tree_size,))
        return SignedTreeHead.from_dict(json.loads(row[0][0])) if row else None

    def query(self, q: AuditQuery) -> tuple[list[StoredEntry], bool]:
        """Entries matching every given filter, ascending seq, at most ``q.limit``;
        the flag says whether more follow."""
        limit = q.limit or DEFAULT_QUERY_LIMIT
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise InvalidArgument(f"must be in 1..{MAX_QUERY_LIMIT}", "limit")
        where, params = [], []
        if q.after_seq is not None:
            where.append("seq > ?")
            params.append(q.after_seq)
        for column, value in (("principal", q.principal_id), ("event_type", q.event_type),
                              ("trace_id", q.trace_id), ("outcome", q.outcome)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if q.resource_prefix:
            # substr rather than LIKE: no wildcard escaping, and case-sensitive on both backends.
            where.append("substr(resource, 1, ?) = ?")
            params += [len(q.resource_prefix), q.resource_prefix]
        if q.start is not None:
            where.append("ts >= ?")
            params.append(_seconds(q.start, "window.start"))
        if q.end is not None:
            where.append("ts < ?")
            params.append(_seconds(q.end, "window.end"))
        matching = " WHERE " + " AND ".join(where) if where else ""
        with self.db.transaction() as tx:
            # The sizes first (length() reads no content: SQLite's length optimisation, a
            # TOAST pointer's size on PostgreSQL), then only the entries of a page of at
            # most QUERY_PAGE_BYTES (attack31: 200 entries of 900 KB took privacy from 231
            # to 2,071 MB for a 540 MB answer it could not send).
            sizes = tx.query(f"SELECT seq, length(canonical) FROM audit_entries{matching} ORDER BY seq LIMIT ?",
                             [*params, limit + 1])
            chosen, total = 0, 0
            for _, size in sizes[:limit]:
                if chosen and total + int(size) > QUERY_PAGE_BYTES:
                    break
                chosen, total = chosen + 1, total + int(size)
            if not chosen:
                return [], False
            bounded = " AND ".join([*where, "seq >= ?", "seq <= ?"])
            rows = tx.query(f"SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE {bounded} ORDER BY seq",
                            [*params, sizes[0][0], sizes[chosen - 1][0]])
        return [self._stored(r) for r in rows], chosen < len(sizes)

    def _stored(self, row) -> StoredEntry:
        canonical = bytes(row[1])
        try:
            entry = entry_from_canonical(canonical)
        except ValueError:
            raise FailedPrecondition(f"audit entry at seq {row[0]} is unreadable: the log was "
                                     "altered (run VerifyAudit)", "seq") from None
        return StoredEntry(entry, canonical, bytes(row[2]))

    def entry(self, seq: int) -> StoredEntry:
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE seq = ?", (seq,))
        if not rows:
            raise NotFound(f"no audit entry {seq}", "inclusion_seq")
        return self._stored(rows[0])

    def iter_rows(self, batch: int | None = None, page_bytes: int | None = None) -> Iterator[tuple]:
        """Every stored row (seq, canonical, chain_hash, ts, event_type, principal, role,
        resource, outcome, trace_id) in seq order, read in pages of at most ``batch`` rows
        and ``page_bytes`` of canonical bytes (always at least one row), each its own
        transaction: what VerifyAudit and the export hold at once. The sizes are read
        first, as ``query`` does: until session 32 a page was 10,000 rows whatever their
        size (entries stored before attack31's 64 KiB bound may hold 1 MB each)."""
        batch = batch or ROWS_PAGE
        page_bytes = page_bytes or QUERY_PAGE_BYTES
        last = -1
        while True:
            with self.db.transaction() as tx:
                sizes = tx.query("SELECT seq, length(canonical) FROM audit_entries WHERE seq > ? "
                                 "ORDER BY seq LIMIT ?", (last, batch))
                chosen, total = 0, 0
                for _, size in sizes:
                    if chosen and total + int(size) > page_bytes:
                        break
                    chosen, total = chosen + 1, total + int(size)
                rows = tx.query("SELECT seq, canonical, chain_hash, ts, event_type, principal, role, "
                                "resource, outcome, trace_id FROM audit_entries WHERE seq > ? AND seq <= ? "
                                "ORDER BY seq", (last, sizes[chosen - 1][0])) if chosen else []
            yield from rows
            if chosen == len(sizes) < batch:
                return
            last = sizes[chosen - 1][0]
            rows = sizes = None   # not held while the next page is read: one page at a time

    def stored_latest_sth(self) -> SignedTreeHead | None:
        with self.db.transaction() as tx:
            row = tx.query("SELECT sth_json FROM audit_sth ORDER BY tree_size DESC LIMIT 1")
        if not row:
            return None
        try:
            return SignedTreeHead.from_dict(json.loads(row[0][0]))
        except (ValueError, json.JSONDecodeError):
            return None

    def iter_tree_heads(self, batch: int | None = None, after: int | None = None) -> Iterator[tuple[int, str]]:
        """Every stored signed tree head row as (tree_size column, STH JSON), ascending
        size, read in pages (logs written before session 30 keep one head per batch);
        ``after``: only those of a larger size."""
        batch = batch or HEADS_PAGE
        last = after
        while True:
            with self.db.transaction() as tx:
                rows = tx.query("SELECT tree_size, sth_json FROM audit_sth"
                                + (" WHERE tree_size > ?" if last is not None else "")
                                + " ORDER BY tree_size LIMIT ?", (last, batch) if last is not None else (batch,))
            yield from ((int(r[0]), r[1]) for r in rows)
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def export_lines(self, sth: SignedTreeHead | None) -> Iterator[str]:
        """The JSONL export (``audit.export_lines`` format) of the log up to the latest
        signed tree head; verify offline with ``hearth audit verify``."""
        if sth is None:
            raise FailedPrecondition("the audit log is empty: nothing to export")
        for row in self.iter_rows():
            if row[0] >= sth.tree_size:
                break
            yield export_line(bytes(row[1]), bytes(row[2]))
        yield canonical_json({"sth": sth.to_dict()}).decode("utf-8")




def _seconds(value: datetime, field: str) -> float:
    """A window bound as stored: Unix seconds of the microsecond-truncated UTC time."""
    return parse_ts(format_ts(value, field), field).timestamp()
