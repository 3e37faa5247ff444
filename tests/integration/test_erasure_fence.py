"""The erasure fence (session 30, docs/security.md "Other replicas after an erasure"): a
replica holding a household's decoded model and a confirmed version of it served that
version for up to MODEL_CONFIRM_S (60 s) after another replica's erasure replaced or removed
it, whenever Redis held a genuine entry of that version (written back by a holder of the
Redis URL, or re-cached by a slow replica). Every Erase now moves a counter in the database;
a replica watching it forgets its confirmed versions when it moves, and trusts none once its
last read of it is older than the fence. The real processes' test is
tests/e2e/test_deletion_e2e.py::test_another_replica_does_not_answer_with_the_erased_model_once_the_erasure_completed.
Real redis-server, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import time

import redis

from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.field_crypto import FieldCipher
from services.common.storage.cache import RedisCache
from tests.helpers.servers import running_redis
from tests.integration.test_storage import ev

T0 = time.time() - 7 * 86400
DATA_KEY = os.urandom(32)


def _replicas(database, server) -> tuple[ClusteringStore, ClusteringStore]:
    cipher = FieldCipher(lambda account, version: (1, DATA_KEY))
    holder, other = (ClusteringStore(database, RedisCache(server.url, "clustering"), gap_s=1800, cipher=cipher)
                     for _ in range(2))
    holder.migrate()
    return holder, other


def _replaced_with_v1_written_back(server, holder, other, account: str) -> None:
    """The holder confirmed version 1; the other replica stores 2 (an erasure's refit), and
    the genuine entry of 1 is written back to Redis."""
    holder.ingest([ev(0, T0, account=account)])
    holder.save_model(account, 0, "gmm", b"with the erased person")
    raw = redis.Redis.from_url(server.url)
    key = f"hearth:clustering:model:{account}"
    copied = raw.get(key)
    assert holder.get_model(account, decoded_version=1).version == 1
    other.save_model(account, 1, "gmm", b"after the erasure")
    raw.set(key, copied)
    raw.close()


def test_a_watching_replica_asks_the_database_once_the_fence_moved(database, tmp_path):
    with running_redis(tmp_path) as server:
        holder, other = _replicas(database, server)
        assert holder.watch_erasure_fence(60.0)            # the first read: nothing confirmed before it trusted
        _replaced_with_v1_written_back(server, holder, other, "acc-fence")
        assert holder.get_model("acc-fence", decoded_version=1).version == 1   # no erasure said so yet
        other.move_erasure_fence()
        assert holder.get_model("acc-fence", decoded_version=1).version == 1   # not read yet: within the fence's wait
        assert holder.watch_erasure_fence(60.0)
        model = holder.get_model("acc-fence", decoded_version=1)
        assert (model.version, model.blob) == (2, b"after the erasure")
        assert not holder.watch_erasure_fence(60.0)        # unmoved: the confirmation just made is kept
        assert holder._confirmed("acc-fence", 2)


def test_a_replica_whose_last_read_of_the_fence_is_older_than_the_fence_trusts_no_held_version(database, tmp_path):
    """The database unreachable or the watching thread starved: the erasing replica's wait
    is over before this one read the fence, so it must not serve from its notes."""
    with running_redis(tmp_path) as server:
        holder, other = _replicas(database, server)
        holder.watch_erasure_fence(0.2)
        _replaced_with_v1_written_back(server, holder, other, "acc-lapse")
        time.sleep(0.3)
        assert holder.get_model("acc-lapse", decoded_version=1).version == 2


def test_a_read_begun_before_the_fence_moved_confirms_nothing(database, tmp_path):
    """A read of the database that began before this replica saw the fence move may predate
    the erasure: its version is not noted (the next read asks again)."""
    with running_redis(tmp_path) as server:
        holder, other = _replicas(database, server)
        holder.watch_erasure_fence(60.0)
        generation = holder._fence_generation
        other.move_erasure_fence()
        holder.watch_erasure_fence(60.0)
        holder._note_confirmed("acc-old-read", 1, generation)
        assert not holder._confirmed("acc-old-read", 1)
        holder._note_confirmed("acc-old-read", 1, holder._fence_generation)
        assert holder._confirmed("acc-old-read", 1)


def test_decoded_models_of_a_version_no_longer_stored_are_dropped(database, tmp_path):
    """What a replica decoded stays in its memory until 10,000 other households push it out;
    once the fence moved, the models of an erased household and those replaced since are
    dropped, the current ones kept."""
    with running_redis(tmp_path) as server:
        holder, other = _replicas(database, server)
        for account in ("acc-kept", "acc-replaced", "acc-erased"):
            holder.ingest([ev(0, T0, account=account)])
            holder.save_model(account, 0, "gmm", b"model")
        other.save_model("acc-replaced", 1, "gmm", b"refitted")
        other.erase(ErasureScope("acc-erased", "household"))
        keeper = ModelKeeper(holder, lambda _a: "gmm")
        keeper._decoded.update({a: (1, object()) for a in ("acc-kept", "acc-replaced", "acc-erased")})
        assert keeper.drop_superseded() == 2
        assert set(keeper._decoded) == {"acc-kept"}


def test_every_erase_moves_the_fence_a_repeat_too(database, tmp_path):
    """A repeat of an Erase (its job's retry after a fence that failed) moves it again."""
    from services.clustering.app import ClusteringApp

    store = ClusteringStore(database, gap_s=1800)
    store.migrate()
    app = ClusteringApp(store, background=False, erasure_fence_s=0.1)
    try:
        store.ingest([ev(0, T0, account="acc-twice")])
        fence = _fence(store)
        for moves in (1, 2):
            app.erase(ErasureScope("acc-twice", "device", device_id="tv-1"))
            assert _fence(store) == fence + moves
    finally:
        app.close()


def _fence(store: ClusteringStore) -> int:
    with store.db.transaction(readonly=True) as tx:
        return int(tx.query("SELECT epoch FROM erasure_fence WHERE id = 1")[0][0])
