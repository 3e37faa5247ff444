"""The consent room's repository: one row per account that set consent explicitly.

The privacy process keeps every room's tables in one database with one schema history
(``services/privacy/migrations.py``); ``migrate`` applies all of it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.storage.cache import Cache, MemoryCache
from services.common.storage.sql import Database, migrate
from services.privacy.keys.store import KEY_TABLES
from services.privacy.migrations import MIGRATIONS


@dataclass(frozen=True)
class Consent:
    account_id: str
    processing: bool
    attribution: bool
    version: int
    known: bool


class ConsentStore:
    def __init__(self, db: Database, cache: Cache | None = None) -> None:
        self.db = db
        self.cache = cache or MemoryCache("privacy")

    def migrate(self) -> list[int]:
        # The key tables are kept out of PostgreSQL's planner statistics: ANALYZE copied every
        # household's wrapped key into pg_statistic, which a key's destruction (an erasure,
        # a rotation) never reaches (attack27; tests/integration/test_privacy_key_statistics.py).
        return migrate(self.db, MIGRATIONS, personal_tables=KEY_TABLES)

    def set_consent(self, account_id: str, processing: bool, attribution: bool, by: str) -> int:
        return self.change_consent(account_id, processing, attribution, by)[1]

    def change_consent(self, account_id: str, processing: bool, attribution: bool,
                       by: str) -> tuple[Consent, int]:
        """Store the flags; returns the consent before (``known`` False: none was set,
        i.e. both allowed) and the new version. The previous flags are read in the same
        transaction as the write, and on PostgreSQL the row is taken (``FOR UPDATE``): under
        read committed a concurrent change (another replica's) otherwise read the same
        row, waited at its UPDATE and wrote the same version over the first's flags, its
        ``previous`` naming flags no longer there (review20,
        tests/integration/test_consent_concurrent.py). SQLite's write transactions run one
        at a time already."""
        lock = " FOR UPDATE" if self.db.dialect == "postgres" else ""
        with self.db.transaction() as tx:
            row = tx.query("SELECT version, processing, attribution FROM consent WHERE account_id = ?" + lock,
                           (account_id,))
            version = (int(row[0][0]) if row else 0) + 1
            before = (Consent(account_id, bool(row[0][1]), bool(row[0][2]), int(row[0][0]), True) if row
                      else Consent(account_id, True, True, 0, False))
            if row:
                tx.execute("UPDATE consent SET processing = ?, attribution = ?, version = ?, "
                           "updated_at = ?, updated_by = ? WHERE account_id = ?",
                           (int(processing), int(attribution), version, time.time(), by, account_id))
            else:
                tx.execute("INSERT INTO consent (account_id, processing, attribution, version, "
                           "updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?)",
                           (account_id, int(processing), int(attribution), version, time.time(), by))
        return before, version

    def consent(self, account_id: str) -> Consent:
        # A read: on SQLite a write transaction would take the one write lock (review28).
        with self.db.transaction(readonly=True) as tx:
            row = tx.query("SELECT processing, attribution, version FROM consent WHERE account_id = ?",
                           (account_id,))
        if not row:
            # No explicit record: processing is allowed under the service contract,
            # which is how a newly signed-up account starts (documented in docs/privacy.md).
            return Consent(account_id, True, True, 0, False)
        return Consent(account_id, bool(row[0][0]), bool(row[0][1]), int(row[0][2]), True)

    def consents(self, account_ids: list[str]) -> list[Consent]:
        """``consent`` of each account (in order), in one read transaction."""
        found: dict[str, Consent] = {}
        with self.db.transaction(readonly=True) as tx:
            for start in range(0, len(account_ids), 500):
                chunk = tuple(account_ids[start:start + 500])
                for r in tx.query("SELECT account_id, processing, attribution, version FROM consent "
                                  f"WHERE account_id IN ({', '.join('?' * len(chunk))})", chunk):
                    found[r[0]] = Consent(r[0], bool(r[1]), bool(r[2]), int(r[3]), True)
        return [found.get(a) or Consent(a, True, True, 0, False) for a in account_ids]

    def withdrawn(self, after_account_id: str, limit: int) -> tuple[list[Consent], bool]:
        """Up to ``limit`` accounts with an id after ``after_account_id`` whose processing
        or attribution consent is withdrawn, in id order, and whether more follow. A read
        transaction, as ``consent`` (review33: a write one waited behind any write of
        privacy's database)."""
        with self.db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT account_id, processing, attribution, version FROM consent "
                            "WHERE (processing = 0 OR attribution = 0) AND account_id > ? "
                            "ORDER BY account_id LIMIT ?", (after_account_id, limit + 1))
        return ([Consent(r[0], bool(r[1]), bool(r[2]), int(r[3]), True) for r in rows[:limit]],
                len(rows) > limit)
