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
    assert (rotated.rewrapped, rotated.active_kek_id, list(rotated.kek_ids_in_use)) == (2, "k2", ["k2"])
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
