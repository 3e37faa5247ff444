"""The Redis copy of a household's model is bytes any Redis client may write — the gateway
holds the same Redis URL as the services (docs/security.md, "Attacker's review (session 28,
attack28)", item 4). Clustering takes a cached model only when it opens as one it sealed;
anything else is dropped and the database read instead. Real redis-server."""

from __future__ import annotations

import os
import struct
import time

import redis

from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher
from services.common.storage.cache import RedisCache
from tests.helpers.servers import running_redis
from tests.integration.test_storage import ev

T0 = time.time() - 7 * 86400
DATA_KEY = os.urandom(32)


def test_a_cached_model_that_does_not_open_or_is_not_sealed_is_dropped_and_read_from_the_database(
        database, tmp_path):
    """Until attack28 bytes that do not open made every read of the household fail until
    the entry's TTL (an hour: 502 through the gateway), and a plaintext model ("PK", the
    form of a model stored before encryption) was taken as the household's model although
    the store seals every model: a Redis client could make clustering serve persons of its
    own making."""
    with running_redis(tmp_path) as server:
        store = ClusteringStore(database, RedisCache(server.url, "clustering"), gap_s=1800,
                                cipher=FieldCipher(lambda account, version: (1, DATA_KEY)))
        store.migrate()
        store.ingest([ev(0, T0, account="acc-c")])
        version = store.save_model("acc-c", 0, "gmm", b"the-household-model")
        raw = redis.Redis.from_url(server.url)
        key = "hearth:clustering:model:acc-c"
        assert raw.get(key) is not None   # cached by the save
        for forged in (struct.pack("<qH", version + 1, 3) + b"gmm" + os.urandom(200),          # does not open
                       struct.pack("<qH", version + 1, 3) + b"gmm" + b"PK\x03\x04made-up persons",  # plaintext
                       # sealed-looking, naming a key version the key service does not give
                       struct.pack("<qH", version + 1, 3) + b"gmm" + b"\x01" + (2**31 - 1).to_bytes(4, "big")
                       + os.urandom(200),
                       b"\x00"):                                                              # no header
            raw.set(key, forged)
            model = store.get_model("acc-c")
            assert (model.version, model.variant, model.blob) == (version, "gmm", b"the-household-model")
            assert raw.get(key) != forged   # dropped (the database's copy is cached again)
        raw.close()


def _replicas(database, server, n: int = 2) -> list[ClusteringStore]:
    cipher = FieldCipher(lambda account, version: (1, DATA_KEY))
    stores = [ClusteringStore(database, RedisCache(server.url, "clustering"), gap_s=1800, cipher=cipher)
              for _ in range(n)]
    stores[0].migrate()
    return stores


def test_a_genuine_entry_written_back_after_a_newer_version_is_not_served(database, tmp_path):
    """The replay attack28 left (docs/security.md): a Redis holder copies the household's
    genuine cached model, an erasure's refit stores version 2 (the erased device's person
    gone), and the copy is written back — as it was, or under a higher version in its clear
    header. Before session 29 the version in clear was trusted and the copy opened: the
    erased person was served again (version 3 here, or version 1 to a process that holds
    nothing). Now the version is sealed with the model and the database says which is
    current: every reader — the one that saved version 2 and a fresh replica — answers
    version 2."""
    with running_redis(tmp_path) as server:
        saver, fresh = _replicas(database, server)
        saver.ingest([ev(0, T0, account="acc-r")])
        assert saver.save_model("acc-r", 0, "gmm", b"with the tablet's person") == 1
        raw = redis.Redis.from_url(server.url)
        key = "hearth:clustering:model:acc-r"
        copied = raw.get(key)
        assert saver.save_model("acc-r", 1, "gmm", b"after the erasure") == 2   # the unlearning refit
        version, vlen = struct.unpack_from("<qH", copied)
        for replayed in (copied, struct.pack("<qH", 3, vlen) + copied[10:]):
            for reader, held in ((saver, 2), (fresh, 0)):
                raw.set(key, replayed)
                model = reader.get_model("acc-r", decoded_version=held)
                assert model.version == 2, (replayed[:10], held)
                assert model.blob in (b"", b"after the erasure")
                assert raw.get(key) != replayed   # dropped (and the stored version cached again)
        assert fresh.get_model("acc-r").blob == b"after the erasure"
        raw.close()


def test_a_replica_holding_the_replayed_version_asks_the_database_within_the_confirm_window(
        database, tmp_path, monkeypatch):
    """A genuine entry of the very version a replica holds, written back after another
    replica stored a newer one, says "still current" — nothing in Redis can tell it is
    stale. The replica serves its held version only while the database said so within
    MODEL_CONFIRM_S; past it, one read of the database, and the stored version."""

    with running_redis(tmp_path) as server:
        holder, other = _replicas(database, server)
        holder.ingest([ev(0, T0, account="acc-f")])
        holder.save_model("acc-f", 0, "gmm", b"with the tablet's person")
        raw = redis.Redis.from_url(server.url)
        key = "hearth:clustering:model:acc-f"
        copied = raw.get(key)
        assert holder.get_model("acc-f", decoded_version=1).version == 1
        other.save_model("acc-f", 1, "gmm", b"after the erasure")
        raw.set(key, copied)
        assert holder.get_model("acc-f", decoded_version=1).version == 1   # within the window: the bound
        monkeypatch.setattr(holder._confirmed_versions, "max_age_s", 0.0)   # as MODEL_CONFIRM_S later
        model = holder.get_model("acc-f", decoded_version=1)
        assert (model.version, model.blob) == (2, b"after the erasure")
        raw.close()


def test_an_entry_of_the_format_before_session_29_is_a_miss_and_cached_again_in_the_new_one(database, tmp_path):
    """A rolling upgrade: a replica of the release before caches the model as it is stored
    (sealed as "model", the version in clear only). This release takes it for a miss — the
    database read, no error — and caches its own entry, which opens only with its version."""
    with running_redis(tmp_path) as server:
        (store,) = _replicas(database, server, 1)
        store.ingest([ev(0, T0, account="acc-o")])
        store.save_model("acc-o", 0, "gmm", b"the-household-model")
        raw = redis.Redis.from_url(server.url)
        key = "hearth:clustering:model:acc-o"
        old_format = struct.pack("<qH", 1, 3) + b"gmm" + store.cipher.encrypt("acc-o", "model", b"the-household-model")
        raw.set(key, old_format)
        model = store.get_model("acc-o")
        assert (model.version, model.variant, model.blob) == (1, "gmm", b"the-household-model")
        new_format = raw.get(key)
        assert new_format is not None and new_format != old_format
        assert store.cipher.decrypt("acc-o", '["model-cache",1,"gmm"]', new_format[13:]) == b"the-household-model"
        raw.close()


def test_the_confirmed_model_version_of_an_erased_household_is_not_kept(database, tmp_path):
    """The version the database confirmed is kept per household (get_model's window); a
    household erasure drops it with the household's data key — no account id of an erased
    household stays in the store's memory for it (this test failed: the entry stayed)."""
    from services.common.erasure import ErasureScope

    with running_redis(tmp_path) as server:
        (store,) = _replicas(database, server, 1)
        store.ingest([ev(0, T0, account="acc-e")])
        store.save_model("acc-e", 0, "gmm", b"model")
        assert store.get_model("acc-e", decoded_version=1).version == 1
        assert "acc-e" in store._confirmed_versions
        store.erase(ErasureScope("acc-e", "household"))
        assert "acc-e" not in store._confirmed_versions
        assert store.get_model("acc-e") is None


def test_a_held_model_is_not_opened_while_redis_is_down(database, tmp_path):
    """With Redis down every read goes to the database; for the version the caller holds
    the model is not opened (as before session 29): the cache's entry is sealed anew from
    the plaintext when it is filled again, and there is nothing to fill while Redis is
    down. This test failed: each such read decrypted the model (and sealed it again)."""
    with running_redis(tmp_path) as server:
        (store,) = _replicas(database, server, 1)
        store.ingest([ev(0, T0, account="acc-d")])
        store.save_model("acc-d", 0, "gmm", b"model")
        opened = []
        decrypt = store.cipher.decrypt
        store.cipher.decrypt = lambda account, field, blob: (opened.append(field), decrypt(account, field, blob))[1]
        server.stop()
        for _ in range(3):
            model = store.get_model("acc-d", decoded_version=1)
            assert (model.version, model.blob) == (1, b"")
        assert store.cache.health() and opened == [], opened
        assert store.get_model("acc-d").blob == b"model"   # a caller holding nothing gets it


def test_a_message_of_many_households_confirms_their_model_versions_in_one_read(database):
    """AssignSessions answers a message of many households; each household's held model
    version is confirmed with the database once a minute (get_model). review29 measured a
    household read less often than that paying a read transaction on every request — one
    per household of a message. Now the message's households are confirmed in one read
    (ClusteringStore.confirm_model_versions): this test failed (a transaction per
    household)."""
    import numpy as np

    from services.clustering.app import ClusteringApp
    from services.clustering.modeling import ModelKeeper
    from services.common.storage.cache import MemoryCache
    from tests.helpers.households import household_events, week_start_days_ago

    cache = MemoryCache("clustering")   # the replicas' shared cache (Redis in production)
    fitter, reader = (ClusteringStore(database, cache, gap_s=1800) for _ in range(2))
    fitter.migrate()
    accounts = [f"acc-m{i}" for i in range(4)]
    keeper = ModelKeeper(fitter, lambda _a: "gmm")
    for i, account in enumerate(accounts):
        events, _ = household_events(account, ("kid", "parent"), days=20, start_ts=week_start_days_ago(40), seed=i)
        fitter.ingest(events)
        keeper.refresh(account)
    app = ClusteringApp(reader, keeper=ModelKeeper(reader, lambda _a: "gmm"), background=False)
    X = np.vstack([fitter.household(a, 1).sessions[0].features for a in accounts])
    app.answer_many(accounts, X)        # the models decoded and held, their versions confirmed
    reader._confirmed_versions.clear()  # as a minute later
    transactions = []
    begin = reader.db.transaction
    reader.db.transaction = lambda *a, **kw: (transactions.append(kw), begin(*a, **kw))[1]
    answered = app.answer_many(accounts, X)
    assert sorted(int(r[0]) for r, _ in answered) == [0, 1, 2, 3]
    assert len(transactions) == 1, transactions
