"""The audit log's group-commit engine: durable appends and the signed state.

Write path (``append``): the caller's thread validates its records and encodes each
entry once, at a placeholder seq (``prepare``); the chunk goes to a ``GroupCommitter``
whose single writer thread stamps the seqs into the canonical bytes, hashes leaves and
chain (``entry_hashes``), extends the proof tree and reads the new frontier from it,
signs one tree head and writes entries + state + STH in ONE transaction (one
``executemany``). The table keeps the latest head and, of the heads before it, only the
last of each ``tree_head_history_s`` interval (``_thins``): every entry is covered by a
stored signed head from its commit on, and the history grows with time, not with
batches (session 30: at 6 requests/s a head per ~1.2 entries was 37 % of the log's
growth). Callers are answered only after the commit, so an acknowledged record
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

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from services.common.audit import AuditRecord
from services.common.batching import GroupCommitter
from services.common.errors import Conflict, FailedPrecondition, InvalidArgument
from services.common.storage.errors import is_integrity_error
from services.common.storage.sql import Database
from services.privacy.audit import merkle
from services.privacy.audit.domain import AuditEntry, AuditState, SignedTreeHead, canonical_json, entry_hashes, sign_tree_head
from services.privacy.audit.rows import Chunk, insert_rows, record_to_entry
from services.privacy.keys.signing import Ed25519PrivateKey, key_id

log = logging.getLogger("hearth.privacy.audit")


# Of the signed tree heads before the latest, the table keeps the last of each interval
# of this many seconds (HEARTH_AUDIT_TREE_HEAD_HISTORY_S; 0 = every batch's, as before
# session 30).
DEFAULT_TREE_HEAD_HISTORY_S = 60.0
# Leaf hashes read per query when the proof tree is rebuilt at start (2 MiB of hashes).
LEAF_PAGE = 65_536


class _StateConflict(Exception):
    """Another writer moved the log (or the commit outcome is unknown): reload, retry."""


class AuditWriter:
    """The single writer of the log (module docstring). ``start()`` loads the state,
    rebuilds the proof tree and starts the writer thread; ``close()`` drains it. The
    proof tree is read by ``proofs.AuditProofs`` under ``tree_lock``."""

    def __init__(self, db: Database, signing_key: Ed25519PrivateKey, *,
                 after_commit: Callable[[Sequence[AuditEntry], Sequence[int]], Sequence[AuditRecord]] | None = None,
                 max_batch: int = 4096, max_delay_s: float = 0.002,
                 clock: Callable[[], float] = time.time, dedup_window: int = 65_536,
                 tree_head_history_s: float = DEFAULT_TREE_HEAD_HISTORY_S) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise ValueError("signing_key: expected an Ed25519 private key")
        self.db = db
        self._key = signing_key
        self.public_key = signing_key.public_key()
        self._key_id = key_id(signing_key)
        self._after_commit = after_commit
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._clock = clock
        self._state = AuditState()
        self._tree = merkle.MerkleTree(leaf_source=self._stored_leaf_hashes)
        self._tree_lock = threading.Lock()
        self._latest_sth: SignedTreeHead | None = None
        self._committer: GroupCommitter[Chunk] | None = None
        self.healthy_at_start = True
        if dedup_window < 1:
            raise ValueError("dedup_window: must be >= 1")
        if not tree_head_history_s >= 0:
            raise ValueError("tree_head_history_s: must be >= 0 (0 = keep every batch's head)")
        self._head_history_s = tree_head_history_s
        self._dedup_window = dedup_window
        # Recent record ids -> seq (see _remember_ids); ids of entries with ts at or
        # below _ids_floor may have left memory and are looked up in the table.
        self._ids: dict[str, int] = {}
        self._ids_previous: dict[str, int] = {}
        self._ids_newest = self._ids_previous_newest = -math.inf
        self._ids_floor = -math.inf
        self._tree_matches_state = False  # the proof tree holds exactly the state's leaves

    def start(self) -> AuditWriter:
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
        conflict). The tree is rebuilt from the stored leaf hashes, read ``LEAF_PAGE`` at a
        time (until session 32 all at once: a list of every row, ~150 MB at 1M entries,
        at every start)."""
        with self.db.transaction() as tx:
            row = tx.query("SELECT state FROM audit_state WHERE id = 1")
            state = AuditState.from_bytes(bytes(row[0][0]))
            sth_row = tx.query("SELECT sth_json FROM audit_sth ORDER BY tree_size DESC LIMIT 1")
        tree = merkle.MerkleTree(leaf_source=self._stored_leaf_hashes)
        rows, well_formed, last = 0, True, -(2**63)   # every seq a row may hold, a negative one too
        while True:
            # Rows below the signed size are never rewritten by a writer (another replica
            # appends above it), so reading them in several transactions reads the same rows.
            with self.db.transaction(readonly=True) as tx:
                page = tx.query("SELECT seq, leaf_hash FROM audit_entries WHERE seq > ? AND seq < ? "
                                "ORDER BY seq LIMIT ?", (last, state.size, LEAF_PAGE))
            if not page:
                break
            well_formed = well_formed and all(len(r[1]) == merkle.HASH_SIZE for r in page)
            tree.extend(b"".join(bytes(r[1])[: merkle.HASH_SIZE].ljust(merkle.HASH_SIZE, b"\0") for r in page))
            rows, last = rows + len(page), page[-1][0]
            if len(page) < LEAF_PAGE:
                break
            page = None
        healthy = well_formed and rows == state.size and tree.root() == state.root
        if not healthy:
            # The log was altered behind the service's back. Appends continue from the
            # signed state (the chain stays anchored); VerifyAudit says what changed.
            log.error("audit log rows do not match the stored audit state (size %d, %d rows): "
                      "run VerifyAudit", state.size, rows)
        sth = SignedTreeHead.from_dict(json.loads(sth_row[0][0])) if sth_row else None
        self._load_ids(state.size)
        with self._tree_lock:
            self._state, self._tree = state, tree
            if sth is not None and (self._latest_sth is None or sth.tree_size >= self._latest_sth.tree_size):
                self._latest_sth = sth
        self.healthy_at_start = healthy
        self._tree_matches_state = healthy

    def _stored_leaf_hashes(self, start: int, end: int) -> bytes:
        """Leaf hashes of seqs [start, end) from the table: the proof tree keeps only the
        upper levels of complete chunks in memory (merkle.MerkleTree) and reads a chunk's
        leaves back for a proof, checking them against the chunk root it kept."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT leaf_hash FROM audit_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                            (start, end))
        return b"".join(bytes(r[0]) for r in rows)

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

    def prepare(self, records: Sequence[AuditRecord]) -> Chunk:
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
        return Chunk.of(entries, [r.record_id or None for r in records], errors)

    def chunk_of(self, entries: Sequence[AuditEntry], record_ids: Sequence[str]) -> Chunk:
        """A chunk of entries validated already (their seqs are ignored and replaced)."""
        if len(record_ids) != len(entries):
            raise ValueError(f"record_ids: {len(record_ids)} given for {len(entries)} entries")
        for i, entry in enumerate(entries):
            if not isinstance(entry, AuditEntry):
                raise ValueError(f"entries[{i}]: expected AuditEntry, got {type(entry).__name__}")
        return Chunk.of(list(entries), [rid or None for rid in record_ids])

    def submit(self, chunk: Chunk):
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

    def _append_chunk(self, chunk: Chunk, timeout_s: float) -> list[int]:
        self.submit(chunk).result(timeout_s)
        if chunk.errors is not None:
            i, message = next((i, e) for i, e in enumerate(chunk.errors) if e)
            raise InvalidArgument(message, field=f"records[{i}]")
        return chunk.seqs  # type: ignore[return-value]  # every one set by the commit

    def _flush(self, chunks: Sequence[Chunk]) -> None:
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

    def _commit_with_retry(self, chunks: Sequence[Chunk],
                           attempts: int = 3) -> tuple[list[AuditEntry], Sequence[int]]:
        for attempt in range(attempts):
            try:
                return self._commit(chunks)
            except _StateConflict as exc:
                log.warning("audit append conflict (%s): reloading state, attempt %d", exc, attempt + 1)
                self._load()
        raise Conflict("the audit log kept moving under this writer (several writers?)")

    def _commit(self, chunks: Sequence[Chunk]) -> tuple[list[AuditEntry], Sequence[int]]:
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
        sth = sign_tree_head(new_state, self._key, datetime.fromtimestamp(self._clock(), UTC), self._key_id)
        rows = [(s, *cols, data, leaf, chain)
                for s, cols, data, leaf, chain in zip(range(first, seq), columns, canonical, leaves, chains)]
        try:
            with self.db.transaction() as tx:
                insert_rows(tx, rows, self.db.dialect)
                moved = tx.execute("UPDATE audit_state SET size = ?, state = ? WHERE id = 1 AND size = ?",
                                   (new_state.size, new_state.to_bytes(), state.size))
                if moved != 1:
                    raise _StateConflict("audit_state moved")
                tx.execute("INSERT INTO audit_sth (tree_size, sth_json) VALUES (?, ?)",
                           (sth.tree_size, canonical_json(sth.to_dict()).decode()))
                previous = self._latest_sth
                if previous is not None and self._thins(previous, sth):
                    tx.execute("DELETE FROM audit_sth WHERE tree_size = ?", (previous.tree_size,))
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
            if is_integrity_error(exc):
                raise _StateConflict(type(exc).__name__) from exc
            raise
        with self._tree_lock:
            if not speculative:
                tree.extend(leaf_bytes)
            self._state = new_state
            self._latest_sth = sth
        self._remember_ids(batch_ids, max(chunk.max_ts for chunk in chunks))
        return entries, range(first, seq)

    def _thins(self, previous: SignedTreeHead, new: SignedTreeHead) -> bool:
        """Whether the stored head ``previous`` (the latest until ``new``) leaves the table
        now: it does when ``new`` covers more and falls in the same history interval, so
        the table keeps the last head of each interval and the latest. Decided from the
        two signed heads alone, so a restarted writer (or another replica) thins the same
        way; heads stored before session 30 stay, except the latest, which follows this
        rule once."""
        if self._head_history_s == 0 or new.tree_size <= previous.tree_size:
            return False
        interval = self._head_history_s
        return (math.floor(previous.timestamp.timestamp() / interval)
                == math.floor(new.timestamp.timestamp() / interval))

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

    @property
    def size(self) -> int:
        return self._state.size

    def latest_sth(self) -> SignedTreeHead | None:
        return self._latest_sth

    # -- the proof tree, read by proofs.AuditProofs ------------------------------------

    @property
    def tree_lock(self) -> threading.Lock:
        return self._tree_lock

    @property
    def tree(self) -> merkle.MerkleTree:
        """The in-memory Merkle tree of the committed leaves (hold ``tree_lock``)."""
        return self._tree
