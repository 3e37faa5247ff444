"""The privacy process's Keys service over gRPC: GetDataKey for the data-holding
services, RotateKeys for an admin (re-wraps every data key under the new KEK)."""

from __future__ import annotations

import base64
import os

import grpc
import pytest

from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import Principal, Role, service_principal

from .conftest import ADMIN

ANALYST = Principal("test-analyst", Role.ANALYST)
CLUSTERING = service_principal("clustering")


def _kek(kek_id: str) -> str:
    return f"{kek_id}={base64.b64encode(os.urandom(32)).decode()}"


@pytest.fixture
def keys(start_service):
    _, channel = start_service("privacy", keks=f"{_kek('k1')},{_kek('k2')}", active_kek="k1",
                               retention_check_s=0.0)
    return ppb_grpc.KeysStub(channel)


def _error(fn, request, who) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, metadata=who.metadata("privacy"), timeout=10)
    return info.value.code(), dict(info.value.trailing_metadata()).get(ERROR_FIELD_KEY, "")


def test_rotation_rewraps_every_data_key_and_keeps_them_readable(keys):
    first = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-1"), metadata=CLUSTERING.metadata("privacy"), timeout=10)
    keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-2"), metadata=CLUSTERING.metadata("privacy"), timeout=10)
    assert first.dek_version == 1 and len(first.dek) == 32
    rotated = keys.RotateKeys(ppb.RotateKeysRequest(new_active_kek_id="k2"), metadata=ADMIN.metadata("privacy"), timeout=10)
    # two data keys and their digest keys (session 27)
    assert (rotated.rewrapped, rotated.active_kek_id, list(rotated.kek_ids_in_use)) == (4, "k2", ["k2"])
    again = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-1", dek_version=1),
                            metadata=CLUSTERING.metadata("privacy"), timeout=10)
    assert again.dek == first.dek                      # the same data key, now under k2


def test_rotation_is_refused_without_a_known_kek_or_the_admin_role(keys):
    assert _error(keys.RotateKeys, ppb.RotateKeysRequest(), ADMIN) == (
        grpc.StatusCode.INVALID_ARGUMENT, "new_active_kek_id")
    assert _error(keys.RotateKeys, ppb.RotateKeysRequest(new_active_kek_id="k9"), ADMIN)[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _error(keys.RotateKeys, ppb.RotateKeysRequest(new_active_kek_id="k2"), ANALYST)[0] == \
        grpc.StatusCode.PERMISSION_DENIED


def test_the_digest_key_is_given_when_asked_and_is_what_version_1_derives(keys):
    """GetDataKey ``with_digest_key`` (session 27) answers the household's erased-id digest
    key: HMAC-SHA256(data key v1, "hearth-erased-id-v1"), what the stores derived from
    version 1 themselves before, so digests written then stay valid. A caller of the
    release before never sets the field and gets the answer it always got (no digest key)."""
    import hashlib
    import hmac

    who = CLUSTERING.metadata("privacy")
    older = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-d"), metadata=who, timeout=10)
    assert (older.dek_version, len(older.dek), older.digest_key) == (1, 32, b"")
    asked = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-d", with_digest_key=True), metadata=who, timeout=10)
    assert asked.dek == older.dek
    assert asked.digest_key == hmac.new(older.dek, b"hearth-erased-id-v1", hashlib.sha256).digest()


def test_getdatakeys_gives_each_households_newest_key_as_getdatakey_does(keys):
    """GetDataKeys (session 28): one answer per distinct id, in request order; a new
    household's key is created by the call and is the one GetDataKey gives after."""
    who = CLUSTERING.metadata("privacy")
    known = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-b1"), metadata=who, timeout=10)
    r = keys.GetDataKeys(ppb.GetDataKeysRequest(account_ids=["acc-b1", "acc-b2", "acc-b1", "acc-b3"]),
                         metadata=who, timeout=10)
    assert [(k.account_id, k.outcome, k.dek_version) for k in r.keys] == [
        (a, ppb.DATA_KEY_OUTCOME_KEY, 1) for a in ("acc-b1", "acc-b2", "acc-b3")]
    assert r.keys[0].dek == known.dek
    after = keys.GetDataKey(ppb.GetDataKeyRequest(account_id="acc-b2"), metadata=who, timeout=10)
    assert after.dek == r.keys[1].dek and len(after.dek) == 32


def test_getdatakeys_refuses_bad_input_naming_the_field_and_any_caller_but_a_service(keys):
    who = CLUSTERING
    assert _error(keys.GetDataKeys, ppb.GetDataKeysRequest(), who) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids")
    too_many = ppb.GetDataKeysRequest(account_ids=[f"acc-{i}" for i in range(1001)])
    assert _error(keys.GetDataKeys, too_many, who) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids")
    for bad in ("", "a b", "x" * 200, "../etc"):
        request = ppb.GetDataKeysRequest(account_ids=["acc-ok", bad])
        assert _error(keys.GetDataKeys, request, who) == (grpc.StatusCode.INVALID_ARGUMENT, "account_ids[1]"), bad
    assert _error(keys.GetDataKeys, ppb.GetDataKeysRequest(account_ids=["acc-ok"]), ADMIN)[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert _error(keys.GetDataKeys, ppb.GetDataKeysRequest(account_ids=["acc-ok"]), ANALYST)[0] == \
        grpc.StatusCode.PERMISSION_DENIED

