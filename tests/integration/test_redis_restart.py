"""A Redis that comes back by itself with older contents (docs/operations.md, "Outages";
docs/privacy.md §11): a redis-server with persistence that crashes and reloads its last
snapshot holds the keys as they were at that snapshot — a model fitted before an
erasure, a key an erasure deleted. redis-py reconnects without an error the service
would see, so the outage handling (clear the namespace after a failed call) never runs.
The cache notices the new server (its ``run_id``) on the first new connection and clears
its namespace before any command runs there. Real redis-server, killed and restarted on
the same port and snapshot directory."""

from __future__ import annotations

import time

import redis

from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.storage.cache import RedisCache
from tests.helpers.servers import running_redis
from tests.integration.test_storage import ev

T0 = time.time() - 7 * 86400


def test_a_redis_restarted_from_an_older_snapshot_serves_neither_an_unlearned_model_nor_an_erased_one(
        database, tmp_path):
    with running_redis(tmp_path) as server:
        cache = RedisCache(server.url, "clustering")
        store = ClusteringStore(database, cache, gap_s=1800)
        store.migrate()
        store.ingest([ev(0, T0, account="acc-p"), ev(0, T0, account="acc-h")])
        v1 = store.save_model("acc-p", 0, "gmm", b"fitted-with-the-erased-person")
        assert store.save_model("acc-h", 0, "gmm", b"of-the-erased-household") == 1
        cache.client.save()   # the periodic snapshot of a Redis that persists (stock redis.conf)
        # After it: a person erasure's unlearning refit replaces one model, a household
        # erasure removes the other (and its cached copy).
        v2 = store.save_model("acc-p", v1, "gmm", b"refitted-without-them")
        store.erase(ErasureScope("acc-h", "household"))
        assert cache.get("model:acc-h") is None

        server.kill()    # a crash; the restart reloads the snapshot
        server.start()
        raw = redis.Redis.from_url(server.url)
        assert raw.get("hearth:clustering:model:acc-h") is not None   # the scenario: both came back
        assert raw.get("hearth:clustering:model:acc-p") is not None

        model = store.get_model("acc-p")
        assert (model.version, model.blob) == (v2, b"refitted-without-them")
        assert store.get_model("acc-h") is None
        assert raw.get("hearth:clustering:model:acc-h") is None   # cleared, not merely bypassed
        raw.close()


def test_a_reconnection_to_the_same_server_keeps_the_cache(tmp_path):
    """Only another server clears: a dropped connection to the same one (idle timeout,
    network blip) keeps what the namespace holds."""
    with running_redis(tmp_path) as server:
        cache = RedisCache(server.url, f"keep{time.monotonic_ns()}")
        cache.set("k", b"v")
        raw = redis.Redis.from_url(server.url)
        raw.client_kill_filter(_type="normal", skipme=True)   # every connection but this one
        assert cache.get("k") == b"v"
        raw.close()
