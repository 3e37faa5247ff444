"""Durable per-household data keys (privacy service, keys room).

``DataKeyStore`` keeps ``keys.domain.WrappedDek`` rows; a crypto-shred overwrites the
wrapped key in place (SQLite: with ``secure_delete`` on and a WAL checkpoint, so the old
bytes do not linger in free pages or the write-ahead log).
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common.storage.sql import Database, record_erasure
from services.privacy.keys.domain import WrappedDek


class DataKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _record(r) -> WrappedDek:
        return WrappedDek(r[0], int(r[1]), r[2], bytes(r[3]), r[4], r[5])

    def load(self, account_id: str | None = None) -> list[WrappedDek]:
        sql = "SELECT account_id, dek_version, kek_id, wrapped, created_at, destroyed_at FROM data_keys"
        with self.db.transaction() as tx:
            rows = (tx.query(sql + " WHERE account_id = ? ORDER BY dek_version", (account_id,))
                    if account_id is not None else tx.query(sql + " ORDER BY account_id, dek_version"))
        return [self._record(r) for r in rows]

    def insert_new(self, record: WrappedDek) -> bool:
        """Insert a freshly created DEK unless that (account, version) exists (another
        replica created it first: the caller reloads and uses theirs)."""
        with self.db.transaction() as tx:
            return tx.execute(
                "INSERT INTO data_keys (account_id, dek_version, kek_id, wrapped, created_at, destroyed_at) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (account_id, dek_version) DO NOTHING",
                (record.account_id, record.dek_version, record.kek_id, record.wrapped,
                 record.created_at.isoformat())) == 1

    def rewrap(self, records: Iterable[WrappedDek], previous: dict[tuple[str, int], bytes]) -> list[WrappedDek]:
        """Store re-wrapped live keys, each only over the exact wrapped key it was made
        from (compare-and-swap): a row another replica shredded (a tombstone) or re-wrapped
        since it was read is left as it is. Returns the records not stored (the caller
        reloads those households). Until chaos23 a rotation wrote its copy over a
        tombstone stored meanwhile and so brought an erased household's key back."""
        conflicts = []
        with self.db.transaction() as tx:
            for r in records:
                if tx.execute(
                        "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE account_id = ? AND dek_version = ? "
                        "AND destroyed_at IS NULL AND wrapped = ?",
                        (r.kek_id, r.wrapped, r.account_id, r.dek_version,
                         previous[(r.account_id, r.dek_version)])) != 1:
                    conflicts.append(r)
        return conflicts

    def overwrite(self, records: Iterable[WrappedDek], purges: list[dict] | None = None) -> int:
        """Store re-wrapped keys or tombstones over the existing rows, in place. When
        tombstones were written, the physical purge that follows is appended to
        ``purges`` (the deletion receipt lists it)."""
        records = list(records)
        if not records:
            return 0
        with self.db.transaction() as tx:
            if self.db.dialect == "sqlite":
                # Zero the freed bytes of overwritten keys instead of leaving them in free pages.
                tx.execute("PRAGMA secure_delete = ON")
            tx.executemany(
                "UPDATE data_keys SET kek_id = ?, wrapped = ?, destroyed_at = ? "
                "WHERE account_id = ? AND dek_version = ?",
                [(r.kek_id, r.wrapped, r.destroyed_at.isoformat() if r.destroyed_at else None,
                  r.account_id, r.dek_version) for r in records])
            if any(r.destroyed for r in records):
                record_erasure(tx)
        if any(r.destroyed for r in records):
            # The old page images also sit in the write-ahead log (SQLite: checkpoint) or in
            # dead tuples and WAL (PostgreSQL: VACUUM FULL of the small key table, WAL segments removed).
            purge = self.db.purge_erased(("data_keys",))
            if purges is not None:
                purges.append({**purge, "action": f"wrapped key overwritten by a tombstone; {purge['action']}"})
        return len(records)
