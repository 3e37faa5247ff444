"""Durable per-household data keys (privacy service, keys room).

``DataKeyStore`` keeps ``keys.domain.WrappedDek`` rows; a crypto-shred overwrites the
wrapped key in place (SQLite: with ``secure_delete`` on and a WAL checkpoint, so the old
bytes do not linger in free pages or the write-ahead log).

The data key versions are in ``data_keys``; a household's erased-id digest key (the
record of version ``DIGEST_KEY_VERSION``, 0) is in ``digest_keys``, one row a household,
so that every query over the versions of ``data_keys`` (the newest, a rotation under
way, the batch's candidates, the ledger's shredded households) sees data keys only.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.common.storage.sql import Database, record_erasure
from services.privacy.keys.domain import DIGEST_KEY_VERSION, WrappedDek

# The key tables a tombstone's physical purge covers (Database.purge_erased).
KEY_TABLES = ("data_keys", "digest_keys")
# Account ids per ``IN (...)`` of a batch read (SQLite's default bound is 32,766 parameters).
_IN_CHUNK = 500


class DataKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _record(r) -> WrappedDek:
        return WrappedDek(r[0], int(r[1]), r[2], bytes(r[3]), r[4], r[5])

    def load(self, account_id: str | None = None) -> list[WrappedDek]:
        sql = "SELECT account_id, dek_version, kek_id, wrapped, created_at, destroyed_at FROM data_keys"
        digest_sql = (f"SELECT account_id, {DIGEST_KEY_VERSION}, kek_id, wrapped, created_at, destroyed_at "
                      "FROM digest_keys")
        # A read transaction, as ``load_many``'s (review33): in a write one (SQLite: the one
        # write lock) every household's key refresh waited behind any write of privacy's database.
        with self.db.transaction(readonly=True) as tx:
            if account_id is not None:
                rows = tx.query(digest_sql + " WHERE account_id = ?", (account_id,)) + \
                    tx.query(sql + " WHERE account_id = ? ORDER BY dek_version", (account_id,))
            else:
                rows = tx.query(digest_sql) + tx.query(sql + " ORDER BY account_id, dek_version")
        return sorted((self._record(r) for r in rows), key=lambda r: (r.account_id, r.dek_version))

    def start_check_sample(self, sample: int) -> list[WrappedDek]:
        """The live keys the start-up KEK check tries (``KeyRing.unopened_data_keys``):
        of each KEK, the ``sample`` oldest and ``sample`` newest live data and digest keys
        by ``created_at`` — not every record (until session 29 privacy loaded every
        household's records at start and kept them: +134 MiB per 100,000 households)."""
        columns = "account_id, {v}, kek_id, wrapped, created_at, destroyed_at"
        rows: list = []
        with self.db.transaction(readonly=True) as tx:
            for table, version in (("data_keys", "dek_version"), ("digest_keys", str(DIGEST_KEY_VERSION))):
                kek_ids = [r[0] for r in tx.query(f"SELECT DISTINCT kek_id FROM {table} WHERE destroyed_at IS NULL")]
                for kek_id in kek_ids:
                    for order in ("ASC", "DESC"):
                        rows += tx.query(f"SELECT {columns.format(v=version)} FROM {table} WHERE destroyed_at IS NULL "
                                         f"AND kek_id = ? ORDER BY created_at {order} LIMIT ?", (kek_id, sample))
        return sorted({(r[0], int(r[1])): self._record(r) for r in rows}.values(),
                      key=lambda r: (r.account_id, r.dek_version))

    def kek_ids_in_use(self) -> set[str]:
        """The KEK ids wrapping live keys (``load_keks``' ``stored_kek_ids``)."""
        with self.db.transaction(readonly=True) as tx:
            return {r[0] for table in ("data_keys", "digest_keys")
                    for r in tx.query(f"SELECT DISTINCT kek_id FROM {table} WHERE destroyed_at IS NULL")}

    def load_many(self, account_ids: Iterable[str]) -> list[WrappedDek]:
        """``load`` of several households at once (``KeyService.data_keys``' refresh): one
        read transaction, the ids in chunks of ``_IN_CHUNK``."""
        accounts = sorted(set(account_ids))
        rows: list = []
        with self.db.transaction(readonly=True) as tx:
            for start in range(0, len(accounts), _IN_CHUNK):
                chunk = tuple(accounts[start:start + _IN_CHUNK])
                marks = ", ".join("?" * len(chunk))
                rows += tx.query(f"SELECT account_id, {DIGEST_KEY_VERSION}, kek_id, wrapped, created_at, destroyed_at "
                                 f"FROM digest_keys WHERE account_id IN ({marks})", chunk)
                rows += tx.query("SELECT account_id, dek_version, kek_id, wrapped, created_at, destroyed_at "
                                 f"FROM data_keys WHERE account_id IN ({marks})", chunk)
        return sorted((self._record(r) for r in rows), key=lambda r: (r.account_id, r.dek_version))

    @staticmethod
    def _insert_digest_key(tx, record: WrappedDek) -> bool:
        return tx.execute(
            "INSERT INTO digest_keys (account_id, kek_id, wrapped, created_at, destroyed_at) "
            "VALUES (?, ?, ?, ?, NULL) ON CONFLICT (account_id) DO NOTHING",
            (record.account_id, record.kek_id, record.wrapped, record.created_at.isoformat())) == 1

    def insert_new(self, record: WrappedDek, digest_key: WrappedDek | None = None) -> bool:
        """Insert a freshly created DEK (and the household's digest key, derived from it,
        in the same transaction) unless that (account, version) exists (another replica
        created it first: the caller reloads and uses theirs)."""
        return record.account_id in self.insert_new_many([(record, digest_key)])

    def insert_new_many(self, created: Iterable[tuple[WrappedDek, WrappedDek | None]]) -> set[str]:
        """``insert_new`` of many households' first keys in ONE transaction (one commit;
        on SQLite one hold of the write lock): each (data key, digest key) pair as
        ``insert_new`` does it, the digest key only where its data key was inserted.
        Returns the accounts whose data key was inserted; the others had that version
        stored already (another replica's key won, or a tombstone: the household was
        erased) and the caller reloads them."""
        inserted = set()
        with self.db.transaction() as tx:
            for record, digest_key in created:
                if tx.execute(
                        "INSERT INTO data_keys (account_id, dek_version, kek_id, wrapped, created_at, destroyed_at) "
                        "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (account_id, dek_version) DO NOTHING",
                        (record.account_id, record.dek_version, record.kek_id, record.wrapped,
                         record.created_at.isoformat())) == 1:
                    inserted.add(record.account_id)
                    if digest_key is not None:
                        self._insert_digest_key(tx, digest_key)
        return inserted

    def insert_version(self, record: WrappedDek) -> str:
        """Insert a rotation's new DEK version in the household's lock, only while the
        household has a live key: "inserted"; "exists" (another replica created that
        version first: reload); "destroyed" (the household was shredded: never a key
        after that). The shred (``overwrite``) takes the same lock and tombstones every
        live version it finds, so the two run one after the other and the erasure wins
        either way: the new version is shredded with the rest, or never inserted."""
        with self.db.transaction() as tx:
            tx.lock_household(record.account_id)
            if not tx.query("SELECT 1 FROM data_keys WHERE account_id = ? AND destroyed_at IS NULL",
                            (record.account_id,)):
                return "destroyed"
            if record.is_digest_key:   # the household's digest key (KeyService.digest_key), same rule
                return "inserted" if self._insert_digest_key(tx, record) else "exists"
            return "inserted" if tx.execute(
                "INSERT INTO data_keys (account_id, dek_version, kek_id, wrapped, created_at, destroyed_at) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (account_id, dek_version) DO NOTHING",
                (record.account_id, record.dek_version, record.kek_id, record.wrapped,
                 record.created_at.isoformat())) == 1 else "exists"

    def tombstone_unkeyed(self, account_id: str, kek_id: str, when: str) -> bool:
        """The erasure of a household that has no data key yet: a tombstone of its first
        version, so that none is ever created for it (``insert_new_many`` and
        ``insert_version`` meet the tombstone: "the household was erased"). False when a
        first key was stored meanwhile (another replica's ``data_key``): the caller
        shreds that one. Until attack30 such an erasure stored nothing, and the events of
        the household's first batch, in flight during the job or sent after it, were
        stored under a new key once the job had completed."""
        with self.db.transaction() as tx:
            tx.lock_household(account_id)
            return tx.execute(
                "INSERT INTO data_keys (account_id, dek_version, kek_id, wrapped, created_at, destroyed_at) "
                "VALUES (?, 1, ?, ?, ?, ?) ON CONFLICT (account_id, dek_version) DO NOTHING",
                (account_id, kek_id, b"", when, when)) == 1

    def retired_versions(self, account_id: str) -> set[int]:
        """Live versions whose data every store re-encrypted to a newer one."""
        with self.db.transaction() as tx:
            return {int(r[0]) for r in tx.query(
                "SELECT dek_version FROM data_keys WHERE account_id = ? AND retired_at IS NOT NULL "
                "AND destroyed_at IS NULL", (account_id,))}

    def rotations_in_progress(self, limit: int = 100) -> list[str]:
        """Households with a live version older than their newest that is not retired: a
        rotation begun and not finished (keys/rotation.py)."""
        # Only households with a live version >= 2 can have one (index data_keys_version);
        # a scan of every household's key, every minute on every replica, would not do.
        with self.db.transaction() as tx:
            return [r[0] for r in tx.query(
                "SELECT DISTINCT k.account_id FROM data_keys k WHERE k.account_id IN (SELECT account_id FROM data_keys "
                "WHERE dek_version >= 2 AND destroyed_at IS NULL) AND k.destroyed_at IS NULL AND k.retired_at IS NULL "
                "AND k.dek_version < (SELECT MAX(n.dek_version) FROM data_keys n WHERE n.account_id = k.account_id "
                "AND n.destroyed_at IS NULL) ORDER BY k.account_id LIMIT ?", (limit,))]

    def newest_created_before(self, before: str, limit: int) -> list[str]:
        """Households whose newest live data key was created before ``before`` (ISO time),
        oldest first: the batch rotation's candidates."""
        with self.db.transaction() as tx:
            return [r[0] for r in tx.query(
                "SELECT account_id FROM data_keys WHERE destroyed_at IS NULL GROUP BY account_id "
                "HAVING MAX(created_at) < ? ORDER BY MAX(created_at), account_id LIMIT ?", (before, limit))]

    def retire(self, account_id: str, versions: Iterable[int], destroy: Iterable[int], when: str,
               purges: list[dict] | None = None, purge: bool = True) -> list[int]:
        """The end of a rotation: mark ``versions`` retired and tombstone ``destroy``
        (each only while live; a shred meanwhile already tombstoned them). Returns the
        versions this call destroyed; their old wrapped keys are purged physically —
        ``purge`` False: by the caller's ``purge_owed`` once it retired a whole batch pass
        (the tombstones' transaction notes the purge owed, so the rotation sweep runs it
        after a crash in between on PostgreSQL, and its first sweep after a restart on SQLite)."""
        destroy = sorted(set(destroy))
        destroyed = []
        with self.db.transaction() as tx:
            tx.lock_household(account_id)
            if self.db.dialect == "sqlite":
                tx.execute("PRAGMA secure_delete = ON")
            for v in sorted(set(versions)):
                tx.execute("UPDATE data_keys SET retired_at = ? WHERE account_id = ? AND dek_version = ? "
                           "AND destroyed_at IS NULL AND retired_at IS NULL", (when, account_id, v))
            for v in destroy:
                if tx.execute("UPDATE data_keys SET wrapped = ?, destroyed_at = ? WHERE account_id = ? "
                              "AND dek_version = ? AND destroyed_at IS NULL", (b"", when, account_id, v)) == 1:
                    destroyed.append(v)
            if destroyed:
                record_erasure(tx)
        if destroyed and purge:
            step = self.db.purge_erased(KEY_TABLES)
            if purges is not None:
                purges.append({**step, "action": f"retired wrapped key overwritten by a tombstone; {step['action']}"})
        return destroyed

    def shred_orphan_digest_keys(self, when: str) -> int:
        """Tombstone the live digest keys of households whose data keys are all destroyed:
        a privacy replica of a release before session 27 shredded the household (it knows
        no digest key) during a rolling upgrade. Returns how many; their old wrapped keys
        are purged physically (``purge_owed`` after). One scan of ``digest_keys``: run by
        the first rotation sweep after a start, not every minute. The scan reads (on SQLite
        a write transaction held the database's one write lock for all of it, review27); the
        write, only for orphans found, re-checks each under its household lock, taken in
        account order (two replicas starting together lock alike)."""
        with self.db.transaction(readonly=True) as tx:
            orphans = sorted(r[0] for r in tx.query(
                "SELECT d.account_id FROM digest_keys d WHERE d.destroyed_at IS NULL "
                "AND EXISTS (SELECT 1 FROM data_keys k WHERE k.account_id = d.account_id) "
                "AND NOT EXISTS (SELECT 1 FROM data_keys k WHERE k.account_id = d.account_id "
                "AND k.destroyed_at IS NULL)"))
        if not orphans:
            return 0
        with self.db.transaction() as tx:
            if self.db.dialect == "sqlite":
                tx.execute("PRAGMA secure_delete = ON")
            for account_id in orphans:
                tx.lock_household(account_id)
                tx.execute("UPDATE digest_keys SET wrapped = ?, destroyed_at = ? WHERE account_id = ? "
                           "AND destroyed_at IS NULL AND NOT EXISTS (SELECT 1 FROM data_keys k WHERE "
                           "k.account_id = digest_keys.account_id AND k.destroyed_at IS NULL)",
                           (b"", when, account_id))
            record_erasure(tx)
        self.db.purge_erased(KEY_TABLES)
        return len(orphans)

    def purge_owed(self) -> dict:
        """The physical purge of ``data_keys`` (``Database.purge_erased``) that a tombstone's
        writer noted and may not have run (killed after its commit): the rotation sweep
        runs it (keys/rotation.py, ``DataKeyRotation.sweep``)."""
        return self.db.purge_erased(KEY_TABLES)

    def rewrap(self, records: Iterable[WrappedDek], previous: dict[tuple[str, int], bytes]) -> list[WrappedDek]:
        """Store re-wrapped live keys, each only over the exact wrapped key it was made
        from (compare-and-swap): a row another replica shredded (a tombstone) or re-wrapped
        since it was read is left as it is. Returns the records not stored (the caller
        reloads those households). Until chaos23 a rotation wrote its copy over a
        tombstone stored meanwhile and so brought an erased household's key back."""
        conflicts = []
        with self.db.transaction() as tx:
            for r in records:
                if r.is_digest_key:
                    changed = tx.execute(
                        "UPDATE digest_keys SET kek_id = ?, wrapped = ? WHERE account_id = ? "
                        "AND destroyed_at IS NULL AND wrapped = ?",
                        (r.kek_id, r.wrapped, r.account_id, previous[(r.account_id, r.dek_version)]))
                else:
                    changed = tx.execute(
                        "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE account_id = ? AND dek_version = ? "
                        "AND destroyed_at IS NULL AND wrapped = ?",
                        (r.kek_id, r.wrapped, r.account_id, r.dek_version,
                         previous[(r.account_id, r.dek_version)]))
                if changed != 1:
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
            shredded = sorted({r.account_id: r.destroyed_at for r in records if r.destroyed}.items())
            for account_id, _ in shredded:
                tx.lock_household(account_id)   # against a rotation's new version (insert_version)
            tx.executemany(
                "UPDATE data_keys SET kek_id = ?, wrapped = ?, destroyed_at = ? "
                "WHERE account_id = ? AND dek_version = ?",
                [(r.kek_id, r.wrapped, r.destroyed_at.isoformat() if r.destroyed_at else None,
                  r.account_id, r.dek_version) for r in records if not r.is_digest_key])
            tx.executemany(
                "UPDATE digest_keys SET kek_id = ?, wrapped = ?, destroyed_at = ? WHERE account_id = ?",
                [(r.kek_id, r.wrapped, r.destroyed_at.isoformat() if r.destroyed_at else None, r.account_id)
                 for r in records if r.is_digest_key])
            # A household is shredded whole: also a version the caller's view had not seen
            # (a data key rotation's new version, inserted by another replica meanwhile), and
            # its digest key (one derived by another replica meanwhile).
            for account_id, when in shredded:
                for table in KEY_TABLES:
                    tx.execute(f"UPDATE {table} SET wrapped = ?, destroyed_at = ? WHERE account_id = ? "
                               "AND destroyed_at IS NULL", (b"", when.isoformat(), account_id))
            if any(r.destroyed for r in records):
                record_erasure(tx)
        if any(r.destroyed for r in records):
            # The old page images also sit in the write-ahead log (SQLite: checkpoint) or in
            # dead tuples and WAL (PostgreSQL: VACUUM FULL of the small key table, WAL segments removed).
            purge = self.db.purge_erased(KEY_TABLES)
            if purges is not None:
                purges.append({**purge, "action": f"wrapped key overwritten by a tombstone; {purge['action']}"})
        return len(records)
