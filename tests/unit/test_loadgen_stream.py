"""bench/loadgen.py's ``stream_events``: each device's batches continue its stream (every
event after the device's previous one), as bench.assign_cpu --stream-events sends them;
without it a device's batches overlap (each covers the last 30 s * N)."""

from __future__ import annotations

from datetime import datetime

from bench.loadgen import Traffic

HOUSEHOLDS = [{"account_id": f"acct-{i}", "devices": [["tv-1", "tv"], ["ph-1", "mobile"]], "sessions": ["s"],
               "vector": ""} for i in range(2)]


def _instants(stream: bool, n: int) -> dict[tuple[str, str], list[float]]:
    traffic = Traffic({"households": HOUSEHOLDS, "mix": {"events": 1}, "events_per_request": n,
                       "stream_events": stream, "seed": 3})
    seen: dict[tuple[str, str], list[float]] = {}
    for _ in range(40):
        _op, _method, _path, body = traffic.next()
        for e in body["events"]:
            ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
            seen.setdefault((e["account_id"], e["device_id"]), []).append(ts)
    return seen


def test_streamed_batches_continue_each_devices_stream():
    for n in (1, 2, 50):
        for device, instants in _instants(True, n).items():
            assert all(b > a for a, b in zip(instants, instants[1:])), (n, device)


def test_default_batches_overlap_the_devices_previous_one():
    overlapping = [device for device, instants in _instants(False, 2).items()
                   if any(b <= a for a, b in zip(instants, instants[1:]))]
    assert overlapping
