"""An ingest batch of new households: their rows are built and sealed before the write
transaction opens, and the transaction only writes them (ingest29). On SQLite every other
write of the service waits while a write transaction is open; with 5,000 new households in
one request it was open for their feature vectors, session states and sealed fields.

What must stay true: the rows are those the per-device path writes (the sessions
``_rebuild_sessions`` builds from the stored events), a household that some other write
reached between the preparation and the transaction is written by the per-device path, and
rows sealed under a data key that a re-key replaced meanwhile are not kept."""

from __future__ import annotations

import random
import sqlite3
import time

import pytest

from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.client import reset_serving_deadline, set_serving_deadline
from services.common.erasure import ErasureScope, ScopeKind
from services.common.errors import DeadlineExceeded
from services.common.field_crypto import FieldCipher, HouseholdSealer, note_household_rekeyed
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek
from tests.helpers.incremental_sessions import assert_same_sessions, random_event
from tests.helpers.keys import NOW, ring_fetcher

T0 = time.time() - 3 * 86400
GAP_S = 1800.0


def _batch(rng: random.Random, households: list[str]) -> list[ViewingEvent]:
    """Each household two devices, sessions split by gaps, an id repeated within a device
    and one repeated on the other device, UTC offsets on some; shuffled."""
    events = []
    for h, account in enumerate(households):
        ts = T0 + 600.0 * h
        for i in range(12):
            device = "tv-1" if i % 3 else "phone-1"
            ts += rng.choice((30.0, 300.0, 2 * GAP_S))
            events.append(random_event(rng, account, i, ts, device=device,
                                       utc_offset_minutes=330 if h % 2 else None))
        events.append(random_event(rng, account, 99, ts + 5.0, device="tv-1", event_id="e4"))     # repeats e4
        events.append(random_event(rng, account, 98, ts + 6.0, device="phone-1", event_id="e1"))  # e1 is tv-1's
    rng.shuffle(events)
    return events


def _store(path, cipher: FieldCipher | None = None, cls=ClusteringStore) -> ClusteringStore:
    store = cls(SqliteDatabase(path), gap_s=GAP_S, cipher=cipher)
    store.migrate()
    return store


def _per_device_path(store: ClusteringStore) -> ClusteringStore:
    """The store as before ingest29: every household written by the per-device path."""
    store._prepare_new_households = lambda by_device: {}
    return store


def _cipher(ring: KeyRing) -> FieldCipher:
    return FieldCipher(ring_fetcher(ring, []))


def test_new_households_store_what_the_per_device_path_stores(tmp_path):
    ring = KeyRing([generate_kek("k1")], "k1")
    rng = random.Random(29)
    known = ["known-a", "known-b"]
    fresh = [f"new-{i}" for i in range(6)]
    first = _batch(random.Random(1), known)
    batch = _batch(rng, known + fresh)
    stores = [_store(tmp_path / "prepared.db", _cipher(ring)),
              _per_device_path(_store(tmp_path / "per-device.db", _cipher(ring)))]
    for store in stores:
        store.ingest(first)
    prepared, per_device = (store.ingest(batch) for store in stores)
    assert prepared == per_device
    assert prepared.duplicates > 0 and prepared.accepted > 0
    for account in known + fresh:
        assert_same_sessions(stores[0], stores[1], account)
        views = [s.household(account) for s in stores]
        assert [(d.device_id, d.device_type, d.last_ts) for d in views[0].devices] == \
               [(d.device_id, d.device_type, d.last_ts) for d in views[1].devices]
    with stores[0].db.transaction(readonly=True) as a, stores[1].db.transaction(readonly=True) as b:
        sql = "SELECT account_id, event_id, device_id, ts FROM events ORDER BY account_id, event_id"
        assert a.query(sql) == b.query(sql)
    # Again: every event a duplicate (or, its device's watermark moved past it, late): nothing stored.
    again = stores[0].ingest(batch)
    assert again.accepted == 0 and again.duplicates + again.rejected_late == len(batch)


class _ProbingCipher(FieldCipher):
    """A real cipher that, each time it seals a field, asks whether another connection
    could take the database's write lock at that moment (SQLite, no waiting)."""

    def __init__(self, ring: KeyRing, path) -> None:
        super().__init__(ring_fetcher(ring, []))
        self.path, self.writable = path, []

    def probe(self) -> None:
        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            self.writable.append(True)
        except sqlite3.OperationalError:
            self.writable.append(False)
        finally:
            other.close()

    def encrypt(self, account_id, field, plaintext):
        self.probe()
        return super().encrypt(account_id, field, plaintext)

    def sealer(self, account_id):
        inner, cipher = super().sealer(account_id), self

        class Probing(HouseholdSealer):
            def encrypt(self, field, plaintext):
                cipher.probe()
                return super().encrypt(field, plaintext)

        return Probing(inner.account_id, inner.version, inner._cipher)


def test_new_households_are_sealed_while_other_writes_can_go_on(tmp_path):
    """Before ingest29 each new household's fields were sealed inside the write
    transaction: no other connection could write meanwhile (seen failing: every probe
    found the database locked)."""
    path = tmp_path / "clustering.db"
    cipher = _ProbingCipher(KeyRing([generate_kek("k1")], "k1"), path)
    store = _store(path, cipher)
    result = store.ingest(_batch(random.Random(3), [f"new-{i}" for i in range(5)]))
    assert result.accepted == 5 * 12
    assert len(cipher.writable) >= 5 * 12          # every event's and session's sealed fields
    assert all(cipher.writable), f"{cipher.writable.count(False)} of {len(cipher.writable)} seals under the lock"


class _WrittenMeanwhile(ClusteringStore):
    """Between the batch's preparation and its transaction, ``meanwhile`` runs once (another
    request's write, an erasure, a re-key of one of its households)."""

    meanwhile = None

    def _prepare_new_households(self, by_device):
        prepared = super()._prepare_new_households(by_device)
        if self.meanwhile is not None:
            self.meanwhile, run = None, self.meanwhile
            run()
        return prepared


def test_a_household_another_write_reached_meanwhile_takes_the_per_device_path(tmp_path):
    """Without the check inside the transaction the prepared rows of "new-1" would be
    written over what the other write stored (its repeated event inserted twice: the batch
    fails, or its sessions computed without the other write's event)."""
    ring = KeyRing([generate_kek("k1")], "k1")
    households = [f"new-{i}" for i in range(3)]
    batch = _batch(random.Random(5), households)
    other = [e for e in batch if e.account_id == "new-1"][:4] + [
        random_event(random.Random(6), "new-1", 50, T0 - 600.0, device="tv-1", event_id="other-1")]

    store = _store(tmp_path / "a.db", _cipher(ring), cls=_WrittenMeanwhile)
    store.meanwhile = lambda: ClusteringStore(store.db, gap_s=GAP_S, cipher=store.cipher).ingest(other)
    result = store.ingest(batch)

    reference = _per_device_path(_store(tmp_path / "b.db", _cipher(ring)))
    reference.ingest(other)
    assert result == reference.ingest(batch)
    for account in households:
        assert_same_sessions(store, reference, account)


def test_rows_sealed_under_a_key_a_rekey_replaced_meanwhile_are_sealed_again(tmp_path):
    ring = KeyRing([generate_kek("k1")], "k1")
    store = _store(tmp_path / "a.db", _cipher(ring), cls=_WrittenMeanwhile)

    def rekey() -> None:
        ring.create_dek("new-0", NOW)                  # version 2, as a rotation makes it
        with store.db.transaction() as tx:
            note_household_rekeyed(tx, "new-0")

    store.meanwhile = rekey
    store.ingest(_batch(random.Random(7), ["new-0", "new-1"]))
    with store.db.transaction(readonly=True) as tx:
        blobs = {account: {store.cipher.blob_version(bytes(r[0])) for r in tx.query(
            "SELECT features FROM sessions WHERE account_id = ?", (account,))} for account in ("new-0", "new-1")}
    assert blobs == {"new-0": {2}, "new-1": {1}}
    assert store.household("new-0").sessions


def test_a_batch_of_new_households_past_its_callers_deadline_writes_nothing(database):
    store = ClusteringStore(database, gap_s=GAP_S)
    store.migrate()
    token = set_serving_deadline(-1.0)
    try:
        with pytest.raises(DeadlineExceeded):
            store.ingest(_batch(random.Random(8), ["new-0", "new-1"]))
    finally:
        reset_serving_deadline(token)
    with database.transaction(readonly=True) as tx:
        for table in ("events", "devices", "sessions"):
            assert tx.query(f"SELECT COUNT(*) FROM {table}")[0][0] == 0, table
    batch = _batch(random.Random(8), ["new-0", "new-1"])
    result = store.ingest(batch)                        # outside a call: no deadline
    assert (result.accepted, result.duplicates) == (2 * 12, 2 * 2)
    with database.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM events")[0][0] == 2 * 12
        assert tx.query("SELECT COUNT(*) FROM devices")[0][0] == 2 * 2


class _SlowSessionWrite(ClusteringStore):
    """The caller's deadline passes while the batch's sessions are written."""

    def _insert_sessions(self, tx, rows):
        super()._insert_sessions(tx, rows)
        set_serving_deadline(-1.0)      # restored by the test's reset_serving_deadline


def test_a_batch_whose_callers_deadline_passed_during_its_writes_is_rolled_back(tmp_path):
    """Seen failing without the check before the commit: the batch was stored, its caller
    answered DEADLINE_EXCEEDED (a 504 through the gateway)."""
    store = _store(tmp_path / "a.db", cls=_SlowSessionWrite)
    token = set_serving_deadline(600.0)
    try:
        with pytest.raises(DeadlineExceeded):
            store.ingest(_batch(random.Random(9), ["new-0", "new-1"]))
    finally:
        reset_serving_deadline(token)
    with store.db.transaction(readonly=True) as tx:
        for table in ("events", "devices", "sessions"):
            assert tx.query(f"SELECT COUNT(*) FROM {table}")[0][0] == 0, table


def test_a_batch_of_households_this_process_has_stored_does_not_look_them_up_as_new(tmp_path):
    """review29: the newness lookup (a read transaction, one query a household table) ran on
    every ingest, also when every household was known — +9 % / +18 % client CPU a batch on
    SQLite / PostgreSQL. A household this store has written is not looked up again; one it
    erased is, and a household it never saw still takes the prepared path."""
    store = _store(tmp_path / "known.db", _cipher(KeyRing([generate_kek("k1")], "k1")))
    looked_up: list[list[str]] = []
    lookup = store._new_households
    store._new_households = lambda tx, accounts: looked_up.append(list(accounts)) or lookup(tx, accounts)
    rng = random.Random(7)
    store.ingest(_batch(rng, ["a", "b"]))
    assert looked_up == [["a", "b"], ["a", "b"]]   # prepared, then still new in the transaction
    looked_up.clear()
    later = [random_event(rng, account, 200 + i, T0 + 86400 + i, device="tv-1", event_id=f"later-{i}")
             for i, account in enumerate(("a", "b"))]
    result = store.ingest(later)
    assert result.accepted == 2 and looked_up == []
    store.ingest(_batch(rng, ["c"]) + [random_event(rng, "a", 300, T0 + 90000, device="tv-1", event_id="x")])
    assert looked_up == [["c"], ["c"]]
    # An erased household's id is not kept as known (nor anywhere in the store's memory).
    store.erase(ErasureScope(kind=ScopeKind.HOUSEHOLD, account_id="b"))
    assert "b" not in store._known_households and "a" in store._known_households
