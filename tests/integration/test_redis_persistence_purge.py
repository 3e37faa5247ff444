"""A Redis that persists forgets what an erasure deleted (docs/privacy.md §11): its last
RDB snapshot and its append-only file keep a deleted key until the next save point or
AOF rewrite (which may be never) and bring it back at a restart. The clustering store's
Erase starts a snapshot and an AOF rewrite after it dropped the household's cached
model, waits for both and lists the step in the receipt's purges. Shown by raw bytes of
every file in the Redis directory of a real redis-server run with ``appendonly yes`` and
a save point, as a stock redis.conf has."""

from __future__ import annotations

import time
from pathlib import Path

from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.storage.cache import RedisCache
from tests.helpers.servers import running_redis
from tests.integration.test_storage import ev

T0 = time.time() - 7 * 86400
PERSISTING = {"appendonly": "yes", "save": "3600 1"}


def files_holding(directory: Path, needle: str) -> list[str]:
    return [str(p.relative_to(directory)) for p in sorted(directory.rglob("*"))
            if p.is_file() and needle.encode() in p.read_bytes()]


def test_an_erasure_leaves_no_byte_of_the_cached_model_in_the_snapshot_nor_the_aof(database, tmp_path):
    with running_redis(tmp_path, **PERSISTING) as server:
        cache = RedisCache(server.url, "clustering")
        store = ClusteringStore(database, cache, gap_s=1800)
        store.migrate()
        gone, kept = "acc-zrgone", "acc-zrkept"
        store.ingest([ev(0, T0, account=gone), ev(0, T0, account=kept)])
        store.save_model(gone, 0, "gmm", b"zrgone-model")
        store.save_model(kept, 0, "gmm", b"zrkept-model")
        cache.client.save()   # a save point passed: the snapshot holds both cached models
        assert files_holding(tmp_path, "zrgone-model") and files_holding(tmp_path, gone)

        outcome = store.erase(ErasureScope(gone, "household"))

        step = next(p for p in outcome.purges if p["store"] == "redis")
        assert step["complete"] and step["action"] == "BGSAVE + BGREWRITEAOF", step
        assert step["where"] == "dump.rdb + appendonlydir", step   # names, not the server's paths
        assert outcome.purges[-1]["store"] != "redis"   # the SQL step stays last (app.erase replaces it)
        assert files_holding(tmp_path, gone) == []
        assert files_holding(tmp_path, "zrgone-model") == []
        assert "dump.rdb" in files_holding(tmp_path, "zrkept-model")     # the scan sees the files
        assert any(f.startswith("appendonlydir") for f in files_holding(tmp_path, kept))
        assert store.get_model(kept).blob == b"zrkept-model"


def test_a_redis_without_persistence_needs_no_step(database, redis_url):
    store = ClusteringStore(database, RedisCache(redis_url, f"np{time.monotonic_ns()}"), gap_s=1800)
    store.migrate()
    store.ingest([ev(0, T0, account="acc-np")])
    outcome = store.erase(ErasureScope("acc-np", "household"))
    assert [p for p in outcome.purges if p["store"] == "redis"] == []


def test_a_redis_that_refuses_config_gives_an_incomplete_step(database, tmp_path):
    """Managed Redis often disables CONFIG: whether it persists is then unknown, and the
    receipt says so rather than claiming the files are clean."""
    with running_redis(tmp_path, **{"rename-command": ("CONFIG", "")}) as server:
        store = ClusteringStore(database, RedisCache(server.url, "clustering"), gap_s=1800)
        store.migrate()
        store.ingest([ev(0, T0, account="acc-rc")])
        outcome = store.erase(ErasureScope("acc-rc", "household"))
        step = next(p for p in outcome.purges if p["store"] == "redis")
        assert not step["complete"] and "unknown" in step["action"], step
