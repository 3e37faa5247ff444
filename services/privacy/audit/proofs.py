"""Proofs and verification of the audit log: RFC 9162 inclusion and consistency proofs
against signed tree heads (from the writer's in-memory proof tree), and the full
verification of the stored rows against the latest signed tree head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.privacy.audit import merkle
from services.privacy.audit.domain import (LogVerification, LogVerifier, SignedTreeHead, TamperReason,
                                          tree_heads_beyond_the_log, verify_tree_head)
from services.privacy.audit.rows import StoredEntry, columns_match, entry_from_canonical
from services.privacy.audit.store import AuditStore
from services.privacy.audit.writer import AuditWriter


@contextmanager
def _stored_rows_checked() -> Iterator[None]:
    """The proof tree reads older leaf hashes back from the table (merkle.MerkleTree):
    rows altered since they were appended fail the proof as the shortened tree does."""
    try:
        yield
    except merkle.LeafSourceMismatch as exc:
        raise FailedPrecondition(f"the stored rows were altered (run VerifyAudit): {exc}", "tree_size") from None


@dataclass(frozen=True)
class AuditVerification:
    result: LogVerification
    entries: int
    sth: SignedTreeHead | None


class AuditProofs:
    def __init__(self, store: AuditStore, writer: AuditWriter, earlier_keys=()) -> None:
        self._store = store
        self._writer = writer
        self._earlier_keys = tuple(earlier_keys)   # HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS

    def _head_for(self, tree_size: int) -> SignedTreeHead:
        latest = self._writer.latest_sth()
        if latest is None:
            raise FailedPrecondition("the audit log is empty: no signed tree head yet", "tree_size")
        if tree_size == 0 or tree_size == latest.tree_size:
            return latest
        if tree_size > latest.tree_size:
            raise InvalidArgument(f"{tree_size} exceeds the latest signed size {latest.tree_size}",
                                  "tree_size")
        sth = self._store.sth_at(tree_size)
        if sth is None:
            raise NotFound(f"no stored signed tree head of size {tree_size} (the log keeps the latest "
                           "head and the last of each history interval; ask for a consistency proof "
                           "from a head you kept instead)", "tree_size")
        return sth

    def _check_signed_root(self, sth: SignedTreeHead) -> None:
        """The proof tree is rebuilt from the stored leaf hashes at start: rows rewritten
        while the service was down give a tree without the signed root, whose proofs verify
        against no signed head. Say so instead of serving them (caller holds tree_lock)."""
        if self._writer.tree.root(sth.tree_size) != sth.root:
            raise FailedPrecondition(f"the proof tree of size {sth.tree_size} does not have the signed "
                                     "root: the stored rows were altered (run VerifyAudit)", "tree_size")

    def inclusion_proof(self, seq: int, tree_size: int = 0) -> tuple[SignedTreeHead, list[bytes], bytes, StoredEntry]:
        """(head, audit path, leaf hash, entry) proving entry ``seq`` is in the head's tree."""
        sth = self._head_for(tree_size)
        if not 0 <= seq < sth.tree_size:
            raise InvalidArgument(f"{seq} is not below the tree size {sth.tree_size}", "inclusion_seq")
        with self._writer.tree_lock:
            if sth.tree_size > self._writer.tree.size:
                raise FailedPrecondition("the proof tree is shorter than the signed log: the "
                                         "stored rows were altered (run VerifyAudit)", "tree_size")
            with _stored_rows_checked():
                self._check_signed_root(sth)
                path = self._writer.tree.inclusion_proof(seq, sth.tree_size)
                leaf = self._writer.tree.leaf_hash_at(seq)
        try:
            entry = self._store.entry(seq)
        except NotFound:  # below the signed size, so it was appended: the row was deleted
            raise FailedPrecondition(f"the stored rows were altered (run VerifyAudit): entry {seq} "
                                     "of the signed tree is missing", "inclusion_seq") from None
        if merkle.leaf_hash(entry.canonical) != leaf:
            # The proof tree holds the leaf as appended; the content is read from the row.
            # A row whose content was rewritten (leaf hash column untouched) must not be
            # served as proven beside a leaf hash that is not its own.
            raise FailedPrecondition(f"the stored rows were altered (run VerifyAudit): entry {seq} "
                                     "does not hash to its leaf in the signed tree", "inclusion_seq")
        return sth, path, leaf, entry

    def consistency_proof(self, old_size: int, tree_size: int = 0) -> tuple[SignedTreeHead, list[bytes], SignedTreeHead | None]:
        """(head, proof that the tree of ``old_size`` is a prefix of the head's, the
        stored head of ``old_size`` if there is one)."""
        sth = self._head_for(tree_size)
        if not 0 <= old_size <= sth.tree_size:
            raise InvalidArgument(f"must be in 0..{sth.tree_size}", "consistency_from_size")
        with self._writer.tree_lock:
            if sth.tree_size > self._writer.tree.size:
                raise FailedPrecondition("the proof tree is shorter than the signed log: the "
                                         "stored rows were altered (run VerifyAudit)", "tree_size")
            with _stored_rows_checked():
                self._check_signed_root(sth)
                path = self._writer.tree.consistency_proof(old_size, sth.tree_size)
        return sth, path, self._store.sth_at(old_size) if old_size else None

    def verify(self) -> AuditVerification:
        """Check the stored rows against the latest signed tree head (the newer of the
        stored one and the one this process signed last, so deleting STH rows does not
        hide a truncation while the service runs), then every stored tree head against
        the rows (a forged or moved head row is ``bad_signature`` even when it is not the
        newest). Reasons as ``verify_log``, plus ``modified`` for unparseable canonical
        bytes or query columns that disagree with them.

        The rows stream through ``LogVerifier`` a bounded page at a time (``iter_rows``),
        the stored heads beside them: memory does not grow with the log (until session 32
        every entry was held at once, a log of millions of entries costing GBs).

        What is verified is the log up to the head read at the start (as the export is):
        the service appends while this runs (every RPC of the mesh is audited), each batch
        with its signed head in one transaction, so rows and heads committed after the
        start are not tampering. Until session 32 (review32) they were reported as such —
        ``inserted`` (more rows than the head covers) or ``modified`` (a head beyond the
        rows read). Rows past the start's head are ``inserted`` only if no head signed by
        the end covers them, and a stored head past the start's is checked as before only
        if it is beyond that end (a later verify checks the rest)."""
        sth = self._newest_sth()
        signed = sth.tree_size if sth is not None else 0
        verifier = None if sth is None else LogVerifier(
            sth, self._writer.public_key, tree_heads=self._heads_up_to(signed),
            earlier_keys=self._earlier_keys)
        count, first_seq = 0, None
        stray: int | None = None   # past the start's head: the first row whose seq is not its position
        column_mismatch: int | None = None
        for position, row in enumerate(self._store.iter_rows()):
            try:
                entry = entry_from_canonical(bytes(row[1]))
            except ValueError:
                return AuditVerification(LogVerification(
                    False, TamperReason.MODIFIED, int(row[0]),
                    f"entry at seq {row[0]} is not a valid canonical entry"), position, sth)
            if column_mismatch is None and not columns_match(entry, row):
                column_mismatch = int(row[0])
            if first_seq is None:
                first_seq = entry.seq
            count += 1
            if verifier is not None and position < signed:
                verifier.add(entry, bytes(row[2]).ljust(merkle.HASH_SIZE, b"\0")[: merkle.HASH_SIZE])
            elif stray is None and entry.seq != position:
                stray = entry.seq
        if verifier is None:
            if count:
                return AuditVerification(LogVerification(
                    False, TamperReason.INSERTED, first_seq,
                    f"{count} entries but no signed tree head"), count, None)
            return AuditVerification(LogVerification(True, None, None, "ok: empty log"), 0, None)
        result = verifier.result()
        if result.ok and (meanwhile := self._appended_meanwhile(signed, count, stray)) is not None:
            result = meanwhile
        if result.ok and column_mismatch is not None:
            result = LogVerification(False, TamperReason.MODIFIED, column_mismatch,
                                     f"the query columns of seq {column_mismatch} differ from "
                                     "its signed content")
        # Valid: the entries the start's head covers and this answer's head names (rows
        # appended meanwhile are the next verify's).
        return AuditVerification(result, min(count, signed) if result.ok else count, sth)

    def _newest_sth(self) -> SignedTreeHead | None:
        """The newer of the stored latest head and the one this process signed last."""
        stored = self._store.stored_latest_sth()
        sth = self._writer.latest_sth()
        if stored is not None and (sth is None or stored.tree_size > sth.tree_size):
            sth = stored
        return sth

    def _heads_up_to(self, size: int) -> Iterator[tuple[int, str]]:
        for head in self._store.iter_tree_heads():
            if head[0] > size:
                return
            yield head

    def _appended_meanwhile(self, signed: int, count: int, stray: int | None) -> LogVerification | None:
        """After the log up to the start's head (``signed`` entries) verified: the rows read
        past it (``count`` rows in all; ``stray``: the seq of the first of them that is not
        at its position, a gap or a repeat) and the stored heads past it, against the newest
        genuine head now. Read in this order — the heads past it, then the newest head —
        because a batch's rows and head commit together: every row or head read before is
        covered by a head the end reads, unless it was not the writer's."""
        later = list(self._store.iter_tree_heads(after=signed))
        end = self._newest_sth()
        covered = signed
        if end is not None and end.tree_size > signed and verify_tree_head(end, self._writer.public_key):
            covered = end.tree_size
        if count > covered or stray is not None:
            return LogVerification(False, TamperReason.INSERTED, covered if count > covered else stray,
                                   f"{count} entries but the signed tree head covers {covered}")
        beyond = [head for head in later if head[0] > covered]
        return tree_heads_beyond_the_log(beyond, self._writer.public_key, self._earlier_keys) if beyond else None
