from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.privacy.keys.domain import (
    DecryptionError,
    KeyDestroyedError,
    KeyEncryptionKey,
    KeyNotFoundError,
    KeyRing,
    WrappedDek,
    generate_kek,
    parse_kek_config,
    records_from_dicts,
    records_to_dicts,
)
from tests.unit.privacy.factories import T0

KEK1 = KeyEncryptionKey("kek-1", bytes(range(32)))
KEK2 = KeyEncryptionKey("kek-2", bytes(range(100, 132)))


def ring_with(*accounts: str) -> KeyRing:
    ring = KeyRing([KEK1, KEK2], "kek-1")
    for a in accounts:
        ring.create_dek(a, T0)
    return ring


@given(st.binary(max_size=2000), st.text(min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_round_trip(plaintext, field):
    ring = ring_with("acct-1")
    blob = ring.encrypt_field("acct-1", field, plaintext)
    assert plaintext not in blob or len(plaintext) < 4
    assert ring.decrypt_field("acct-1", field, blob) == plaintext


def test_same_plaintext_encrypts_differently():
    ring = ring_with("acct-1")
    assert ring.encrypt_field("acct-1", "email", b"x") != ring.encrypt_field("acct-1", "email", b"x")


def test_wrong_aad_is_rejected():
    ring = ring_with("acct-1", "acct-2")
    blob = ring.encrypt_field("acct-1", "email", b"ana@example.com")
    with pytest.raises(DecryptionError):
        ring.decrypt_field("acct-1", "phone", blob)  # other field
    with pytest.raises(DecryptionError):
        ring.decrypt_field("acct-2", "email", blob)  # other household (same DEK version)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        ring.decrypt_field("acct-1", "email", bytes(tampered))


def test_shredded_dek_makes_data_unreadable_for_good():
    ring = ring_with("acct-1", "acct-2")
    blob = ring.encrypt_field("acct-1", "email", b"secret")
    other = ring.encrypt_field("acct-2", "email", b"kept")
    tombstones = ring.destroy_dek("acct-1", T0 + timedelta(days=1))
    assert all(t.destroyed and t.wrapped == b"" for t in tombstones)
    with pytest.raises(KeyDestroyedError):
        ring.decrypt_field("acct-1", "email", blob)
    with pytest.raises(KeyDestroyedError):
        ring.encrypt_field("acct-1", "email", b"new")
    with pytest.raises(KeyDestroyedError):
        ring.create_dek("acct-1", T0)
    assert ring.decrypt_field("acct-2", "email", other) == b"kept"
    # a fresh process that loads the persisted records (tombstone included) agrees
    fresh = KeyRing([KEK1, KEK2], "kek-1", ring.records())
    with pytest.raises(KeyDestroyedError):
        fresh.decrypt_field("acct-1", "email", blob)
    assert fresh.decrypt_field("acct-2", "email", other) == b"kept"
    # a stale copy of the live record loaded after the tombstone does not resurrect it
    stale = KeyRing([KEK1, KEK2], "kek-1", [*ring.records("acct-1")])
    assert stale.is_destroyed("acct-1")
    # idempotent
    assert ring.destroy_dek("acct-1", T0 + timedelta(days=2)) == tombstones


def test_kek_rotation_rewraps_without_touching_data():
    ring = ring_with("acct-1", "acct-2")
    blobs = {a: ring.encrypt_field(a, "name", a.encode()) for a in ("acct-1", "acct-2")}
    before = {(r.account_id, r.dek_version): r for r in ring.records()}
    changed = ring.rotate_kek("kek-2")
    assert {r.kek_id for r in changed} == {"kek-2"} and len(changed) == 2
    for r in changed:
        assert r.wrapped != before[(r.account_id, r.dek_version)].wrapped
    assert ring.kek_ids_in_use() == {"kek-2"}
    # a process configured with only the new KEK reads the old ciphertexts
    fresh = KeyRing([KEK2], "kek-2", ring.records())
    for a, blob in blobs.items():
        assert fresh.decrypt_field(a, "name", blob) == a.encode()
    # rotating again to the active key changes nothing
    assert ring.rotate_kek("kek-2") == []


def test_records_without_their_kek_cannot_be_read():
    ring = ring_with("acct-1")
    blob = ring.encrypt_field("acct-1", "f", b"x")
    with pytest.raises(ValueError, match="kek_id"):
        KeyRing([KEK2], "kek-2", ring.records())
    wrong = KeyRing([KeyEncryptionKey("kek-1", bytes(32))], "kek-1", ring.records())
    with pytest.raises(DecryptionError):
        wrong.decrypt_field("acct-1", "f", blob)


def test_wrapped_dek_is_bound_to_its_household():
    ring = ring_with("acct-1", "acct-2")
    r1 = ring.records("acct-1")[0]
    swapped = WrappedDek("acct-2", r1.dek_version, r1.kek_id, r1.wrapped, r1.created_at)
    blob = ring.encrypt_field("acct-2", "f", b"x")
    fresh = KeyRing([KEK1], "kek-1", [swapped])
    with pytest.raises(DecryptionError):
        fresh.decrypt_field("acct-2", "f", blob)


def test_dek_rotation_keeps_old_versions_readable():
    ring = ring_with("acct-1")
    old = ring.encrypt_field("acct-1", "f", b"v1")
    ring.create_dek("acct-1", T0 + timedelta(days=30))
    new = ring.encrypt_field("acct-1", "f", b"v2")
    assert old[1:5] == (1).to_bytes(4, "big") and new[1:5] == (2).to_bytes(4, "big")
    assert ring.decrypt_field("acct-1", "f", old) == b"v1"
    assert ring.decrypt_field("acct-1", "f", new) == b"v2"


def test_missing_key_and_bad_inputs():
    ring = ring_with()
    with pytest.raises(KeyNotFoundError):
        ring.encrypt_field("nobody", "f", b"x")
    with pytest.raises(KeyNotFoundError):
        ring.destroy_dek("nobody", T0)
    ring.create_dek("acct-1", T0)
    with pytest.raises(ValueError, match="plaintext"):
        ring.encrypt_field("acct-1", "f", "text")
    with pytest.raises(ValueError, match="field"):
        ring.encrypt_field("acct-1", "", b"x")
    with pytest.raises(ValueError, match="blob"):
        ring.decrypt_field("acct-1", "f", b"\x01short")
    with pytest.raises(ValueError, match="active_kek_id"):
        KeyRing([KEK1], "kek-9")
    with pytest.raises(ValueError, match="key"):
        KeyEncryptionKey("k", b"short")
    assert "redacted" in repr(KEK1) and str(bytes(range(32))) not in repr(KEK1)


def test_kek_config_parsing():
    b1 = base64.b64encode(KEK1.key).decode()
    b2 = base64.b64encode(KEK2.key).decode()
    keks = parse_kek_config(f" kek-1={b1} , kek-2={b2}")
    assert keks == [KEK1, KEK2]
    for bad, match in [("", "keks"), ("kek-1", r"keks\[0\]"), (f"a={b1},a={b2}", "duplicate"),
                       ("a=!!!", "base64"), ("a=" + base64.b64encode(b"x" * 16).decode(), "key")]:
        with pytest.raises(ValueError, match=match):
            parse_kek_config(bad)


def test_records_serialise_round_trip():
    ring = ring_with("acct-1", "acct-2")
    ring.destroy_dek("acct-2", T0)
    rows = records_to_dicts(ring.records())
    assert records_from_dicts(rows) == ring.records()
    assert generate_kek("x").key != generate_kek("x").key


def test_a_kek_whose_bytes_changed_is_found_among_the_stored_keys():
    """attack25: the start-up check behind KeyService. Keys another KEK under the same id
    wrapped last (a process that ran on a regenerated development key file) are the
    newest, and the sample of each KEK's keys includes the newest."""
    right, wrong = generate_kek("dev-1"), generate_kek("dev-1")
    ring = KeyRing([right], "dev-1")
    old = [ring.create_dek(f"h{i}", T0 + timedelta(seconds=i)) for i in range(200)]
    assert KeyRing([right], "dev-1", old).unopened_data_keys() == {}
    assert KeyRing([wrong], "dev-1", old).unopened_data_keys() == {"dev-1": (128, 128)}
    later = KeyRing([wrong], "dev-1").create_dek("h-new", T0 + timedelta(days=1))
    assert KeyRing([right], "dev-1", [*old, later]).unopened_data_keys() == {"dev-1": (1, 128)}
    shredded = KeyRing([wrong], "dev-1", [later])
    assert KeyRing([right], "dev-1", [*old, *shredded.destroy_dek("h-new", T0 + timedelta(days=2))]) \
        .unopened_data_keys() == {}   # a tombstone holds no key to open


def test_creating_a_households_key_keeps_no_cipher_of_it_in_memory():
    """attack27: ``create_dek`` kept an ``AESGCM`` of every new household's raw data key in
    the ring's cache, for the life of the process, though the privacy service never
    encrypts with it (stores fetch the key with GetDataKey): ~2.5 KB of RSS a household
    (100,000 new households: +297 MB, +49 MB without), so an ingest pipeline creating
    households at ~150/s took a privacy pod to its 1 GiB limit in well under an hour, and
    every new household's raw key sat in its memory. Measured in a process of its own (the
    cipher's memory is the cryptography library's, which tracemalloc does not see)."""
    import subprocess
    import sys
    code = (
        "from datetime import datetime, UTC\n"
        "from services.privacy.keys.domain import KeyRing, generate_kek\n"
        "ring = KeyRing([generate_kek('k1')], 'k1')\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "now = datetime.now(UTC)\n"
        "ring.create_dek('warm-up', now)\n"
        "before = rss()\n"
        "for i in range(20000):\n"
        "    ring.create_dek(f'acc-{i:08d}', now)\n"
        "print(rss() - before, len(ring._cache))\n")
    grown_kib, cached = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True, timeout=120).stdout.split())
    assert cached == 0
    # ~0.5 KB a household for the records this view holds; ~3 KB with a cipher each.
    assert grown_kib < 20000 * 1.5, f"{grown_kib} KiB for 20,000 new households"


_AAD_TEXT = st.one_of(st.text(), st.sampled_from(["", "acc-1", 'a"b\\c', "\x00\x1f\x7f", "ü€𝄞", "\ud800", "x" * 300]))


@given(_AAD_TEXT, st.one_of(st.integers(), st.sampled_from([0, 1, 2 ** 32 - 1])), _AAD_TEXT)
@settings(max_examples=300, deadline=None)
def test_the_wrap_aad_is_json_dumps_bytes(account_id, version, kek_id):
    """Session 28 writes the key wrap's AAD itself (json.dumps built an encoder a call): a byte
    of difference would leave every stored wrapped key unopenable, so the bytes must be
    json.dumps's for any text; other types still go through json.dumps."""
    import json

    from services.privacy.keys.domain import _aad

    expected = b"hearth-dek-v1\x00" + json.dumps([account_id, version, kek_id], separators=(",", ":")).encode("utf-8")
    assert _aad(b"hearth-dek-v1", account_id, version, kek_id) == expected
    assert _aad(b"l", account_id, True, 1.5) == b"l\x00" + json.dumps([account_id, True, 1.5],
                                                                       separators=(",", ":")).encode("utf-8")


def test_a_households_first_keys_are_version_1_and_the_digest_key_derive_digest_key_gives():
    """``create_household_keys`` (GetDataKey / GetDataKeys, session 28) makes what
    ``create_dek`` + ``derive_digest_key`` made, without unwrapping version 1 again."""
    ring = KeyRing([KEK1], "kek-1")
    record, digest, raw = ring.create_household_keys("acct-1", T0)
    assert (record.dek_version, digest.dek_version) == (1, 0)
    assert ring.data_key("acct-1") == (1, raw)
    other = KeyRing([KEK1], "kek-1", [record])     # derived the old way from the stored v1
    assert other.derive_digest_key("acct-1", T0) is not None
    assert other.digest_key("acct-1") == ring.digest_key("acct-1")
    with pytest.raises(ValueError, match="account_id"):
        ring.create_household_keys("acct-1", T0)   # it has keys: never a second version 1
    ring.destroy_dek("acct-1", T0)
    with pytest.raises(ValueError, match="account_id"):
        ring.create_household_keys("acct-1", T0)   # erased: never a key again
