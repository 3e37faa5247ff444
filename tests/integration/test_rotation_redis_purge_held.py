"""A data key rotation held open by an incomplete purge of Redis's files stays held until a
purge of them finishes — on its retry too (the completion rule, docs/operations.md "Held
open by an incomplete purge"). A real redis-server that persists and refuses CONFIG (as
managed Redis services do): whether its files still hold the old ciphertexts cannot be
confirmed, so no rotation through it may destroy the old version."""

from __future__ import annotations

import pytest

from services.common.storage.cache import RedisCache
from services.privacy.keys.rotation import RotationHeld
from tests.helpers.servers import running_redis
from tests.integration.test_data_key_rotation import Mesh, databases, purgeable_postgres  # noqa: F401

PERSISTING_WITHOUT_CONFIG = {"appendonly": "yes", "save": "3600 1", "rename-command": ("CONFIG", "")}


def test_a_rotation_held_by_redis_stays_held_on_its_retry(databases, tmp_path):
    """review27: the Rekey that re-seals drops the cached model and reports the rewrite of
    Redis's files incomplete (held, right); the retry's Rekey found nothing to re-seal and
    no model to drop, so it ran no rewrite and reported none, and the rotation destroyed
    the old version over the unconfirmed purge. Now the store remembers the rewrite it owes
    and runs it on every Rekey until one finishes."""
    with running_redis(tmp_path, **PERSISTING_WITHOUT_CONFIG) as server:
        mesh = Mesh(databases)
        mesh.clustering.cache = RedisCache(server.url, "clustering")
        mesh.fill("acc-r", n=2)
        assert mesh.clustering.get_model("acc-r") is not None   # its model cached in Redis
        rotation = mesh.rotation()
        for run in ("the first run", "its retry (the sweep, or the operator again)"):
            with pytest.raises(RotationHeld, match="redis"):
                rotation.rotate("acc-r")
            live = {r.dek_version for r in mesh.key_store.load("acc-r") if not r.destroyed and r.dek_version}
            assert live == {1, 2}, (run, live)   # version 1 kept: it may still open Redis's files
        assert mesh.versions("acc-r") == {2}     # every value re-sealed all the same
