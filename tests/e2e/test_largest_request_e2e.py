"""The largest request the gateway takes still reaches its service (session 22): since the
services read at most HEARTH_GRPC_MAX_MESSAGE_BYTES (16 MiB) of a request message, a
body within HEARTH_MAX_BODY_BYTES (8 MiB) must make a message within it — a body's
protobuf is never larger than its JSON (docs/security.md, "Attacker's review (session
21)", item 7)."""

from __future__ import annotations

import json
import time

import httpx

from hearth.attribution.v1 import attribution_pb2 as apb
from services.common.pbutil import float_to_ts

MAX_BODY = 8 * 1024 * 1024


def _id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}-".ljust(128, "x")   # the longest id (MAX_ID_CHARS)


def test_the_largest_touchpoints_body_is_recorded_end_to_end(mesh):
    """10,000 touchpoints (the most a batch may hold) with every id at its 128 characters
    and channel and campaign at their 64: a 7.76 MB body (7.4 MiB), which makes a 6.72 MB
    RecordTouchpoints message."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86400))
    accounts = [_id("e2e-largest", a) for a in range(10)]
    touchpoints = [{"touchpoint_id": _id("tp", i), "account_id": accounts[i % 10], "device_id": _id("dev", i % 50),
                    "ts": ts, "channel": f"ch{i % 7}".ljust(64, "c"), "campaign": f"cp{i % 3}".ljust(64, "p"),
                    "person_id": _id("p", i % 4)} for i in range(10_000)]
    body = json.dumps({"touchpoints": touchpoints}).encode()
    message = apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
        touchpoint_id=t["touchpoint_id"], account_id=t["account_id"], device_id=t["device_id"],
        ts=float_to_ts(time.time() - 86400), channel=t["channel"], campaign=t["campaign"], person_id=t["person_id"])
        for t in touchpoints]).ByteSize()
    assert 7 * 1024 * 1024 < len(body) <= MAX_BODY and 6 * 1024 * 1024 < message < len(body), (len(body), message)
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key, "Content-Type": "application/json"},
                      timeout=60) as client:
        answer = client.post("/v1/touchpoints", content=body)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["accepted"] + answer.json()["duplicates"] == 10_000
