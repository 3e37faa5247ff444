"""FieldCipher: AES-256-GCM fields under per-household keys fetched from the privacy
service, readable by the privacy key ring (same format), bound to household and field."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition
from services.common.field_crypto import FieldCipher, FieldDecryptionError, encrypted_length
from services.privacy.keys.domain import KeyDestroyedError, KeyRing, generate_kek
from tests.helpers.keys import NOW, ring_batch_fetcher, ring_fetcher


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ring() -> KeyRing:
    kek = generate_kek("k1")
    return KeyRing([kek], "k1")


def test_round_trip_and_length(ring):
    cipher = FieldCipher(ring_fetcher(ring, []))
    blob = cipher.encrypt("acct-1", "title_id", b"title-42")
    assert len(blob) == encrypted_length(len(b"title-42"))
    assert b"title-42" not in blob
    assert cipher.decrypt("acct-1", "title_id", blob) == b"title-42"


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200), account=st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True))
def test_text_round_trip_any_unicode(text, account):
    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k1")], "k1"), []))
    stored = cipher.encrypt_text(account, "country", text)
    assert stored.startswith("enc1:")
    assert cipher.decrypt_text(account, "country", stored) == text


def test_privacy_key_ring_reads_store_blobs_and_vice_versa(ring):
    """The store's format is the key ring's: the privacy service can decrypt a store's
    field (what the crypto-shredding test relies on) and the other way round."""
    cipher = FieldCipher(ring_fetcher(ring, []))
    blob = cipher.encrypt("acct-1", "genres", b'["drama"]')
    assert ring.decrypt_field("acct-1", "genres", blob) == b'["drama"]'
    back = ring.encrypt_field("acct-1", "genres", b"x")
    assert cipher.decrypt("acct-1", "genres", back) == b"x"


@pytest.mark.parametrize("account,field", [("acct-2", "title_id"), ("acct-1", "series_id")])
def test_blob_moved_to_another_household_or_field_fails(ring, account, field):
    cipher = FieldCipher(ring_fetcher(ring, []))
    cipher.encrypt("acct-2", "x", b"make acct-2 a key")
    blob = cipher.encrypt("acct-1", "title_id", b"secret")
    with pytest.raises(FieldDecryptionError) as err:
        cipher.decrypt(account, field, blob)
    assert err.value.field == field


def test_tampered_blob_fails(ring):
    cipher = FieldCipher(ring_fetcher(ring, []))
    blob = bytearray(cipher.encrypt("acct-1", "label", b"p1"))
    blob[-1] ^= 1
    with pytest.raises(FieldDecryptionError):
        cipher.decrypt("acct-1", "label", bytes(blob))


def test_keys_cached_for_at_most_ttl_and_forgotten_on_erase(ring):
    calls: list = []
    clock = Clock()
    cipher = FieldCipher(ring_fetcher(ring, calls), ttl_s=60.0, clock=clock)
    blob = cipher.encrypt("acct-1", "f", b"a")
    cipher.encrypt("acct-1", "f", b"b")
    cipher.decrypt("acct-1", "f", blob)
    assert len(calls) == 1  # one fetch serves encrypt (newest) and decrypt (its version)
    clock.t = 60.5
    cipher.encrypt("acct-1", "f", b"c")
    assert len(calls) == 2  # expired after ttl
    cipher.forget("acct-1")
    cipher.decrypt("acct-1", "f", blob)
    assert len(calls) == 3


def test_shredded_key_makes_old_blobs_unreadable(ring):
    cipher = FieldCipher(ring_fetcher(ring, []))
    blob = cipher.encrypt("acct-1", "title_id", b"secret")
    ring.destroy_dek("acct-1", NOW)
    cipher.forget("acct-1")
    with pytest.raises(FailedPrecondition):
        cipher.decrypt("acct-1", "title_id", blob)
    with pytest.raises(FailedPrecondition):
        cipher.encrypt("acct-1", "title_id", b"new data after erasure")


def test_plaintext_written_before_encryption_is_passed_through(ring):
    cipher = FieldCipher(ring_fetcher(ring, []))
    assert cipher.decrypt_text("a", "f", "plain") == "plain"
    assert cipher.decrypt_text("a", "f", None) is None
    assert cipher.encrypt_text("a", "f", None) is None
    vector = os.urandom(35 * 4)
    assert cipher.decrypt_vector("a", "features", vector) == vector
    sealed = cipher.encrypt("a", "features", vector)
    assert len(sealed) % 4 != 0
    assert cipher.decrypt_vector("a", "features", sealed) == vector


def test_bad_arguments_are_value_errors(ring):
    with pytest.raises(ValueError, match="ttl_s"):
        FieldCipher(ring_fetcher(ring, []), ttl_s=120)
    cipher = FieldCipher(ring_fetcher(ring, []))
    with pytest.raises(ValueError, match="title_id"):
        cipher.encrypt("a", "title_id", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(FieldDecryptionError):
        cipher.decrypt("a", "title_id", b"short")


def test_warm_fetches_missing_newest_keys_so_their_use_fetches_none(ring):
    calls: list = []
    cipher = FieldCipher(ring_fetcher(ring, calls))
    cipher.encrypt("acct-cached", "f", b"a")
    cipher.warm(["acct-1", "acct-2", "acct-cached", "acct-1"])
    assert sorted(calls) == [("acct-1", 0), ("acct-2", 0), ("acct-cached", 0)]
    blob = cipher.encrypt("acct-1", "f", b"b")
    cipher.encrypt("acct-2", "f", b"c")
    assert cipher.decrypt("acct-1", "f", blob) == b"b"
    assert len(calls) == 3


def test_warm_asks_the_batch_call_in_chunks_and_no_household_alone(ring, monkeypatch):
    """Session 28: ``warm`` asks privacy's GetDataKeys for ``WARM_BATCH`` households a
    call (one transaction of key creations each) rather than GetDataKey one household a
    call; an erased household's missing answer is left to the write, which refuses it."""
    import services.common.field_crypto as fc

    monkeypatch.setattr(fc, "WARM_BATCH", 3)
    single: list = []
    batches: list = []
    cipher = FieldCipher(ring_fetcher(ring, single), fetch_keys=ring_batch_fetcher(ring, batches))
    cipher.encrypt("acct-gone", "f", b"a")
    ring.destroy_dek("acct-gone", NOW)
    cipher.forget("acct-gone")
    single.clear()
    accounts = [f"acct-{i}" for i in range(7)] + ["acct-gone"]
    cipher.warm(accounts)
    assert batches == [accounts[:3], accounts[3:6], accounts[6:]]
    assert single == []
    for account in accounts[:-1]:
        cipher.encrypt(account, "f", b"x")
    assert single == []                        # every live household's key was warmed
    with pytest.raises(FailedPrecondition):
        cipher.encrypt("acct-gone", "f", b"after erasure")


def test_warm_falls_back_to_one_call_a_household_from_a_privacy_without_the_batch_call(ring):
    """A privacy service of a release before session 28 answers GetDataKeys UNIMPLEMENTED
    (the remote fetcher's None): the households are fetched one a call, as before."""
    single: list = []
    asked: list = []
    cipher = FieldCipher(ring_fetcher(ring, single), fetch_keys=lambda accounts: asked.append(accounts))
    cipher.warm(["acct-1", "acct-2", "acct-3"])
    assert asked == [["acct-1", "acct-2", "acct-3"]]
    assert sorted(single) == [("acct-1", 0), ("acct-2", 0), ("acct-3", 0)]
    cipher.encrypt("acct-2", "f", b"x")
    assert len(single) == 3


def test_a_key_warmed_while_another_write_drops_cached_keys_is_not_kept(ring):
    """A transaction noting an erasure (or a re-key) while ``warm`` fetches: what warm
    fetched may predate it, so none of it is cached and the use fetches again."""
    calls: list = []
    fetch = ring_fetcher(ring, calls)
    cipher = FieldCipher(lambda account, version: (cipher.sync_erasures(len(calls) + 1), fetch(account, version))[1])
    cipher.sync_erasures(0)
    cipher.warm(["acct-1", "acct-2"])
    assert len(calls) == 2
    cipher.encrypt("acct-1", "f", b"a")
    assert len(calls) == 3


def test_warm_leaves_an_erased_household_to_the_write(ring):
    cipher = FieldCipher(ring_fetcher(ring, []))
    cipher.encrypt("acct-1", "f", b"a")
    ring.destroy_dek("acct-1", NOW)
    cipher.forget("acct-1")
    cipher.warm(["acct-1", "acct-2"])
    with pytest.raises(FailedPrecondition):
        cipher.encrypt("acct-1", "f", b"after erasure")
    cipher.encrypt("acct-2", "f", b"still fine")
