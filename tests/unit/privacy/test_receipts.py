from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta

import pytest

from services.privacy.keys import signing as keys
from services.common.erasure import ErasureScope
from services.privacy.deletion.domain import receipt_from_results
from services.privacy.deletion.receipts import (
    EMPTY_IDS_DIGEST,
    DeletionReceipt,
    ReceiptVerificationError,
    ServiceDeletion,
    SignedReceipt,
    ids_digest,
    sign_receipt,
    verify_receipt,
)
from tests.unit.privacy.factories import T0


def make_receipt(key, **overrides) -> DeletionReceipt:
    fields = dict(
        receipt_id="r-1", job_id="job-1", account_id="acct-9",
        scope=ErasureScope("acct-9", "device", device_id="tv-1").to_dict(),
        principal="olivia", role="privacy_officer",
        requested_at=T0, completed_at=T0 + timedelta(minutes=3),
        services={"clustering": ServiceDeletion(2, ids_digest(["s1", "s2"])),
                  "attribution": ServiceDeletion(0, EMPTY_IDS_DIGEST)},
        key_id=keys.key_id(key),
    )
    fields.update(overrides)
    return DeletionReceipt(**fields)


def test_ids_digest_definition_is_order_insensitive():
    expected = hashlib.sha256(b"a\nb\n\xc3\xa9").hexdigest()
    assert ids_digest(["é", "b", "a"]) == expected
    assert ids_digest([]) == EMPTY_IDS_DIGEST == hashlib.sha256(b"").hexdigest()
    assert ids_digest(["a,b"]) != ids_digest(["a", "b"])
    with pytest.raises(ValueError, match=r"ids\[1\]: must not contain a newline"):
        ids_digest(["a", "b\nc"])  # would collide with ["a", "b", "c"]
    with pytest.raises(ValueError, match="ids"):
        ids_digest("abc")
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        ids_digest(["a", 3])


def test_sign_verify_round_trip_through_json(signing_key):
    signed = sign_receipt(make_receipt(signing_key), signing_key)
    text = signed.to_json()
    again = SignedReceipt.from_json(text)
    receipt = verify_receipt(again, signing_key.public_key())
    assert receipt.total_count == 2
    body = json.loads(text)["receipt"]
    assert body["total_count"] == 2 and body["scope"] == {
        "kind": "device", "account_id": "acct-9", "device_id": "tv-1"}
    assert body["requested_by"] == {"principal": "olivia", "role": "privacy_officer"}
    # the embedded key alone verifies integrity
    assert verify_receipt(again) == receipt


def _tamper(signed: SignedReceipt, mutate) -> SignedReceipt:
    data = json.loads(signed.to_json())
    mutate(data)
    return SignedReceipt.from_dict(data)


def test_changed_count_is_rejected(signing_key):
    signed = sign_receipt(make_receipt(signing_key), signing_key)

    def lower_count(d):
        d["receipt"]["services"]["clustering"]["count"] = 1
        d["receipt"]["total_count"] = 1

    with pytest.raises(ReceiptVerificationError, match="signature"):
        verify_receipt(_tamper(signed, lower_count), signing_key.public_key())

    def inconsistent(d):
        d["receipt"]["services"]["clustering"]["count"] = 1

    # Only total_count changed: well-formed but altered -> a failed verification.
    with pytest.raises(ReceiptVerificationError, match="total_count"):
        _tamper(signed, inconsistent)


@pytest.mark.parametrize("mutate", [
    lambda d: d["receipt"].__setitem__("account_id", "acct-10") or d["receipt"]["scope"].__setitem__("account_id", "acct-10"),
    lambda d: d["receipt"]["scope"].__setitem__("device_id", "tv-2"),
    lambda d: d["receipt"].__setitem__("completed_at", "2025-03-01T12:04:00.000000Z"),
    lambda d: d["receipt"]["requested_by"].__setitem__("principal", "mallory"),
    lambda d: d["receipt"]["services"]["clustering"].__setitem__("ids_digest", "0" * 64),
])
def test_any_changed_field_is_rejected(signing_key, mutate):
    signed = sign_receipt(make_receipt(signing_key), signing_key)
    with pytest.raises(ReceiptVerificationError):
        verify_receipt(_tamper(signed, mutate), signing_key.public_key())


@pytest.mark.parametrize(("old", "new"), [
    ('"v":1}', '"v":1.0}'),                                   # 1.0 == 1 once parsed
    ('"total_count":2,', '"total_count":2e0,'),
    ('"completed_at":"2025-03-01T12:03:00.000000Z"', '"completed_at":"2025-03-01T12:03:00+00:00"'),
    ('"requested_at":"2025-03-01T12:00:00.000000Z"', '"requested_at":"2025-03-01T12:00:00.0000000Z"'),
    ('"role":"privacy_officer"}', '"role":"privacy_officer","on_behalf_of":"mallory"}'),
])
def test_text_that_is_not_the_signed_canonical_form_is_rejected(signing_key, old, new):
    # The signature covers canonical bytes rebuilt from the parsed fields; a lenient parse
    # (numbers, ISO-8601 spellings, ignored keys) once let such an altered receipt verify.
    text = sign_receipt(make_receipt(signing_key), signing_key).to_json()
    assert text.count(old) == 1
    with pytest.raises(ReceiptVerificationError, match="canonical"):
        verify_receipt(SignedReceipt.from_json(text.replace(old, new)), signing_key.public_key())
    # the untouched text, and its whitespace-reformatted copy, still verify
    verify_receipt(SignedReceipt.from_json(json.dumps(json.loads(text), indent=2)), signing_key.public_key())


def test_a_signature_respelled_in_its_unused_base64_bits_is_rejected(signing_key):
    # 64 bytes -> 86 base64 characters + "=="; the last character's low 4 bits are
    # padding that b64decode ignores, so "Q" -> "R" there left the signature bytes, and
    # the verification, unchanged.
    text = sign_receipt(make_receipt(signing_key), signing_key).to_json()
    data = json.loads(text)
    sig = data["signature"]
    assert sig.endswith("==") and len(sig) == 88
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[85])
    data["signature"] = sig[:85] + alphabet[last ^ 1] + "=="
    assert base64.b64decode(data["signature"]) == base64.b64decode(sig)
    with pytest.raises(ReceiptVerificationError, match="canonical base64"):
        verify_receipt(SignedReceipt.from_json(json.dumps(data)), signing_key.public_key())


def test_changed_signature_is_rejected(signing_key):
    signed = sign_receipt(make_receipt(signing_key), signing_key)
    sig = bytearray(signed.signature)
    sig[10] ^= 0x40
    forged = SignedReceipt(signed.receipt, bytes(sig), signed.public_key_b64)
    with pytest.raises(ReceiptVerificationError, match="signature"):
        verify_receipt(forged, signing_key.public_key())
    truncated = SignedReceipt(signed.receipt, signed.signature[:-1], signed.public_key_b64)
    with pytest.raises(ReceiptVerificationError):
        verify_receipt(truncated, signing_key.public_key())


def test_other_key_is_rejected(signing_key, other_key):
    signed = sign_receipt(make_receipt(signing_key), signing_key)
    with pytest.raises(ReceiptVerificationError, match="signed by key"):
        verify_receipt(signed, other_key.public_key())
    # a forger signing with their own key and claiming it is caught by the real key
    forged = sign_receipt(make_receipt(other_key), other_key)
    with pytest.raises(ReceiptVerificationError):
        verify_receipt(forged, signing_key.public_key())
    # forger keeps the genuine key id but signs with their key
    sneaky = SignedReceipt(signed.receipt, other_key.sign(signed.receipt.canonical_bytes()),
                           signed.public_key_b64)
    with pytest.raises(ReceiptVerificationError, match="signature"):
        verify_receipt(sneaky, signing_key.public_key())


def test_signing_with_a_key_the_receipt_does_not_name_is_refused(signing_key, other_key):
    with pytest.raises(ValueError, match="key_id"):
        sign_receipt(make_receipt(signing_key), other_key)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"job_id": ""}, "job_id"),
    ({"scope": {"kind": "planet", "account_id": "acct-9"}}, "scope.kind"),
    ({"scope": {"kind": "household", "account_id": "acct-1"}}, "scope.account_id"),
    ({"completed_at": T0 - timedelta(seconds=1)}, "completed_at"),
    ({"services": {}}, "services"),
    ({"requested_at": "not a time"}, "requested_at"),
])
def test_invalid_receipts(signing_key, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_receipt(signing_key, **overrides)


def test_service_deletion_validation():
    with pytest.raises(ValueError, match="count"):
        ServiceDeletion(-1, EMPTY_IDS_DIGEST)
    with pytest.raises(ValueError, match="ids_digest"):
        ServiceDeletion(1, "xyz")
    with pytest.raises(ValueError, match="ids_digest"):
        ServiceDeletion(0, ids_digest(["a"]))


def test_receipt_from_results_builds_what_verifies(signing_key):
    scope = ErasureScope("acct-1", "household")
    receipt = receipt_from_results(
        receipt_id="r", job_id="j", scope=scope, principal="p", role="admin",
        requested_at=T0, completed_at=T0, key_id=keys.key_id(signing_key),
        results={"clustering": (3, ids_digest(["a", "b", "c"])), "feedback": (0, EMPTY_IDS_DIGEST)},
    )
    assert receipt.total_count == 3 and receipt.scope == {"kind": "household", "account_id": "acct-1"}
    assert verify_receipt(sign_receipt(receipt, signing_key), signing_key.public_key()) == receipt
    with pytest.raises(ValueError, match=r"results.clustering.count"):
        receipt_from_results(
            receipt_id="r", job_id="j", scope=scope, principal="p", role="admin",
            requested_at=T0, completed_at=T0, key_id="k",
            results={"clustering": (-3, EMPTY_IDS_DIGEST)})


# --------------------------------------------------------------------------- key loading


def test_key_loading_from_pem_and_raw_base64(signing_key):
    pub = signing_key.public_key()
    pem_priv = keys.private_key_to_pem(signing_key)
    raw_seed = base64.b64encode(bytes(range(32))).decode()
    for config in (pem_priv, raw_seed, pem_priv.encode(), base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")):
        loaded = keys.load_private_key(config)
        assert keys.key_id(loaded) == keys.key_id(signing_key)
    for config in (keys.public_key_to_pem(pub), keys.public_key_raw_b64(pub), pem_priv):
        assert keys.key_id(keys.load_public_key(config)) == keys.key_id(pub)
    msg = b"hello"
    assert keys.verify_signature(keys.load_public_key(keys.public_key_raw_b64(pub)),
                                 keys.load_private_key(pem_priv).sign(msg), msg)


@pytest.mark.parametrize("config", ["", "not base64!!", base64.b64encode(b"short").decode(),
                                    "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----"])
def test_bad_key_configuration(config):
    with pytest.raises(ValueError, match="public_key"):
        keys.load_public_key(config)


def test_non_ed25519_pem_is_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="expected Ed25519"):
        keys.load_public_key(pem)


# --------------------------------------------------------------------------- purges


PURGE = {"store": "sqlite", "where": "clustering.db", "action": "secure_delete; wal_checkpoint(TRUNCATE)",
         "at": "2025-03-01T12:02:59.120000Z", "complete": True}


def test_purges_are_signed_into_the_receipt_and_verify_offline(signing_key):
    receipt = make_receipt(signing_key, services={
        "clustering": ServiceDeletion(2, ids_digest(["s1", "s2"]), (PURGE,)),
        "attribution": ServiceDeletion(0, EMPTY_IDS_DIGEST)})
    signed = sign_receipt(receipt, signing_key)
    body = json.loads(signed.to_json())["receipt"]
    assert body["services"]["clustering"]["purges"] == [PURGE]
    assert "purges" not in body["services"]["attribution"]   # receipts without purges are unchanged
    assert verify_receipt(SignedReceipt.from_json(signed.to_json()), signing_key.public_key()) == receipt

    def later(d):
        d["receipt"]["services"]["clustering"]["purges"][0]["at"] = "2025-03-02T00:00:00.000000Z"

    with pytest.raises(ReceiptVerificationError):   # a changed purge time breaks the signature
        verify_receipt(_tamper(signed, later), signing_key.public_key())


@pytest.mark.parametrize("purge, match", [
    ({**PURGE, "complete": "yes"}, r"purges\[0\]\.complete"),
    ({k: v for k, v in PURGE.items() if k != "where"}, r"purges\[0\]"),
    ({**PURGE, "at": "yesterday"}, r"purges\[0\]\.at"),
])
def test_malformed_purges_are_refused_naming_the_field(purge, match):
    with pytest.raises(ValueError, match=match):
        ServiceDeletion(1, ids_digest(["a"]), (purge,))
