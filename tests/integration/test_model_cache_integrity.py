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
                       b"\x00"):                                                              # no header
            raw.set(key, forged)
            model = store.get_model("acc-c")
            assert (model.version, model.variant, model.blob) == (version, "gmm", b"the-household-model")
            assert raw.get(key) != forged   # dropped (the database's copy is cached again)
        raw.close()
