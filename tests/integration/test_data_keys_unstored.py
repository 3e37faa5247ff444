"""A data key privacy made but could not store is never served (review28). The key ring
holds a key from ``create_dek`` on, before the store's transaction; when that transaction
failed (the database unavailable, a write refused), the key stayed in the ring, unstored,
and the next GetDataKey / GetDataKeys of the household — the store's retry — served it:
the store sealed the household's data under a key no database held, unreadable after
privacy's restart (a restarted privacy made another version 1). The same for a rotation's
new version, which a retried rotation then "resumed" and made the only live one.

The failure here is a real one: the database refuses the insert (a trigger), on SQLite
and PostgreSQL."""

from __future__ import annotations

import pytest

from services.common.storage.sql import PostgresDatabase, migrate
from services.privacy.keys.app import KeyService
from services.privacy.keys.domain import generate_kek
from services.privacy.keys.store import DataKeyStore
from services.privacy.migrations import MIGRATIONS

K1 = generate_kek("k1")


def _refuse_inserts(database, on: bool) -> None:
    with database.transaction() as tx:
        if isinstance(database, PostgresDatabase):
            if on:
                tx.execute("CREATE FUNCTION review28_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                           "'BEGIN RAISE EXCEPTION ''review28: insert refused''; END'")
                tx.execute("CREATE TRIGGER review28_refuse BEFORE INSERT ON data_keys FOR EACH ROW "
                           "EXECUTE FUNCTION review28_refuse()")
            else:
                tx.execute("DROP TRIGGER review28_refuse ON data_keys")
                tx.execute("DROP FUNCTION review28_refuse()")
        elif on:
            tx.execute("CREATE TRIGGER review28_refuse BEFORE INSERT ON data_keys "
                       "BEGIN SELECT RAISE(ABORT, 'review28: insert refused'); END")
        else:
            tx.execute("DROP TRIGGER review28_refuse")


@pytest.fixture
def keys(database):
    migrate(database, MIGRATIONS)
    return KeyService(DataKeyStore(database), [K1], "k1")


def _restarted(database) -> KeyService:
    return KeyService(DataKeyStore(database), [K1], "k1")


def test_a_first_key_whose_batch_insert_failed_is_not_served(keys, database):
    _refuse_inserts(database, True)
    with pytest.raises(Exception):
        keys.data_keys(["acct-u1", "acct-u2"])
    _refuse_inserts(database, False)
    served = keys.data_keys(["acct-u1", "acct-u2"])        # the store's retry
    restarted = _restarted(database)
    assert restarted.data_keys(["acct-u1", "acct-u2"]) == served   # stored: the same after a restart


def test_a_first_key_whose_insert_failed_is_not_served(keys, database):
    _refuse_inserts(database, True)
    with pytest.raises(Exception):
        keys.data_key("acct-u3")
    _refuse_inserts(database, False)
    served = keys.data_key("acct-u3")
    assert _restarted(database).data_key("acct-u3") == served


def test_a_rotation_version_whose_insert_failed_is_not_served(keys, database):
    first = keys.data_key("acct-u4")
    _refuse_inserts(database, True)
    with pytest.raises(Exception):
        keys.begin_rotation("acct-u4")
    assert keys.data_key("acct-u4") == first               # the unstored version 2 is not the newest
    _refuse_inserts(database, False)
    target, resumed, _ = keys.begin_rotation("acct-u4")    # the retried rotation makes (and stores) its own
    assert (target, resumed) == (2, False)
    assert _restarted(database).data_key("acct-u4", 2) == keys.data_key("acct-u4", 2)
