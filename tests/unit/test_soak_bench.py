"""bench/soak.py's pieces that need no mesh: the generator's person erasures and feedback
requests, and the verdict on growth (a resource that rises then flattens levels off; one
still rising over the last half does not); the logs' errors and the 503s without Retry-After
counted."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from bench.loadgen import Recorder, Traffic, _send
from bench.soak import _marked, first_last, gateway_route_errors, growth, log_findings
from tests.helpers.http_peer import QuietHandler, serving

HOUSEHOLDS = [{"account_id": "acct-1", "devices": [["tv-1", "tv"]], "sessions": ["s-1"], "vector": ""}]


def test_person_erasures_use_each_victim_once_then_read_households():
    traffic = Traffic({"households": HOUSEHOLDS, "mix": {"delete_person": 1}, "person_victims": ["v-1", "v-2"]})
    requests = [traffic.next() for _ in range(3)]
    scopes = [body["scope"] for op, _m, path, body in requests[:2]]
    assert sorted(s["account_id"] for s in scopes) == ["v-1", "v-2"]
    assert all(s["kind"] == "person" and s["person_id"] == "p1" for s in scopes)
    assert requests[2][0] == "household" and requests[2][2] == "/v1/household/acct-1"


def test_feedback_starts_with_an_assign_by_session():
    op, method, path, body = Traffic({"households": HOUSEHOLDS, "mix": {"feedback": 1}}).next()
    assert (op, method, path, body) == ("feedback", "POST", "/v1/assign", {"account_id": "acct-1", "session_id": "s-1"})


def test_marked_events_carry_the_marker_in_their_ids():
    events = _marked([{"event_id": "a-0", "title_id": "t", "series_id": "s"},
                      {"event_id": "a-1", "title_id": "t", "series_id": "s"}], "zrX")
    assert [e["event_id"] for e in events] == ["zrX-e0", "zrX-e1"]
    assert all(e["title_id"].startswith("zrX-") for e in events)


def _samples(values):
    return [{"t": 30.0 * i, "v": v} for i, v in enumerate(values)]


def test_a_cache_that_fills_then_flattens_levels_off():
    flat_after = [100 + min(i, 20) * 2 for i in range(80)]   # +40 MB in 10 minutes, then flat
    g = growth(_samples(flat_after), lambda s: s["v"], 120, 300, 2400)
    assert g["levels_off"] and g["ratio"] > 1.1


def test_growth_that_goes_on_does_not_level_off():
    leak = [100 + i for i in range(80)]   # 1 MB every 30 s, to the end
    g = growth(_samples(leak), lambda s: s["v"], 120, 300, 2400)
    assert not g["levels_off"] and g["slope_per_h_last_half"] > 100


def test_first_and_last_windows_compare_latency_per_operation():
    t = [float(i) for i in range(600)]
    raw = {"requests": {"t": t, "lat_ms": [10.0 if x < 300 else 30.0 for x in t],
                        "status": ["200" if x != 590 else "503" for x in t], "op": ["assign_session"] * 600}}
    fl = first_last(raw, 0.0, 100.0, 600.0)["assign_session"]
    assert fl["p50_ratio"] == 3.0 and fl["errors_first"] == 0 and fl["errors_last"] == 1


def test_gateway_errors_are_summed_per_stretch_between_the_runs_events():
    samples = [{"t": 0.0, "gateway_requests": {"POST /v1/assign 200": 5}},
               {"t": 30.0, "gateway_requests": {"POST /v1/assign 200": 9, "POST /v1/assign 503": 1}},
               {"t": 60.0, "gateway_requests": {"POST /v1/assign 200": 2}}]   # the gateway restarted
    assert gateway_route_errors(samples, [{"t": 50.0}]) == {
        "0s-50s": {"POST /v1/assign": {"requests": 5, "5xx": 1}},
        "50s-end": {"POST /v1/assign": {"requests": 2, "5xx": 0}}}


def test_a_few_rows_added_level_off_under_the_floor_a_steady_stream_does_not():
    few = [0] * 40 + [1] * 20 + [2] * 20   # a table gaining 2 rows in 40 minutes
    assert not growth(_samples(few), lambda s: s["v"], 120, 300, 2400)["levels_off"]
    assert growth(_samples(few), lambda s: s["v"], 120, 300, 2400, floor_per_h=100)["levels_off"]
    steady = [10 * i for i in range(80)]   # 1,200 rows an hour
    assert not growth(_samples(steady), lambda s: s["v"], 120, 300, 2400, floor_per_h=100)["levels_off"]


def test_log_findings_count_errors_and_tracebacks_not_the_faults_warnings(tmp_path):
    line = lambda level, msg: json.dumps({"level": level, "service": "privacy", "msg": msg})
    (tmp_path / "privacy.log").write_text("\n".join([
        line("WARNING", "erase in clustering failed: UNAVAILABLE"),   # a fault's noise
        line("ERROR", "audit flush failed"),
        "Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom",
        line("INFO", "health: SERVING")]) + "\n")
    (tmp_path / "gateway.log").write_text(line("WARNING", "peer degraded") + "\n")
    found = log_findings(tmp_path)
    assert found["privacy"]["error_lines"] == 1 and found["privacy"]["tracebacks"] == 1
    assert found["privacy"]["warnings"] == 1 and len(found["privacy"]["first"]) == 2
    assert found["gateway"] == {"error_lines": 0, "tracebacks": 0, "warnings": 1, "first": []}


class _Refusing(QuietHandler):
    """503 with Retry-After on /with, without it on /without."""

    def do_GET(self) -> None:
        self.send_response(503)
        if self.path == "/with":
            self.send_header("Retry-After", "2")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def test_a_503_without_retry_after_is_counted():
    async def send_both(base):
        async with aiohttp.ClientSession() as session:
            return [await _send(session, base, {}, ("household", "GET", path, None), 5.0)
                    for path in ("/with", "/without", "/without")]

    rec = Recorder()
    with serving(_Refusing) as base:
        for status, body in asyncio.run(send_both(base)):
            rec.note_error(status, "household", body)
    assert rec.without_retry_after == {"503": 2}
    assert len(rec.error_samples["503"]) == 3
