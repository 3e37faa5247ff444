"""The privacy service's data keys on SQLite and PostgreSQL: one DEK per household even
when two replicas race to create it, KEK rotation re-wraps every key (the old KEK can
then be retired), and crypto-shredding overwrites the stored key and reaches the other
replicas within the refresh bound."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.privacy.keys.domain import generate_kek
from services.privacy.keys.store import DataKeyStore
from services.privacy.keys.app import REFRESH_S, KeyService
from services.privacy.migrations import MIGRATIONS
from services.common.storage.sql import migrate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(database):
    migrate(database, MIGRATIONS)
    return DataKeyStore(database)


K1, K2 = generate_kek("k1"), generate_kek("k2")


def test_one_key_per_household_even_when_replicas_race(store):
    a, b = KeyService(store, [K1], "k1"), KeyService(store, [K1], "k1")
    b._refresh("acct-1")                       # b looked just before a created the key ...
    version_a, key_a = a.data_key("acct-1")
    version_b, key_b = b.data_key("acct-1")    # ... so b creates one too, loses the insert, adopts a's
    assert (version_a, key_a) == (version_b, key_b) == (1, key_a)
    assert [r.dek_version for r in store.load("acct-1")] == [0, 1]   # the data key, its digest key (0)
    assert a.data_key("acct-1", 1) == (1, key_a)
    with pytest.raises(NotFound):
        a.data_key("acct-1", 7)
    with pytest.raises(InvalidArgument):
        a.data_key("acct-1", -1)


def test_kek_rotation_rewraps_and_the_old_kek_can_be_retired(store):
    keys = KeyService(store, [K1, K2], "k1")
    _, dek1 = keys.data_key("acct-1")
    _, dek2 = keys.data_key("acct-2")
    assert {r.kek_id for r in store.load()} == {"k1"}
    count, active, in_use = keys.rotate("k2")
    assert (count, active, in_use) == (4, "k2", ["k2"])   # two data keys and their digest keys
    assert {r.kek_id for r in store.load()} == {"k2"}
    retired = KeyService(store, [K2], "k2")    # k1 removed from the configuration
    assert retired.data_key("acct-1")[1] == dek1 and retired.data_key("acct-2")[1] == dek2
    with pytest.raises(ValueError, match="kek"):
        KeyService(store, [K1], "k1")          # the old KEK alone cannot open anything now
    with pytest.raises(InvalidArgument):
        keys.rotate("k9")


def test_shredding_overwrites_the_key_and_reaches_other_replicas(store):
    clock = Clock()
    a = KeyService(store, [K1], "k1", monotonic=clock)
    b = KeyService(store, [K1], "k1", monotonic=clock)
    _, key = a.data_key("acct-1")
    assert b.data_key("acct-1")[1] == key
    assert a.shred("acct-1") == ["data_key:acct-1:v1", "digest_key:acct-1"]
    assert a.shred("acct-1") == []             # idempotent: nothing left to destroy
    (digest, row) = store.load("acct-1")
    assert digest.destroyed and digest.wrapped == b""
    assert row.wrapped == b"" and row.destroyed
    with pytest.raises(FailedPrecondition):
        a.data_key("acct-1")
    assert b.data_key("acct-1")[1] == key      # b's view is at most REFRESH_S old ...
    clock.t += REFRESH_S + 0.1
    with pytest.raises(FailedPrecondition):
        b.data_key("acct-1")                   # ... then b refuses too
    assert a.shred("never-had-a-key") == []


def test_a_rotation_on_one_replica_never_brings_back_a_key_another_replica_shredded_meanwhile(store):
    """chaos23: two privacy replicas, an admin's ``RotateKeys`` on one while a household
    deletion shreds a key on the other. The rotation re-wraps what it read before the
    shred; storing that over the tombstone put the wrapped key back in ``data_keys``
    (``destroyed_at`` NULL): every replica that (re)loaded it served the erased
    household's key again and accepted its data, and the receipt's shred was undone."""
    a = KeyService(store, [K1, K2], "k1")      # the replica the admin's rotation reaches
    b = KeyService(store, [K1, K2], "k1")      # the replica running the deletion job
    a.data_key("acct-erased")
    _, kept = a.data_key("acct-kept")
    rewrap = a.ring.rewrap_all

    def shred_meanwhile():
        a.ring.rewrap_all = rewrap             # once
        records = rewrap()                     # a re-wrapped what it had read ...
        assert b.shred("acct-erased") == ["data_key:acct-erased:v1", "digest_key:acct-erased"]   # ... then b shreds
        return records

    a.ring.rewrap_all = shred_meanwhile
    count, active, in_use = a.rotate("k2")
    assert (count, active, in_use) == (2, "k2", ["k2"])   # acct-kept's data key and digest key
    (digest, row) = store.load("acct-erased")
    assert digest.destroyed and digest.wrapped == b""
    assert row.destroyed and row.wrapped == b""
    for replica in (a, b, KeyService(store, [K1, K2], "k2")):   # a restarted replica too
        with pytest.raises(FailedPrecondition):
            replica.data_key("acct-erased")
    assert KeyService(store, [K2], "k2").data_key("acct-kept")[1] == kept   # k1 retired
    assert len(KeyService(store, [K2], "k2").digest_key("acct-kept")) == 32  # its digest key re-wrapped too


def test_two_rotations_at_once_on_two_replicas_leave_every_key_under_the_new_kek(store):
    a = KeyService(store, [K1, K2], "k1")
    b = KeyService(store, [K1, K2], "k1")
    keys = {acct: a.data_key(acct)[1] for acct in ("acct-1", "acct-2")}
    rewrap = a.ring.rewrap_all

    def other_rotation_meanwhile():
        a.ring.rewrap_all = rewrap             # once
        records = rewrap()
        assert b.rotate("k2")[0] == 4
        return records

    a.ring.rewrap_all = other_rotation_meanwhile
    assert a.rotate("k2")[0] == 0              # b re-wrapped both first: a stores none over them
    assert {r.kek_id for r in store.load()} == {"k2"}
    retired = KeyService(store, [K2], "k2")
    assert {acct: retired.data_key(acct)[1] for acct in keys} == keys


def test_a_kek_that_opens_the_oldest_keys_starts_though_a_later_key_does_not_open(store):
    """review25: the start check (attack25) refused any KEK that failed one of the keys it
    tried, the newest included. A key another KEK under the same id wrapped (a run on a
    regenerated development file before session 25), or one damaged row, then stopped
    privacy at its next start with the right KEK too: no KEK could start it (the wrong
    one fails the oldest keys), so every household lost its key service. The right KEK
    opens the oldest keys: privacy starts, and says how many tried do not open; a KEK
    that opens none of the oldest (bytes replaced under the id) is still refused."""
    from services.common.config import ConfigError
    from services.privacy.keys.domain import KeyRing

    right, wrong = generate_kek("dev-1"), generate_kek("dev-1")
    first = KeyService(store, [right], "dev-1")
    kept = {f"acct-{i}": first.data_key(f"acct-{i}") for i in range(3)}
    stray = KeyRing([wrong], "dev-1").create_dek("acct-stray", datetime.now(UTC) + timedelta(minutes=1))
    assert store.insert_new(stray)
    restarted = KeyService(store, [right], "dev-1")
    assert {account: restarted.data_key(account) for account in kept} == kept
    with pytest.raises(ConfigError, match="does not open"):
        KeyService(store, [wrong], "dev-1")


def test_the_orphan_digest_key_scan_takes_no_write_lock_when_there_is_nothing_to_shred(tmp_path):
    """The first rotation sweep after each start scans every digest key for one a privacy
    replica of the release before left live (d4a7749). On SQLite the scan ran in a write
    transaction, holding privacy.db's one write lock for the whole scan at every start
    (~1.1 s for 300,000 households here; first keys, deletions and rotations wait behind it):
    it reads now, and writes only for the orphans it found (review27). Shown with the write
    lock held by another connection: the scan answers 0 at once where it waited for the
    lock and failed ("database is locked") after the busy timeout."""
    import sqlite3

    from services.common.storage.sql import SqliteDatabase

    db = SqliteDatabase(tmp_path / "privacy.db")
    try:
        migrate(db, MIGRATIONS)
        keys = KeyService(DataKeyStore(db), [K1], "k1")
        keys.data_key("acct-live")
        writer = sqlite3.connect(tmp_path / "privacy.db", timeout=1, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")   # a long write elsewhere: a first key, a shred
            assert DataKeyStore(db).shred_orphan_digest_keys("2026-12-07T04:00:00+00:00") == 0
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        db.close()


def test_privacy_holds_the_key_records_only_of_households_read_within_refresh_s(store):
    """Until session 29 privacy loaded every household's wrapped key records at start and
    kept each household it had served for the life of the process (+134 MiB per 100,000
    households, session 28), though a household's records older than REFRESH_S are read
    from the store again before any use. Now the start reads only the KEK check's sample
    and holds nothing, and a household read longer than REFRESH_S ago is dropped at the
    next read: this test failed (60 households held at start). Every key is still
    served, equal to the one made, and a shredded household stays refused once dropped."""
    clock = Clock()
    first = KeyService(store, [K1], "k1")
    made = first.data_keys([f"acct-{i:03d}" for i in range(60)])
    first.shred("acct-000")
    keys = KeyService(store, [K1], "k1", monotonic=clock)
    assert len(keys.ring._records) == 0
    served = keys.data_keys([f"acct-{i:03d}" for i in range(1, 41)])
    assert served == {a: made[a] for a in served} and len(keys.ring._records) == 40
    clock.t += REFRESH_S + 1
    assert keys.data_key("acct-050") == made["acct-050"]
    assert set(keys.ring._records) == {"acct-050"}
    with pytest.raises(FailedPrecondition):
        keys.data_key("acct-000")
    assert set(keys.ring._records) == {"acct-050", "acct-000"}
    clock.t += REFRESH_S + 1
    assert keys.data_key("acct-001") == made["acct-001"]
    assert set(keys.ring._records) == {"acct-001"}
    with pytest.raises(FailedPrecondition):   # dropped, read again: still shredded
        keys.data_key("acct-000")


def test_a_household_erased_before_it_had_a_key_never_gets_one(store):
    """attack30: the erasure of a household no store had written for yet (its first batch
    in flight, or an erasure asked at sign-up) shredded nothing, so the next GetDataKey(s)
    made it a key and the batch — or anything sent later — was stored after the job
    completed. Now a tombstone of version 1 is written, seen by every replica."""
    from services.privacy.keys.app import ERASED

    a, b = KeyService(store, [K1], "k1"), KeyService(store, [K1], "k1")
    b._refresh("acct-new")                     # b looked before the erasure: no record then
    assert a.shred("acct-new") == []           # no key existed: none reported destroyed
    assert a.shred("acct-new") == []           # idempotent
    for replica in (a, b):
        with pytest.raises(FailedPrecondition):
            replica.data_key("acct-new")
        assert replica.data_keys(["acct-new"]) == {"acct-new": ERASED}
    (row,) = store.load("acct-new")
    assert row.destroyed and row.wrapped == b"" and row.dek_version == 1
    assert a.data_key("acct-other")[0] == 1    # other households unaffected


def test_a_first_key_made_by_another_replica_during_the_erasure_is_shredded(store):
    """review30 of attack30's ec7fe21: between the erasing replica's read (no key yet) and
    its tombstone, another replica may store the household's first key (its first batch
    arriving). The tombstone then meets that row: the erasure shreds it instead and reports
    it destroyed; the other replica refuses the household once its view is older than
    REFRESH_S (the window every shred has, keys/app.py)."""
    now = [0.0]
    a = KeyService(store, [K1], "k1")
    b = KeyService(store, [K1], "k1", monotonic=lambda: now[0])
    tombstone = store.tombstone_unkeyed
    made: list[int] = []

    def keyed_first(account_id, kek_id, when):
        made.append(b.data_key(account_id)[0])   # the other replica, just before the tombstone
        return tombstone(account_id, kek_id, when)

    a.store.tombstone_unkeyed = keyed_first
    assert a.shred("acct-race") == ["data_key:acct-race:v1", "digest_key:acct-race"] and made == [1]
    with pytest.raises(FailedPrecondition):
        a.data_key("acct-race")
    now[0] += REFRESH_S + 0.1
    with pytest.raises(FailedPrecondition):
        b.data_key("acct-race")
    # Both shredded: the data key and the digest key made with it (version 0 in the table).
    assert sorted((r.dek_version, r.destroyed, r.wrapped) for r in store.load("acct-race")) == [
        (0, True, b""), (1, True, b"")]
