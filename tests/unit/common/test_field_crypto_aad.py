"""field_aad writes its JSON itself since session 21 (json.dumps with its own separators
built an encoder a call: ~a tenth of clustering's CPU on event ingest). The AAD binds
every stored ciphertext to its household and column, so a byte of difference would make
every field stored before unreadable: the bytes must be json.dumps's, for any text."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.field_crypto import FieldCipher, field_aad


def _json_aad(account_id, field, version) -> bytes:
    return b"hearth-field-v1\x00" + json.dumps([account_id, field, version], separators=(",", ":")).encode("utf-8")


# Any text: non-ASCII, control characters, quotes and backslashes, lone surrogates.
_TEXT = st.one_of(st.text(), st.sampled_from(["", "acc-1", 'a"b\\c', "\x00\x1f\x7f", "ü€𝄞", "\ud800", "x" * 300]))


@given(_TEXT, _TEXT, st.one_of(st.integers(), st.sampled_from([0, 1, 2 ** 31 - 1, 2 ** 32, -1])))
@settings(max_examples=500, deadline=None)
def test_the_aad_is_json_dumps_bytes(account_id, field, version):
    assert field_aad(account_id, field, version) == _json_aad(account_id, field, version)


def test_other_types_still_go_through_json_dumps():
    assert field_aad("acc", "genres", True) == _json_aad("acc", "genres", True) == b'hearth-field-v1\x00["acc","genres",true]'

    class Name(str):
        pass

    assert field_aad(Name("acc"), "f", 3) == _json_aad("acc", "f", 3)


def test_a_field_sealed_with_the_json_aad_opens_and_the_other_way():
    """Blobs written before this change (their AAD by json.dumps) open, and blobs written
    now open with the AAD json.dumps gives (the privacy service's KeyRing reads them)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(32))
    cipher = FieldCipher(lambda account, version: (3, key))
    nonce = bytes(12)
    old = bytes([1]) + (3).to_bytes(4, "big") + nonce + AESGCM(key).encrypt(nonce, b"drama", _json_aad("hh-ü", "genres", 3))
    assert cipher.decrypt("hh-ü", "genres", old) == b"drama"
    new = cipher.encrypt("hh-ü", "genres", b"kids")
    assert AESGCM(key).decrypt(new[5:17], new[17:], _json_aad("hh-ü", "genres", 3)) == b"kids"
