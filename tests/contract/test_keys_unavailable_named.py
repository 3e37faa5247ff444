"""A store that cannot get a household's data key says why, when privacy said why (ops33).

On a full data directory privacy's ``GetDataKey`` answers UNAVAILABLE "database
unavailable: database or disk is full" (it must store a new household's first key), and
the store calling it answered the client 503 "events[0].account_id: data key service
unavailable" — naming neither the disk nor privacy's database, so an operator looked for
a network fault. privacy's own reason (its error interceptor's trailing metadata says it
is one) now follows; a channel's failure (privacy down, its address) still does not."""

from __future__ import annotations

import pytest

from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.errors import Unavailable
from services.common.field_crypto import FieldCipher
from services.testing.mesh import free_port


def _refusal(address: str, timeout_s: float) -> Unavailable:
    """What a store's first write for a new household gets from the keys service at ``address``."""
    cipher = FieldCipher.remote(address, "clustering", timeout_s=timeout_s)
    try:
        with pytest.raises(Unavailable) as info:
            cipher.encrypt("acc-new", "title_id", b"t-1")
    finally:
        cipher.close()
    return info.value


def test_privacys_reason_for_refusing_a_data_key_reaches_the_caller(start_service):
    running, _channel = start_service("privacy", retention_check_s=0.0)
    keys = next(s for s in running.servicers if isinstance(s, ppb_grpc.KeysServicer))
    keys._keys.store.db.close()   # privacy's database refuses (as on a full disk, or stopping)
    refusal = _refusal(f"127.0.0.1:{running.port}", 10)
    assert refusal.field == "account_id"
    assert str(refusal) == ("account_id: data key service unavailable: "
                            "database is closed (the service is shutting down)")


def test_a_data_key_service_out_of_reach_is_unavailable_without_its_address():
    assert str(_refusal(f"127.0.0.1:{free_port()}", 2)) == "account_id: data key service unavailable"
