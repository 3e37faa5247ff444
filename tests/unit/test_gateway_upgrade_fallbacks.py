"""The gateway's rolling-upgrade fallbacks (gateway/routes/privacy.py ``falls_back``): a
privacy that refuses a newer RPC as an older release does is answered through the older
RPC, and each such fallback is logged naming the gRPC code privacy answered — a
PERMISSION_DENIED from a privacy that serves the RPC (a misconfiguration) must not pass
for an upgrade unseen. Through real processes: tests/e2e/test_rotation_rolling_upgrade_e2e.py
and tests/e2e/test_export_rolling_upgrade_e2e.py."""

from __future__ import annotations

import logging

import grpc
import pytest

from gateway.routes.privacy import FALLBACK_LOG_WINDOW_S, FallbackLog, falls_back


def _refused(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="refused")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED])
def test_a_fallback_is_logged_naming_the_code(caplog, code):
    """ledger35: the RequestDataKeyRotations fallback logged nothing (session 34's closing
    note): which code privacy answered was not known afterwards."""
    with caplog.at_level(logging.INFO, logger="hearth.gateway.upgrade"):
        assert falls_back(_refused(code), "RequestDataKeyRotations", "RotateDataKeys") is True
    (record,) = [r for r in caplog.records if r.name == "hearth.gateway.upgrade"]
    assert record.levelno == logging.WARNING
    assert record.fields == {"rpc": "RequestDataKeyRotations", "code": code.name, "fallback": "RotateDataKeys",
                             "coalesced_s": FALLBACK_LOG_WINDOW_S}
    assert f"privacy refused RequestDataKeyRotations ({code.name}" in record.getMessage()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.UNAUTHENTICATED])
def test_other_codes_do_not_fall_back_and_log_nothing_here(caplog, code):
    with caplog.at_level(logging.INFO, logger="hearth.gateway.upgrade"):
        assert falls_back(_refused(code), "ExportHouseholdStream", "ExportHousehold") is False
    assert [r for r in caplog.records if r.name == "hearth.gateway.upgrade"] == []


def test_a_flood_of_fallbacks_is_one_line_a_window_with_the_count(caplog):
    """review35 R3: with a privacy whose matrix refuses the gateway's caller every export
    request fell back and logged a WARNING. Now one line per (rpc, code) and window; the
    next line says how many were not logged; another code or RPC has its own line."""
    now = [1000.0]
    fallbacks = FallbackLog(logging.getLogger("hearth.gateway.upgrade"), window_s=60.0, clock=lambda: now[0])
    denied = _refused(grpc.StatusCode.PERMISSION_DENIED)
    with caplog.at_level(logging.INFO, logger="hearth.gateway.upgrade"):
        for _ in range(100):
            assert falls_back(denied, "ExportHouseholdStream", "ExportHousehold", fallbacks) is True
            now[0] += 0.5          # 100 requests in 50 s: one window
        assert falls_back(_refused(grpc.StatusCode.UNIMPLEMENTED), "ExportHouseholdStream", "ExportHousehold",
                          fallbacks) is True
        assert falls_back(denied, "RequestDataKeyRotations", "RotateDataKeys", fallbacks) is True
        now[0] = 1000.0 + 60.0     # the first window has ended
        assert falls_back(denied, "ExportHouseholdStream", "ExportHousehold", fallbacks) is True
        assert falls_back(denied, "ExportHouseholdStream", "ExportHousehold", fallbacks) is True
    lines = [(r.fields["rpc"], r.fields["code"], r.fields.get("repeats")) for r in caplog.records
             if r.name == "hearth.gateway.upgrade"]
    assert lines == [("ExportHouseholdStream", "PERMISSION_DENIED", None),
                     ("ExportHouseholdStream", "UNIMPLEMENTED", None),
                     ("RequestDataKeyRotations", "PERMISSION_DENIED", None),
                     ("ExportHouseholdStream", "PERMISSION_DENIED", 99)]
    assert "99 more since the last such line" in caplog.records[-1].getMessage()
