"""A consent read (privacy's GetConsent, on every write a data holder checks) takes no write
lock (review28, keys28's note): ``ConsentStore.consent`` read inside a write transaction —
on SQLite ``BEGIN IMMEDIATE``, the database's one write lock — so every GetConsent waited
behind any write of privacy's database (a deletion job's step, an audit batch, a key
rotation) and, past the busy timeout, failed. A read transaction, as ``consents`` uses."""

from __future__ import annotations

import threading
from pathlib import Path

from services.common.storage.sql import SqliteDatabase, migrate
from services.privacy.consent.store import ConsentStore
from services.privacy.migrations import MIGRATIONS
from tests.helpers.held_transaction import answered_beside_a_held_write, transaction_held_open


def test_a_consent_read_does_not_wait_for_a_write_in_progress(tmp_path: Path):
    db = SqliteDatabase(tmp_path / "privacy.db")
    try:
        migrate(db, MIGRATIONS)
        store = ConsentStore(db)
        answers: list = []
        with transaction_held_open(db, lambda tx: tx.execute("CREATE TABLE held_write (x INTEGER)")):
            reader = threading.Thread(target=lambda: answers.append(store.consent("acct-r")), daemon=True)
            reader.start()
            reader.join(10)
            read_while_held = not reader.is_alive()
        reader.join()
        assert read_while_held, "the consent read waited for the write transaction to end"
        assert answers and answers[0].processing is True
    finally:
        db.close()


def test_the_list_of_withdrawn_consent_does_not_wait_for_a_write_in_progress(tmp_path: Path):
    """``ConsentStore.withdrawn`` (ListWithdrawnConsent: attribution's Attribute over every
    account, once per consent TTL) is the same kind of read, and until review33 it too ran in
    a write transaction: behind a deletion job's step or a key rotation's batch it waited up
    to the 30 s busy timeout, then failed."""
    db = SqliteDatabase(tmp_path / "privacy.db")
    try:
        migrate(db, MIGRATIONS)
        store = ConsentStore(db)
        store.set_consent("acct-w", False, True, "test")
        listed, more = answered_beside_a_held_write(db, lambda: store.withdrawn("", 10))
        assert [c.account_id for c in listed] == ["acct-w"] and not more
    finally:
        db.close()
