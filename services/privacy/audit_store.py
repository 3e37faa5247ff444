"""The audit log's repository: durable, group-committed appends over SQLite/PostgreSQL,
with an in-memory Merkle tree for proofs.

Tables (migration 10, ``AUDIT_MIGRATIONS``):

``audit_entries``  one row per entry: ``seq`` (PK, dense from 0), the entry's canonical
                   bytes (the signed leaf data: the truth), its leaf hash and chain hash,
                   ``record_id`` (unique idempotency key) and copies of the fields queries
                   filter on (``ts`` as Unix seconds, event type, principal, role,
                   resource, outcome, trace id). Query results are decoded from the
                   canonical bytes, never from the copies; ``verify`` checks the copies
                   agree with the canonical bytes.
``audit_state``    one row (id = 1): the writer state ``AuditState.to_bytes()`` and its
                   size. Updated with compare-and-swap on ``size``, so a second writer on
                   the same database (another replica) fails its batch instead of forking
                   the log; the loser reloads the state and retries.
``audit_sth``      one signed tree head per committed batch (``tree_size`` PK, STH JSON).

Write path (``append``): callers submit records to a ``GroupCommitter``; its single
writer thread assigns seqs, builds the entries, runs ``append_batch`` (pure), signs one
tree head and writes entries + state + STH in ONE transaction. Callers are answered
only after the commit, so an acknowledged record survives a crash. ``after_commit``
(the suspicious-activity detector) runs in the same thread after every commit and may
return more records (security alerts), committed right away in their own transaction.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common.audit import AuditRecord
from services.common.batching import GroupCommitter
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from services.common.storage.sql import Database, Migration, migrate
from services.privacy.domain import merkle
from services.privacy.domain.audit import (
    AuditEntry,
    AuditState,
    LogVerification,
    SignedTreeHead,
    TamperReason,
    append_batch,
    canonical_json,
    format_ts,
    parse_ts,
    sign_tree_head,
    verify_log,
)
from services.privacy.domain.keys import Ed25519PrivateKey

log = logging.getLogger("hearth.privacy.audit")

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
]

MAX_QUERY_LIMIT = 10_000
DEFAULT_QUERY_LIMIT = 100
_ENTRY_COLUMNS = "seq, canonical, chain_hash"
_INSERT = ("INSERT INTO audit_entries (seq, ts, event_type, principal, role, resource, outcome, "
           "trace_id, record_id, canonical, leaf_hash, chain_hash) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class _StateConflict(Exception):
    """Another writer moved the log (or the commit outcome is unknown): reload, retry."""


@dataclass
class _Pending:
    """One record waiting for the writer; ``seq`` or ``error`` is set by the writer."""

    record: AuditRecord
    seq: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as stored: the parsed entry, its canonical bytes and chain hash."""

    entry: AuditEntry
    canonical: bytes
    chain_hash: bytes


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


@dataclass(frozen=True)
class AuditVerification:
    result: LogVerification
    entries: int
    sth: SignedTreeHead | None


def record_to_entry(record: AuditRecord, seq: int) -> AuditEntry:
    """The domain entry for a validated record at ``seq`` (ValueError naming the field)."""
    try:
        details = json.loads(record.details_json) if record.details_json else {}
    except json.JSONDecodeError:
        raise ValueError("details_json: not valid JSON") from None
    if not isinstance(details, dict):
        raise ValueError("details_json: must be a JSON object")
    return AuditEntry(
        seq=seq, ts=datetime.fromtimestamp(record.ts, UTC), event_type=record.event_type,
        principal=record.principal, role=record.role, resource=record.resource,
        outcome=record.outcome, trace_id=record.trace_id, details=details)


def entry_from_canonical(canonical: bytes) -> AuditEntry:
    """Parse stored canonical bytes back into an entry (ValueError when not parseable)."""
    try:
        data = json.loads(canonical)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("canonical: not valid JSON") from None
    return AuditEntry.from_dict(data)


class AuditStore:
    """See the module docstring. ``start()`` loads the state and starts the writer;
    ``close()`` drains the writer."""

    def __init__(self, db: Database, signing_key: Ed25519PrivateKey, *,
                 after_commit: Callable[[Sequence[AuditEntry]], Sequence[AuditRecord]] | None = None,
                 max_batch: int = 4096, max_delay_s: float = 0.002,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise ValueError("signing_key: expected an Ed25519 private key")
        self.db = db
        self._key = signing_key
        self.public_key = signing_key.public_key()
        self._after_commit = after_commit
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._clock = clock
        self._state = AuditState()
        self._tree = merkle.MerkleTree()
        self._tree_lock = threading.Lock()
        self._latest_sth: SignedTreeHead | None = None
        self._committer: GroupCommitter[_Pending] | None = None
        self.healthy_at_start = True

    # -- lifecycle ---------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply the privacy service's migrations (the audit tables are among them)."""
        from services.privacy.migrations import MIGRATIONS

        return migrate(self.db, MIGRATIONS)

    def start(self) -> AuditStore:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO audit_state (id, size, state) VALUES (1, 0, ?) "
                       "ON CONFLICT DO NOTHING", (AuditState().to_bytes(),))
        self._load()
        self._committer = GroupCommitter(self._flush, max_batch=self._max_batch,
                                         max_delay_s=self._max_delay, name="audit-writer")
        return self

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None

    def _load(self) -> None:
        """State, latest STH and the proof tree from the database (start and after a
        conflict). The tree is rebuilt from the stored leaf hashes."""
        with self.db.transaction() as tx:
            row = tx.query("SELECT state FROM audit_state WHERE id = 1")
            state = AuditState.from_bytes(bytes(row[0][0]))
            sth_row = tx.query("SELECT sth_json FROM audit_sth ORDER BY tree_size DESC LIMIT 1")
            leaves = tx.query("SELECT leaf_hash FROM audit_entries WHERE seq < ? ORDER BY seq",
                              (state.size,))
        raw = b"".join(bytes(r[0]) for r in leaves)
        tree = merkle.MerkleTree()
        healthy = len(raw) == state.size * merkle.HASH_SIZE and all(
            len(r[0]) == merkle.HASH_SIZE for r in leaves)
        if healthy:
            tree.extend(raw)
            healthy = tree.root() == state.root
        else:
            tree.extend(b"".join(bytes(r[0])[: merkle.HASH_SIZE].ljust(merkle.HASH_SIZE, b"\0")
                                 for r in leaves))
        if not healthy:
            # The log was altered behind the service's back. Appends continue from the
            # signed state (the chain stays anchored); VerifyAudit says what changed.
            log.error("audit log rows do not match the stored audit state (size %d, %d rows): "
                      "run VerifyAudit", state.size, len(leaves))
        sth = SignedTreeHead.from_dict(json.loads(sth_row[0][0])) if sth_row else None
        with self._tree_lock:
            self._state, self._tree = state, tree
            if sth is not None and (self._latest_sth is None or sth.tree_size >= self._latest_sth.tree_size):
                self._latest_sth = sth
        self.healthy_at_start = healthy

    # -- writes ------------------------------------------------------------------------

    def submit(self, records: Sequence[AuditRecord]):
        """Queue records for the writer; returns (future, pendings)."""
        if self._committer is None:
            raise FailedPrecondition("audit store is not started")
        pendings = [_Pending(r) for r in records]
        return self._committer.submit(pendings), pendings

    def append(self, records: Sequence[AuditRecord], timeout_s: float = 30.0) -> list[int]:
        """Append durably; returns each record's seq (a repeated record_id returns the
        seq it got the first time). Returns only after the commit."""
        if not records:
            return []
        future, pendings = self.submit(records)
        future.result(timeout_s)
        errors = [(i, p.error) for i, p in enumerate(pendings) if p.error]
        if errors:
            i, message = errors[0]
            raise InvalidArgument(message, field=f"records[{i}]")
        return [int(p.seq) for p in pendings]

    def _flush(self, pendings: Sequence[_Pending]) -> None:
        """Writer thread: commit one batch (retrying on a state conflict), then let
        ``after_commit`` add records (alerts), committed at once."""
        committed = self._commit_with_retry(pendings)
        if committed and self._after_commit is not None:
            try:
                extra = list(self._after_commit(committed))
            except Exception:  # noqa: BLE001 - detection must never fail an append
                log.exception("after_commit hook failed")
                extra = []
            if extra:
                self._commit_with_retry([_Pending(r) for r in extra])

    def _commit_with_retry(self, pendings: Sequence[_Pending], attempts: int = 3) -> list[AuditEntry]:
        # Repeated record ids are rare (a sink retrying after a lost acknowledgement), so
        # the first attempt skips the look-up and lets the unique index catch a repeat;
        # after any conflict the ids are looked up before retrying.
        check_existing = False
        for attempt in range(attempts):
            try:
                return self._commit(pendings, check_existing)
            except _StateConflict as exc:
                check_existing = True
                log.warning("audit append conflict (%s): reloading state, attempt %d", exc, attempt + 1)
                for p in pendings:
                    p.seq = p.error = None
                self._load()
        raise Conflict("the audit log kept moving under this writer (several writers?)")

    def _commit(self, pendings: Sequence[_Pending], check_existing: bool) -> list[AuditEntry]:
        state = self._state
        ids = [p.record.record_id for p in pendings if p.record.record_id] if check_existing else []
        existing = self._existing_seqs(ids) if ids else {}
        first_of: dict[str, _Pending] = {}
        entries: list[AuditEntry] = []
        rows: list[tuple] = []
        repeats: list[tuple[_Pending, _Pending]] = []
        for p in pendings:
            rid = p.record.record_id
            if rid:
                if rid in existing:
                    p.seq = existing[rid]
                    continue
                if rid in first_of:
                    repeats.append((p, first_of[rid]))
                    continue
            seq = state.size + len(entries)
            try:
                entry = record_to_entry(p.record, seq)
            except ValueError as exc:
                p.error = str(exc)
                continue
            if rid:
                first_of[rid] = p
            p.seq = seq
            entries.append(entry)
            rows.append([seq, entry.ts.timestamp(), entry.event_type.value, entry.principal,
                         entry.role.value, entry.resource, entry.outcome.value, entry.trace_id,
                         rid or None, entry.canonical_bytes])
        for p, first in repeats:
            p.seq, p.error = first.seq, first.error
        if not entries:
            return []
        new_state, leaves, chains = append_batch(state, entries)
        sth = sign_tree_head(new_state, self._key, datetime.fromtimestamp(self._clock(), UTC))
        leaf_bytes, chain_bytes = leaves.tobytes(), chains.tobytes()
        h = merkle.HASH_SIZE
        for i, row in enumerate(rows):
            row.append(leaf_bytes[i * h:(i + 1) * h])
            row.append(chain_bytes[i * h:(i + 1) * h])
        try:
            with self.db.transaction() as tx:
                tx.executemany(_INSERT, rows)
                moved = tx.execute("UPDATE audit_state SET size = ?, state = ? WHERE id = 1 AND size = ?",
                                   (new_state.size, new_state.to_bytes(), state.size))
                if moved != 1:
                    raise _StateConflict("audit_state moved")
                tx.execute("INSERT INTO audit_sth (tree_size, sth_json) VALUES (?, ?)",
                           (sth.tree_size, canonical_json(sth.to_dict()).decode()))
        except _StateConflict:
            raise
        except Exception as exc:
            # A unique violation means another writer took these seqs or record ids. Any
            # other failure may still have committed (a lost commit acknowledgement):
            # the next batch's compare-and-swap on audit_state.size then fails and the
            # state is reloaded, so the in-memory state never forks from the table.
            if _is_integrity_error(exc):
                raise _StateConflict(type(exc).__name__) from exc
            raise
        with self._tree_lock:
            self._tree.extend(leaf_bytes)
            self._state = new_state
            self._latest_sth = sth
        return entries

    def _existing_seqs(self, record_ids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        with self.db.transaction() as tx:
            for start in range(0, len(record_ids), 500):
                chunk = record_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for rid, seq in tx.query(
                        f"SELECT record_id, seq FROM audit_entries WHERE record_id IN ({marks})", chunk):
                    found[rid] = int(seq)
        return found

    # -- reads -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._state.size

    def latest_sth(self) -> SignedTreeHead | None:
        return self._latest_sth

    def sth_at(self, tree_size: int) -> SignedTreeHead | None:
        """The stored STH of exactly ``tree_size`` (one exists per committed batch)."""
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
        sql = f"SELECT {_ENTRY_COLUMNS} FROM audit_entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit + 1)
        with self.db.transaction() as tx:
            rows = tx.query(sql, params)
        out = [self._stored(r) for r in rows[:limit]]
        return out, len(rows) > limit

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
            rows = tx.query(f"SELECT {_ENTRY_COLUMNS} FROM audit_entries WHERE seq = ?", (seq,))
        if not rows:
            raise NotFound(f"no audit entry {seq}", "inclusion_seq")
        return self._stored(rows[0])

    def _head_for(self, tree_size: int) -> SignedTreeHead:
        latest = self._latest_sth
        if latest is None:
            raise FailedPrecondition("the audit log is empty: no signed tree head yet", "tree_size")
        if tree_size == 0 or tree_size == latest.tree_size:
            return latest
        if tree_size > latest.tree_size:
            raise InvalidArgument(f"{tree_size} exceeds the latest signed size {latest.tree_size}",
                                  "tree_size")
        sth = self.sth_at(tree_size)
        if sth is None:
            raise NotFound(f"no signed tree head of size {tree_size} (heads are signed per batch)",
                           "tree_size")
        return sth

    def inclusion_proof(self, seq: int, tree_size: int = 0) -> tuple[SignedTreeHead, list[bytes], bytes, StoredEntry]:
        """(head, audit path, leaf hash, entry) proving entry ``seq`` is in the head's tree."""
        sth = self._head_for(tree_size)
        if not 0 <= seq < sth.tree_size:
            raise InvalidArgument(f"{seq} is not below the tree size {sth.tree_size}", "inclusion_seq")
        with self._tree_lock:
            if sth.tree_size > self._tree.size:
                raise FailedPrecondition("the proof tree is shorter than the signed log: the "
                                         "stored rows were altered (run VerifyAudit)", "tree_size")
            path = self._tree.inclusion_proof(seq, sth.tree_size)
            leaf = self._tree.leaf_hash_at(seq)
        return sth, path, leaf, self.entry(seq)

    def consistency_proof(self, old_size: int, tree_size: int = 0) -> tuple[SignedTreeHead, list[bytes], SignedTreeHead | None]:
        """(head, proof that the tree of ``old_size`` is a prefix of the head's, the
        stored head of ``old_size`` if there is one)."""
        sth = self._head_for(tree_size)
        if not 0 <= old_size <= sth.tree_size:
            raise InvalidArgument(f"must be in 0..{sth.tree_size}", "consistency_from_size")
        with self._tree_lock:
            if sth.tree_size > self._tree.size:
                raise FailedPrecondition("the proof tree is shorter than the signed log: the "
                                         "stored rows were altered (run VerifyAudit)", "tree_size")
            path = self._tree.consistency_proof(old_size, sth.tree_size)
        return sth, path, self.sth_at(old_size) if old_size else None

    def iter_rows(self, batch: int = 10_000) -> Iterator[tuple]:
        """Every stored row (seq, canonical, chain_hash, ts, event_type, principal, role,
        resource, outcome, trace_id) in seq order, read in pages."""
        last = -1
        while True:
            with self.db.transaction() as tx:
                rows = tx.query("SELECT seq, canonical, chain_hash, ts, event_type, principal, role, "
                                "resource, outcome, trace_id FROM audit_entries WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (last, batch))
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def verify(self) -> AuditVerification:
        """Check the stored rows against the latest signed tree head (the newer of the
        stored one and the one this process signed last, so deleting STH rows does not
        hide a truncation while the service runs). Reasons as ``verify_log``, plus
        ``modified`` for unparseable canonical bytes or query columns that disagree
        with them."""
        stored = self._stored_latest_sth()
        sth = self._latest_sth
        if stored is not None and (sth is None or stored.tree_size > sth.tree_size):
            sth = stored
        entries: list[AuditEntry] = []
        chains: list[bytes] = []
        column_mismatch: int | None = None
        for position, row in enumerate(self.iter_rows()):
            try:
                entry = entry_from_canonical(bytes(row[1]))
            except ValueError:
                return AuditVerification(LogVerification(
                    False, TamperReason.MODIFIED, int(row[0]),
                    f"entry at seq {row[0]} is not a valid canonical entry"), position, sth)
            if column_mismatch is None and not _columns_match(entry, row):
                column_mismatch = int(row[0])
            entries.append(entry)
            chains.append(bytes(row[2]).ljust(merkle.HASH_SIZE, b"\0")[: merkle.HASH_SIZE])
        if sth is None:
            if entries:
                return AuditVerification(LogVerification(
                    False, TamperReason.INSERTED, entries[0].seq,
                    f"{len(entries)} entries but no signed tree head"), len(entries), None)
            return AuditVerification(LogVerification(True, None, None, "ok: empty log"), 0, None)
        result = verify_log(entries, sth, self.public_key, chain_hashes=chains or None)
        if result.ok and column_mismatch is not None:
            result = LogVerification(False, TamperReason.MODIFIED, column_mismatch,
                                     f"the query columns of seq {column_mismatch} differ from "
                                     "its signed content")
        return AuditVerification(result, len(entries), sth)

    def _stored_latest_sth(self) -> SignedTreeHead | None:
        with self.db.transaction() as tx:
            row = tx.query("SELECT sth_json FROM audit_sth ORDER BY tree_size DESC LIMIT 1")
        if not row:
            return None
        try:
            return SignedTreeHead.from_dict(json.loads(row[0][0]))
        except (ValueError, json.JSONDecodeError):
            return None

    def export_lines(self) -> Iterator[str]:
        """The JSONL export (``audit.export_lines`` format) of the log up to the latest
        signed tree head; verify offline with ``hearth audit verify``."""
        sth = self._latest_sth
        if sth is None:
            raise FailedPrecondition("the audit log is empty: nothing to export")
        for row in self.iter_rows():
            if row[0] >= sth.tree_size:
                break
            yield export_line(bytes(row[1]), bytes(row[2]))
        yield canonical_json({"sth": sth.to_dict()}).decode("utf-8")


def export_line(canonical: bytes, chain_hash: bytes) -> str:
    """One export line from stored bytes, without re-encoding the entry: the canonical
    bytes are already canonical JSON, and ``chain_hash`` sorts before ``entry``."""
    return '{"chain_hash":"%s","entry":%s}' % (chain_hash.hex(), canonical.decode("utf-8"))


def _columns_match(entry: AuditEntry, row: tuple) -> bool:
    return (row[3] == entry.ts.timestamp() and row[4] == entry.event_type.value
            and row[5] == entry.principal and row[6] == entry.role.value
            and row[7] == entry.resource and row[8] == entry.outcome.value
            and row[9] == entry.trace_id)


def _seconds(value: datetime, field: str) -> float:
    """A window bound as stored: Unix seconds of the microsecond-truncated UTC time."""
    return parse_ts(format_ts(value, field), field).timestamp()


def _is_integrity_error(exc: BaseException) -> bool:
    import sqlite3

    if isinstance(exc, sqlite3.IntegrityError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, psycopg.errors.IntegrityError)
