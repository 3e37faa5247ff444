"""services/common/client.BatchCall: the one rule for a batch RPC an older privacy refuses
(GetConsents for consent, GetDataKeys for field_crypto) — refused as an older release
refuses it, the batch is not asked again for BATCH_RECHECK_S (the caller asks one item a
call meanwhile), then asked again; any other error is the caller's. No unit test covered
BATCH_RECHECK_S before session 35, and the two callers each restated the rule."""

from __future__ import annotations

import grpc
import pytest

from services.common import client, consent, field_crypto
from services.common.client import BATCH_RECHECK_S, BatchCall


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED])
def test_a_batch_refused_as_an_older_release_refuses_it_is_asked_again_only_after_the_recheck(code):
    clock = _Clock()
    batch = BatchCall(clock=clock)
    sent: list[str] = []

    def refuse() -> str:
        sent.append("refused")
        raise _Refused(code)

    assert batch.call(refuse) is None and sent == ["refused"]
    clock.now += BATCH_RECHECK_S - 1.0
    assert batch.call(lambda: sent.append("asked") or "answer") is None   # not asked within the recheck
    assert sent == ["refused"]
    clock.now += 1.0
    assert batch.call(lambda: sent.append("asked") or "answer") == "answer"   # asked again after it
    assert batch.call(lambda: "again") == "again"   # and from then on, every call
    assert sent == ["refused", "asked"]


def test_any_other_error_is_raised_and_does_not_stop_the_batch():
    clock = _Clock()
    batch = BatchCall(clock=clock)

    def unavailable() -> str:
        raise _Refused(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(grpc.RpcError):
        batch.call(unavailable)
    assert batch.call(lambda: "answer") == "answer"


def test_the_recheck_is_five_minutes_and_both_callers_share_the_one_rule():
    assert BATCH_RECHECK_S == 300.0   # docs/operations.md: one call per RPC per store process per 5 minutes
    assert not hasattr(consent, "BATCH_RECHECK_S") and not hasattr(field_crypto, "BATCH_RECHECK_S")
    assert client.BatchCall().recheck_s == BATCH_RECHECK_S
