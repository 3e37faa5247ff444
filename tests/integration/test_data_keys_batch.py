"""Privacy's GetDataKeys (session 28) on SQLite and PostgreSQL: the newest data key of many
households in one call, the missing ones created in one store transaction. Until then a
store asked ``GetDataKey`` one household at a time, and privacy created each new
household's keys in its own lock hold and commit (~3 ms each): 5,000 new households in one
ingest request ran past the gateway's deadline (keyfetch27). An erased household stays
erased: the batch makes no key for it, whatever this replica's view of it. Also the
consent store's read of many accounts behind GetConsents (the same write's other
one-a-household call)."""

from __future__ import annotations

import pytest

from services.common.storage.sql import migrate
from services.privacy.keys.app import ERASED, KeyService
from services.privacy.keys.domain import generate_kek
from services.privacy.keys.store import DataKeyStore
from services.privacy.migrations import MIGRATIONS

K1 = generate_kek("k1")


@pytest.fixture
def store(database):
    migrate(database, MIGRATIONS)
    return DataKeyStore(database)


class CountingStore(DataKeyStore):
    """The real store, counting its write transactions of new keys."""

    def __init__(self, db) -> None:
        super().__init__(db)
        self.creations = 0

    def insert_new_many(self, created):
        self.creations += 1
        return super().insert_new_many(created)


def test_new_households_get_their_keys_in_one_transaction_the_same_keys_as_getdatakey_gives(database):
    migrate(database, MIGRATIONS)
    store = CountingStore(database)
    keys = KeyService(store, [K1], "k1")
    _, known = keys.data_key("acct-known")
    store.creations = 0
    accounts = ["acct-known"] + [f"acct-{i}" for i in range(600)]
    answers = keys.data_keys(accounts)
    assert store.creations == 1                # one transaction for the 600 new households
    assert list(answers) == accounts and answers["acct-known"] == (1, known)
    assert all(version == 1 and len(key) == 32 for version, key in answers.values())
    assert len({key for _, key in answers.values()}) == len(accounts)
    # Stored as GetDataKey stores a first key: data key and digest key, served after a restart.
    assert [r.dek_version for r in store.load("acct-7")] == [0, 1]
    restarted = KeyService(DataKeyStore(database), [K1], "k1")
    assert restarted.data_key("acct-7") == answers["acct-7"]
    assert len(restarted.digest_key("acct-7")) == 32
    store.creations = 0
    assert keys.data_keys(accounts) == answers  # nothing new: no write at all
    assert store.creations == 0


def test_a_batch_makes_no_key_for_a_household_another_replica_erased_meanwhile(store):
    """Replica b looked at the households (no key yet) just before replica a created and
    shredded one: b's view is up to REFRESH_S old, so b's batch creates a key for it too —
    the insert meets the stored tombstone, b reads it and answers ERASED, and the store
    holds the tombstones only."""
    a, b = KeyService(store, [K1], "k1"), KeyService(store, [K1], "k1")
    b._refresh_many(["acct-gone", "acct-new"])
    a.data_key("acct-gone")
    a.shred("acct-gone")
    answers = b.data_keys(["acct-gone", "acct-new"])
    assert answers["acct-gone"] == ERASED
    assert answers["acct-new"][0] == 1
    assert [(r.dek_version, r.destroyed) for r in store.load("acct-gone")] == [(0, True), (1, True)]
    assert b.data_keys(["acct-gone"]) == {"acct-gone": ERASED}


def test_a_household_an_older_privacy_shredded_stays_erased_though_its_digest_key_lives(store):
    """A privacy replica of a release before session 27 shreds the data keys only and leaves
    the digest key live (review27): the batch, like GetDataKey, reads the household as
    erased and makes no data key for it."""
    keys = KeyService(store, [K1], "k1")
    keys.data_key("acct-old-shred")
    with store.db.transaction() as tx:   # as that release's shred: data_keys only
        tx.execute("UPDATE data_keys SET wrapped = ?, destroyed_at = ? WHERE account_id = ?",
                   (b"", "2026-12-07T05:00:00+00:00", "acct-old-shred"))
    fresh = KeyService(store, [K1], "k1")
    assert fresh.data_keys(["acct-old-shred", "acct-x"])["acct-old-shred"] == ERASED
    assert [(r.dek_version, r.destroyed) for r in store.load("acct-old-shred")] == [(0, False), (1, True)]


def test_two_replicas_creating_the_same_households_at_once_give_one_key_each(store):
    a, b = KeyService(store, [K1], "k1"), KeyService(store, [K1], "k1")
    accounts = [f"acct-{i}" for i in range(50)]
    b._refresh_many(accounts)                  # b looked before a created them ...
    from_a = a.data_keys(accounts)
    from_b = b.data_keys(list(reversed(accounts)))   # ... so b creates too, loses, adopts a's
    assert {acct: from_b[acct] for acct in accounts} == from_a
    assert all([r.dek_version for r in store.load(acct)] == [0, 1] for acct in accounts)


def test_consents_of_many_accounts_in_one_read_defaults_for_the_unknown(database):
    """Consent's GetConsents (session 28) over the consent store: each account's flags in
    request order, the default (allowed, unknown) for one without a record."""
    from services.privacy.consent.store import ConsentStore

    consent = ConsentStore(database)
    consent.migrate()
    consent.set_consent("acct-no", False, True, "test")
    consent.set_consent("acct-yes", True, True, "test")
    got = consent.consents(["acct-yes", "acct-new", "acct-no"] + [f"acct-{i}" for i in range(700)])
    assert [(c.account_id, c.processing, c.attribution, c.known) for c in got[:3]] == [
        ("acct-yes", True, True, True), ("acct-new", True, True, False), ("acct-no", False, True, True)]
    assert len(got) == 703 and all(c.processing and not c.known for c in got[3:])
