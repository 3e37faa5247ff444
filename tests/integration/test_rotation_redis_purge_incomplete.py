"""A data key rotation through a Redis whose files cannot be rewritten completes and names
the incomplete purge (the completion rule, docs/privacy.md §10). A real redis-server that
persists and refuses CONFIG (as managed Redis services do): whether its files still hold
the old ciphertexts cannot be confirmed, so the rotation reports clustering's Redis purge
as not finished — and destroys the old version, which leaves whatever those files keep
under no key Hearth holds. Clustering keeps owing the rewrite (review27, 4036dbc): every
later Rekey rewrites them again, and reports it, until one finishes."""

from __future__ import annotations

from services.common.storage.cache import RedisCache
from tests.helpers.servers import running_redis
from tests.integration.test_data_key_rotation import Mesh, databases, purgeable_postgres  # noqa: F401

PERSISTING_WITHOUT_CONFIG = {"appendonly": "yes", "save": "3600 1", "rename-command": ("CONFIG", "")}


def test_a_rotation_through_a_redis_that_cannot_rewrite_completes_and_names_it(databases, tmp_path):
    """The Rekey that re-seals drops the cached model and reports the rewrite of Redis's
    files incomplete: the rotation completes (version 1 destroyed) and its outcome names
    clustering's Redis purge. Session 27's first rule held it open (RotationHeld, version 1
    kept): this test failed against it. A later Rekey that finds nothing to re-seal and no
    model to drop still rewrites and reports the purge it owes (it reported none before
    4036dbc)."""
    with running_redis(tmp_path, **PERSISTING_WITHOUT_CONFIG) as server:
        mesh = Mesh(databases)
        mesh.clustering.cache = RedisCache(server.url, "clustering")
        mesh.fill("acc-r", n=2)
        assert mesh.clustering.get_model("acc-r") is not None   # its model cached in Redis
        done = mesh.rotation().rotate("acc-r")
        assert (done.dek_version, done.destroyed) == (2, [1])
        assert [(p["service"], p["store"]) for p in done.incomplete_purges] == [("clustering", "redis")], \
            done.incomplete_purges
        live = {r.dek_version for r in mesh.key_store.load("acc-r") if not r.destroyed and r.dek_version}
        assert live == {2}
        assert mesh.versions("acc-r") == {2}     # every value re-sealed
        changed, purges = mesh.clustering.rekey("acc-r", 2)   # nothing to re-seal, no cached model
        assert changed == 0 and [p["complete"] for p in purges if p["store"] == "redis"] == [False], purges
