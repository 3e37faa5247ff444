"""The audit log's repository: durable, group-committed appends over SQLite/PostgreSQL,
with an in-memory Merkle tree for proofs.

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
``audit_sth``      one signed tree head per committed batch (``tree_size`` PK, STH JSON).

Write path (``append``): the caller's thread validates its records and encodes each
entry once, at a placeholder seq (``prepare``); the chunk goes to a ``GroupCommitter``
whose single writer thread stamps the seqs into the canonical bytes, hashes leaves and
chain (``entry_hashes``), extends the proof tree and reads the new frontier from it,
signs one tree head and writes entries + state + STH in ONE transaction (one
``executemany``). Callers are answered only after the commit, so an acknowledged record
survives a crash. ``after_commit`` (the suspicious-activity detector) runs in the same
thread after every commit and may return more records (security alerts), committed
right away in their own transaction, before the callers are answered.

Repeated record ids (a sink retrying after a lost acknowledgement) get the seq of the
first append. The writer keeps the ids of the last ``dedup_window`` to 2x that many
entries in memory (rebuilt from the table at start and after a conflict); a record
whose ts is not newer than every id that left memory is looked up in the table by its
ts (a retry carries its record's original ts) through the ts index. So no index keyed
by the random record ids is needed, the costliest kind to append to. The guarantee
covers retries of the same record (same record_id and ts), however late.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.common.audit import AuditRecord
from services.common.batching import GroupCommitter
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from services.common.storage.sql import Database, Migration, migrate
from services.privacy.domain import merkle
from services.privacy.domain.audit import (
    AuditEntry,
    AuditState,
    EventType,
    LogVerification,
    Outcome,
    Role,
    SignedTreeHead,
    TamperReason,
    entry_hashes,
    canonical_json,
    format_ts,
    parse_ts,
    sign_tree_head,
    verify_log,
    verify_tree_head_history,
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
DEFAULT_QUERY_LIMIT = 100
_ENTRY_COLUMNS = "seq, canonical, chain_hash"
_INSERT_INTO = ("INSERT INTO audit_entries (seq, ts, event_type, principal, role, resource, outcome, "
                "trace_id, record_id, canonical, leaf_hash, chain_hash) VALUES ")
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_COLUMNS_PER_ROW = 12
# Rows per INSERT statement (multi-row VALUES). SQLite: the driver releases the GIL
# around every statement execution, and with callers' threads busy each release can
# cost the single writer a whole switch interval (5 ms) before it gets the GIL back,
# so one execution per row stalled it; 256 rows are 3072 parameters, below SQLite's
# limit (32766 since 3.32; 999 before, hence 64). PostgreSQL: psycopg's per-statement
# work dominates, but it re-parses any statement longer than 4 KiB or with more than 50
# parameters on every execution, so 4 rows (48 parameters) per statement, pipelined.
_ROWS_PER_INSERT = {"sqlite": 256 if sqlite3.sqlite_version_info >= (3, 32) else 64, "postgres": 4}


@functools.lru_cache(maxsize=None)
def _insert_sql(rows: int) -> str:
    return _INSERT_INTO + ", ".join([_ROW_MARKS] * rows)


def _insert_rows(tx, rows: list[tuple], dialect: str) -> None:
    """Insert rows with ``executemany`` of full statements of ``_ROWS_PER_INSERT``
    rows, and the remainder split into powers of two, so only a handful of distinct
    statements are ever prepared (and cached)."""
    per_statement = _ROWS_PER_INSERT.get(dialect, 1)
    flat = list(itertools.chain.from_iterable(rows))
    width = per_statement * _COLUMNS_PER_ROW
    full = len(rows) // per_statement
    if full:
        tx.executemany(_insert_sql(per_statement),
                       [flat[i * width:(i + 1) * width] for i in range(full)])
    start, rest = full * per_statement, len(rows) % per_statement
    size = per_statement
    while rest:
        size >>= 1
        if rest >= size:
            tx.execute(_insert_sql(size),
                       flat[start * _COLUMNS_PER_ROW:(start + size) * _COLUMNS_PER_ROW])
            start += size
            rest -= size


class _StateConflict(Exception):
    """Another writer moved the log (or the commit outcome is unknown): reload, retry."""


@dataclass(slots=True)
class _Chunk:
    """One caller's records, validated and encoded on the caller's thread: entries at a
    placeholder seq 0 with their canonical bytes split around the seq digits
    (``AuditEntry.seq_template``) and the plain values of the query columns. The writer
    fills ``seqs``. ``errors[i]`` is set instead when record i was invalid (then
    ``entries[i]``, ``columns[i]``, ``heads[i]`` and ``tails[i]`` are None)."""

    entries: list[AuditEntry | None]
    columns: list[tuple | None]
    record_ids: list[str | None]
    heads: list[bytes | None]
    tails: list[bytes | None]
    errors: list[str | None] | None = None
    seqs: list[int | None] = field(default_factory=list)
    min_ts: float = math.inf
    max_ts: float = -math.inf

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def of(cls, entries: Sequence[AuditEntry | None], record_ids: list[str | None],
           errors: list[str | None] | None = None) -> _Chunk:
        """The chunk of these entries (None where ``errors`` says why)."""
        plain = _PLAIN
        columns: list[tuple | None] = []
        heads: list[bytes | None] = []
        tails: list[bytes | None] = []
        min_ts, max_ts = math.inf, -math.inf
        for entry, rid in zip(entries, record_ids):
            if entry is None:
                columns.append(None)
                heads.append(None)
                tails.append(None)
                continue
            ts = entry.ts.timestamp()
            if ts < min_ts:
                min_ts = ts
            if ts > max_ts:
                max_ts = ts
            columns.append((ts, plain[entry.event_type], entry.principal, plain[entry.role],
                            entry.resource, plain[entry.outcome], entry.trace_id, rid))
            head, tail = entry.seq_template()
            heads.append(head)
            tails.append(tail)
        return cls(list(entries), columns, record_ids, heads, tails, errors, min_ts=min_ts, max_ts=max_ts)


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


def record_to_entry(record: AuditRecord, seq: int, reporter: str | None = None) -> AuditEntry:
    """The domain entry for a validated record at ``seq`` (ValueError naming the field).
    ``reporter``: who sent the record; noted as ``details.reported_by`` when the record
    is about someone else and does not name a reporter already."""
    try:
        ts = datetime.fromtimestamp(record.ts, UTC)
    except (OverflowError, OSError, TypeError, ValueError):
        raise ValueError(f"ts: not a representable Unix time: {record.ts!r}") from None
    details = _decode_details(record.details_json)
    if reporter is not None and reporter != record.principal and "reported_by" not in details:
        details["reported_by"] = reporter  # a dict decoded just now: nobody else holds it
    return AuditEntry.build(
        seq, ts, record.event_type, record.principal, record.role, record.resource,
        record.outcome, record.trace_id, details)


def _make_scanner() -> Callable[[str, int], tuple[object, int]] | None:
    try:
        from json.scanner import c_make_scanner
    except ImportError:  # pragma: no cover - pure-Python json build
        return None
    return c_make_scanner(json.JSONDecoder()) if c_make_scanner is not None else None


# The C scanner behind json.loads, called directly: json.loads adds three Python frames
# and two regex matches for whitespace, more than the scan itself of a small object.
_scan_json = _make_scanner()


def _decode_details(text: str) -> dict:
    """``details_json`` as a dict, exactly as ``json.loads`` would parse it."""
    if not text:
        return {}
    obj: object = None
    parsed = False
    if _scan_json is not None:
        try:
            obj, end = _scan_json(text, 0)
            parsed = end == len(text)
        except (StopIteration, ValueError):
            parsed = False  # leading whitespace or invalid: json.loads decides below
    if not parsed:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise ValueError("details_json: not valid JSON") from None
    if type(obj) is not dict:
        raise ValueError("details_json: must be a JSON object")
    return obj


# Enum members as plain str values for the query columns (drivers bind exact types
# fastest, and psycopg would not bind a str enum as its value).
_PLAIN = {member: member.value for enum_type in (EventType, Role, Outcome) for member in enum_type}


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
                 after_commit: Callable[[Sequence[AuditEntry], Sequence[int]], Sequence[AuditRecord]] | None = None,
                 max_batch: int = 4096, max_delay_s: float = 0.002,
                 clock: Callable[[], float] = time.time, dedup_window: int = 65_536) -> None:
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
        self._committer: GroupCommitter[_Chunk] | None = None
        self.healthy_at_start = True
        if dedup_window < 1:
            raise ValueError("dedup_window: must be >= 1")
        self._dedup_window = dedup_window
        # Recent record ids -> seq (see _remember_ids); ids of entries with ts at or
        # below _ids_floor may have left memory and are looked up in the table.
        self._ids: dict[str, int] = {}
        self._ids_previous: dict[str, int] = {}
        self._ids_newest = self._ids_previous_newest = -math.inf
        self._ids_floor = -math.inf
        self._tree_matches_state = False  # the proof tree holds exactly the state's leaves

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
        self._load_ids(state.size)
        with self._tree_lock:
            self._state, self._tree = state, tree
            if sth is not None and (self._latest_sth is None or sth.tree_size >= self._latest_sth.tree_size):
                self._latest_sth = sth
        self.healthy_at_start = healthy
        self._tree_matches_state = healthy

    def _load_ids(self, size: int) -> None:
        """The id window from the table: the ids of the last ``dedup_window`` entries;
        the floor is the newest ts in the table when older entries exist (conservative:
        records at or below it are looked up in the table)."""
        first = max(0, size - self._dedup_window)
        with self.db.transaction() as tx:
            rows = tx.query("SELECT record_id, seq, ts FROM audit_entries WHERE seq >= ? "
                            "ORDER BY seq", (first,))
            newest = tx.query("SELECT MAX(ts) FROM audit_entries")[0][0] if first else None
        self._ids = {rid: int(seq) for rid, seq, _ in rows if rid is not None}
        self._ids_newest = max((float(ts) for _, _, ts in rows), default=-math.inf)
        self._ids_previous, self._ids_previous_newest = {}, -math.inf
        self._ids_floor = float(newest) if newest is not None else -math.inf

    # -- writes ------------------------------------------------------------------------

    def prepare(self, records: Sequence[AuditRecord]) -> _Chunk:
        """Validate and encode records for the writer (on the caller's thread, so the
        single writer only stamps seqs, hashes and inserts); invalid records are noted
        in the chunk's ``errors`` and skipped by the writer."""
        entries: list[AuditEntry | None] = []
        errors: list[str | None] | None = None
        to_entry = record_to_entry
        for i, record in enumerate(records):
            try:
                entries.append(to_entry(record, 0))
            except ValueError as exc:
                if errors is None:
                    errors = [None] * len(records)
                errors[i] = str(exc)
                entries.append(None)
        return _Chunk.of(entries, [r.record_id or None for r in records], errors)

    def chunk_of(self, entries: Sequence[AuditEntry], record_ids: Sequence[str]) -> _Chunk:
        """A chunk of entries validated already (their seqs are ignored and replaced)."""
        if len(record_ids) != len(entries):
            raise ValueError(f"record_ids: {len(record_ids)} given for {len(entries)} entries")
        for i, entry in enumerate(entries):
            if not isinstance(entry, AuditEntry):
                raise ValueError(f"entries[{i}]: expected AuditEntry, got {type(entry).__name__}")
        return _Chunk.of(list(entries), [rid or None for rid in record_ids])

    def submit(self, chunk: _Chunk):
        """Queue a prepared chunk for the writer; the future resolves after its commit."""
        if self._committer is None:
            raise FailedPrecondition("audit store is not started")
        return self._committer.submit([chunk], weight=len(chunk))

    def append(self, records: Sequence[AuditRecord], timeout_s: float = 30.0) -> list[int]:
        """Append durably; returns each record's seq (a repeated record_id returns the
        seq it got the first time). Returns only after the commit. An invalid record
        raises InvalidArgument naming it, after the valid ones were appended."""
        if not records:
            return []
        return self._append_chunk(self.prepare(records), timeout_s)

    def append_entries(self, entries: Sequence[AuditEntry], record_ids: Sequence[str],
                       timeout_s: float = 30.0) -> list[int]:
        """``append`` for entries already validated (AppendAudit validates a request
        whole before appending); each entry is re-stamped with the seq it gets."""
        if not entries:
            return []
        return self._append_chunk(self.chunk_of(entries, record_ids), timeout_s)

    def _append_chunk(self, chunk: _Chunk, timeout_s: float) -> list[int]:
        self.submit(chunk).result(timeout_s)
        if chunk.errors is not None:
            i, message = next((i, e) for i, e in enumerate(chunk.errors) if e)
            raise InvalidArgument(message, field=f"records[{i}]")
        return chunk.seqs  # type: ignore[return-value]  # every one set by the commit

    def _flush(self, chunks: Sequence[_Chunk]) -> None:
        """Writer thread: commit one batch (retrying on a state conflict), then let
        ``after_commit`` add records (alerts), committed at once."""
        committed, seqs = self._commit_with_retry(chunks)
        if committed and self._after_commit is not None:
            try:
                extra = list(self._after_commit(committed, seqs))
            except Exception:  # noqa: BLE001 - detection must never fail an append
                log.exception("after_commit hook failed")
                extra = []
            if extra:
                self._commit_with_retry([self.prepare(extra)])

    def _commit_with_retry(self, chunks: Sequence[_Chunk],
                           attempts: int = 3) -> tuple[list[AuditEntry], Sequence[int]]:
        for attempt in range(attempts):
            try:
                return self._commit(chunks)
            except _StateConflict as exc:
                log.warning("audit append conflict (%s): reloading state, attempt %d", exc, attempt + 1)
                self._load()
        raise Conflict("the audit log kept moving under this writer (several writers?)")

    def _commit(self, chunks: Sequence[_Chunk]) -> tuple[list[AuditEntry], Sequence[int]]:
        """One transaction for the batch. Returns the committed entries (as prepared:
        placeholder seqs) and the seq each got.

        Repeated record ids: a repeat inside the batch, or of an entry in the in-memory
        id window, gets the earlier seq; a record older than the window (its ts at or
        below ``_ids_floor``) is looked up in the table through the ts index first."""
        state = self._state
        first = seq = state.size
        floor = self._ids_floor
        older = [(rid, cols[0]) for chunk in chunks if chunk.min_ts <= floor
                 for rid, cols in zip(chunk.record_ids, chunk.columns)
                 if rid is not None and cols is not None and cols[0] <= floor]
        stored = self._stored_seqs(older) if older else {}
        recent, previous = self._ids, self._ids_previous
        batch_ids: dict[str, int] = {}
        entries: list[AuditEntry] = []
        canonical: list[bytes] = []
        columns: list[tuple] = []
        for chunk in chunks:
            rids = chunk.record_ids
            n = len(rids)
            ids = set(rids)
            if (chunk.errors is None and len(ids) == n and None not in ids
                    and batch_ids.keys().isdisjoint(ids) and recent.keys().isdisjoint(ids)
                    and previous.keys().isdisjoint(ids) and stored.keys().isdisjoint(ids)):
                # The usual chunk: valid, fresh ids only (checked by C set operations).
                seqs = range(seq, seq + n)
                chunk.seqs = list(seqs)
                batch_ids.update(zip(rids, seqs))
                entries += chunk.entries  # type: ignore[arg-type]
                columns += chunk.columns  # type: ignore[arg-type]
                canonical += [b"%b%d%b" % (h, s, t) for h, s, t in zip(chunk.heads, seqs, chunk.tails)]
                seq += n
                continue
            out = chunk.seqs = [None] * n
            for i, (entry, rid) in enumerate(zip(chunk.entries, rids)):
                if entry is None:
                    continue
                if rid is not None:
                    earlier = batch_ids.get(rid)
                    if earlier is None:
                        earlier = recent.get(rid)
                        if earlier is None:
                            earlier = previous.get(rid)
                            if earlier is None:
                                earlier = stored.get(rid)
                    if earlier is not None:
                        out[i] = earlier
                        continue
                    batch_ids[rid] = seq
                out[i] = seq
                entries.append(entry)
                columns.append(chunk.columns[i])  # type: ignore[arg-type]
                canonical.append(b"%b%d%b" % (chunk.heads[i], seq, chunk.tails[i]))
                seq += 1
        if not entries:
            return [], ()
        leaves, chains = entry_hashes(state.chain_head, canonical)
        leaf_bytes = b"".join(leaves)
        tree = self._tree
        # The proof tree holds every node the new frontier needs: extend it now (readers
        # only look at signed sizes, all below this) and truncate it if the commit fails,
        # rather than hashing the same nodes again for the frontier.
        speculative = self._tree_matches_state and tree.size == first
        with self._tree_lock:
            if speculative:
                tree.extend(leaf_bytes)
                new_state = AuditState(seq, chains[-1], tree.frontier())
        if not speculative:
            new_state = AuditState(seq, chains[-1], state.frontier.extend(leaf_bytes))
        sth = sign_tree_head(new_state, self._key, datetime.fromtimestamp(self._clock(), UTC))
        rows = [(s, *cols, data, leaf, chain)
                for s, cols, data, leaf, chain in zip(range(first, seq), columns, canonical, leaves, chains)]
        try:
            with self.db.transaction() as tx:
                _insert_rows(tx, rows, self.db.dialect)
                moved = tx.execute("UPDATE audit_state SET size = ?, state = ? WHERE id = 1 AND size = ?",
                                   (new_state.size, new_state.to_bytes(), state.size))
                if moved != 1:
                    raise _StateConflict("audit_state moved")
                tx.execute("INSERT INTO audit_sth (tree_size, sth_json) VALUES (?, ?)",
                           (sth.tree_size, canonical_json(sth.to_dict()).decode()))
        except BaseException as exc:
            if speculative:
                with self._tree_lock:
                    tree.truncate(first)
            if isinstance(exc, _StateConflict):
                raise
            # A unique violation means another writer took these seqs. Any other failure
            # may still have committed (a lost commit acknowledgement): the next batch's
            # compare-and-swap on audit_state.size then fails and the state is reloaded,
            # so the in-memory state never forks from the table.
            if _is_integrity_error(exc):
                raise _StateConflict(type(exc).__name__) from exc
            raise
        with self._tree_lock:
            if not speculative:
                tree.extend(leaf_bytes)
            self._state = new_state
            self._latest_sth = sth
        self._remember_ids(batch_ids, max(chunk.max_ts for chunk in chunks))
        return entries, range(first, seq)

    def _remember_ids(self, ids: dict[str, int], newest_ts: float) -> None:
        """Add committed ids to the in-memory window: two generations of at most
        ``dedup_window`` ids each; dropping the older one raises ``_ids_floor`` to its
        newest ts, so every committed id with a later ts is still in memory."""
        if not ids:
            return
        self._ids.update(ids)
        self._ids_newest = max(self._ids_newest, newest_ts)
        if len(self._ids) >= self._dedup_window:
            self._ids_floor = max(self._ids_floor, self._ids_previous_newest)
            self._ids_previous, self._ids_previous_newest = self._ids, self._ids_newest
            self._ids, self._ids_newest = {}, -math.inf

    def _stored_seqs(self, pairs: list[tuple[str, float]]) -> dict[str, int]:
        """Seqs of stored entries with these (record_id, ts), found through the ts index."""
        found: dict[str, int] = {}
        wanted = {rid for rid, _ in pairs}
        times = sorted({ts for _, ts in pairs})
        with self.db.transaction() as tx:
            for start in range(0, len(times), 500):
                chunk = times[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for rid, seq in tx.query(
                        f"SELECT record_id, seq FROM audit_entries WHERE ts IN ({marks})", chunk):
                    if rid in wanted:
                        found.setdefault(rid, int(seq))
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
        hide a truncation while the service runs), then every stored tree head against
        the rows (a forged or moved head row is ``bad_signature`` even when it is not the
        newest). Reasons as ``verify_log``, plus ``modified`` for unparseable canonical
        bytes or query columns that disagree with them."""
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
        if result.ok:
            with self.db.transaction() as tx:
                stored = [(int(r[0]), r[1]) for r in tx.query("SELECT tree_size, sth_json FROM audit_sth")]
            forged = verify_tree_head_history(entries, stored, self.public_key)
            result = result if forged is None else forged
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
