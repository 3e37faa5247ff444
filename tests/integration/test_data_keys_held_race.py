"""GetDataKeys holds a household's key records only while fresh (ac14761, session 29):
each refresh drops the households read more than REFRESH_S ago. A call that refreshes
twice — its creations lost to another replica's, read again — must not drop a household
it read fresh the first time and is about to answer (review29: it answered UNAVAILABLE
for a household whose key is stored, because the second refresh came a moment past
REFRESH_S after that household's read)."""

from __future__ import annotations

from services.privacy.keys.app import REFRESH_S, KeyService
from tests.integration.test_deletion_keys import K1, Clock, store  # noqa: F401 - the fixture


def test_a_household_read_fresh_is_answered_when_the_call_reads_again_past_refresh_s(store):
    clock = Clock()
    keys = KeyService(store, [K1], "k1", monotonic=clock)
    other = KeyService(store, [K1], "k1")                    # another privacy replica
    known = keys.data_key("acct-known")                     # read at t
    clock.t += REFRESH_S - 0.1                              # still fresh at the next call
    insert = store.insert_new_many

    def another_replica_first(created):
        created = list(created)
        store.insert_new_many = insert                      # once (the other replica's write uses it too)
        other.data_key("acct-raced")                        # its key is stored first: ours is lost
        clock.t += 0.2                                      # the write took a moment
        return insert(created)

    store.insert_new_many = another_replica_first
    try:
        answers = keys.data_keys(["acct-known", "acct-raced"])
    finally:
        store.insert_new_many = insert
    assert answers["acct-known"] == known
    assert answers["acct-raced"] == other.data_key("acct-raced")
