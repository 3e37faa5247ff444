"""The load generator of `make verify`, run as its own process so that its CPU is
measured apart from the mesh's (``python -m bench.loadgen SPEC.json OUT.json``).

Open loop (``mode: open``): request ``i`` is *scheduled* at ``t0 + i / rate`` whatever
happened to earlier requests, and its latency is measured from that scheduled instant,
not from when it was actually sent. A slow server therefore cannot slow the generator
down and hide its own slowness (no coordinated omission): time a request spends waiting
for a free connection, or behind a late timer, counts. The generator also reports its
own lag (actual send minus scheduled send), overall and per request (``lag_ms``: latency
minus it is the time from the actual send), so a run where the generator itself fell
behind is visible.

Closed loop (``mode: closed``): ``concurrency`` workers each send the next request as
soon as the previous one answered; completed requests per second is the saturation
throughput.

The request mix (``mix``: operation -> weight) is drawn from a seeded generator over the
seeded households in the spec. Operations: ``assign_session``, ``assign_vector``,
``household``, ``events`` (``events_per_request`` new events, 2 unless the spec says,
with fresh ids; the ids of every acknowledged batch are written out so the caller can read
them back; ``stream_events``: each device's batches in time order, as a client streams them), ``attribution``, ``delete``
(a household erasure of one of the spec's ``victims``, each used once; when they run
out a household read is sent instead), ``delete_person`` (the erasure of person ``p1`` of
one of the spec's ``person_victims``, each used once, likewise), ``feedback`` (an assign by
session, then an ``explicit_confirm`` label on the prediction it returned: one request's
latency covers both). ``floor_assign`` is the floor's assign (no key).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import signal
import sys
import time
from pathlib import Path

import aiohttp

EVENT_GENRES = (("drama", "crime"), ("kids", "animation"), ("scifi", "action"), ("comedy",), ("documentary",))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _iso_ms(ts: float) -> str:
    whole = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{round((ts - whole) * 1000):03d}Z"


class Traffic:
    """Builds the i-th request of the mix: (op, method, path, json body, ack key)."""

    def __init__(self, spec: dict) -> None:
        self.rng = random.Random(spec.get("seed", 0))
        self.households = spec.get("households", [])
        self.victims = list(spec.get("victims", []))
        self.person_victims = list(spec.get("person_victims", []))
        self.attribution_accounts = spec.get("attribution_accounts", []) or [h["account_id"] for h in self.households]
        ops, weights = zip(*[(k, float(v)) for k, v in spec["mix"].items() if float(v) > 0])
        self.ops, self.weights = list(ops), list(weights)
        self.prefix = spec.get("event_prefix", "lg")
        self.events_per_request = int(spec.get("events_per_request", 2))
        # ``stream_events``: each device's batches continue its stream (every event after
        # the device's previous one, as a client sends them) instead of each batch
        # covering the last 30 s * N (which overlaps the device's previous batch).
        self.stream_events = bool(spec.get("stream_events"))
        self.device_last: dict[tuple[str, str], float] = {}
        self.counter = 0

    def next(self) -> tuple[str, str, str, dict | None]:
        op = self.rng.choices(self.ops, self.weights)[0]
        if op == "floor_assign":
            return op, "POST", "/v1/assign", {"account_id": "acct-floor", "session_id": "s-0001"}
        h = self.rng.choice(self.households)
        account = h["account_id"]
        if op == "delete":
            if self.victims:
                victim = self.victims.pop()
                return op, "POST", "/v1/delete", {"scope": {"kind": "household", "account_id": victim},
                                                  "reason": "verify"}
            op = "household"
        if op == "delete_person":
            if self.person_victims:
                victim = self.person_victims.pop()
                return op, "POST", "/v1/delete", {"scope": {"kind": "person", "account_id": victim,
                                                            "person_id": "p1"}, "reason": "verify"}
            op = "household"
        if op in ("assign_session", "feedback"):
            return op, "POST", "/v1/assign", {"account_id": account, "session_id": self.rng.choice(h["sessions"])}
        if op == "assign_vector":
            return op, "POST", "/v1/assign", {"account_id": account, "feature_vector": h["vector"]}
        if op == "household":
            return op, "GET", f"/v1/household/{account}", None
        if op == "attribution":
            return op, "POST", "/v1/attribution", {
                "account_ids": [self.rng.choice(self.attribution_accounts)], "method": "markov",
                "level": "household"}
        if op == "events":
            device_id, device_type = self.rng.choice(h["devices"])
            self.counter += 1
            now = time.time()
            genres = self.rng.choice(EVENT_GENRES)
            n = self.events_per_request   # 30 s apart, the last 30 s ago
            stamps = [_iso(now - 30 * (n - k)) for k in range(n)]
            if self.stream_events:   # evenly after the device's last event (or the last second), to now
                last = self.device_last.get((account, device_id), now - 1.0)
                times = [last + (now - last) * (k + 1) / n for k in range(n)]
                for k in range(n):   # whole milliseconds, strictly increasing
                    times[k] = max(round(times[k], 3), round((times[k - 1] if k else last) + 0.001, 3))
                self.device_last[(account, device_id)] = times[-1]
                stamps = [_iso_ms(t) for t in times]
            events = [{"event_id": f"{self.prefix}-{self.counter}-{k}", "account_id": account,
                       "device_id": device_id, "device_type": device_type, "ts": stamps[k],
                       "kind": "heartbeat", "title_id": f"t-{self.rng.randrange(500)}",
                       "genres": list(genres), "duration_s": 300.0, "maturity": "adult"} for k in range(n)]
            return op, "POST", "/v1/events", {"events": events}
        raise ValueError(f"unknown operation {op!r}")


class Recorder:
    def __init__(self) -> None:
        self.t: list[float] = []
        self.lat_ms: list[float] = []
        self.status: list[str] = []
        self.op: list[str] = []
        self.lag_ms: list[float] = []
        self.sent_lag_ms: list[float] = []   # per request, in the order of t / lat_ms / status
        self.acks: list[dict] = []
        self.error_samples: dict[str, list[str]] = {}
        # 429s and 503s sent without a Retry-After header, per status: the API promises one
        # on each (docs/api.md), and a client's backoff reads it.
        self.without_retry_after: dict[str, int] = {}

    def note_error(self, status: str, op: str, body: dict) -> None:
        """A refused request: its first few bodies per status, and whether a 429/503 said
        when to retry."""
        samples = self.error_samples.setdefault(status, [])
        if len(samples) < 3:
            samples.append(f"{op}: {body['error_body']}")
        if status in ("429", "503") and not body.get("retry_after"):
            self.without_retry_after[status] = self.without_retry_after.get(status, 0) + 1

    def add(self, t_rel: float, lat_ms: float, status: str, op: str, lag_ms: float = 0.0) -> None:
        self.t.append(round(t_rel, 4))
        self.lat_ms.append(round(lat_ms, 3))
        self.sent_lag_ms.append(round(lag_ms, 3))
        self.status.append(status)
        self.op.append(op)


async def _send(session: aiohttp.ClientSession, base: str, headers: dict, request, timeout_s: float
                ) -> tuple[str, dict | None]:
    op, method, path, body = request
    try:
        async with session.request(method, base + path, json=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            payload = await r.read()
            if op == "feedback" and r.status == 200:
                # The label on the prediction just handed out (the gateway waits for it to
                # reach the feedback service, PredictionWait).
                prediction_id = json.loads(payload)["prediction_id"]
                return await _send(session, base, headers, (
                    "feedback_label", "POST", "/v1/feedback",
                    {"feedback_id": f"fb-{prediction_id}", "prediction_id": prediction_id,
                     "kind": "explicit_confirm"}), timeout_s)
            if 200 <= r.status < 300 and op in ("events", "delete", "delete_person"):
                return str(r.status), json.loads(payload)
            if r.status >= 400:
                return str(r.status), {"error_body": payload[:300].decode("utf-8", "replace"),
                                       "retry_after": r.headers.get("Retry-After")}
            return str(r.status), None
    except asyncio.TimeoutError:
        return "timeout", None
    except aiohttp.ClientError:
        return "conn_error", None


async def run(spec: dict) -> dict:
    traffic = Traffic(spec)
    rec = Recorder()
    urls = spec.get("urls") or [spec["url"]]   # several gateways: round robin per request
    headers = {"X-API-Key": spec["api_key"]} if spec.get("api_key") else {}
    timeout_s = float(spec.get("timeout_s", 10.0))
    duration = float(spec["duration_s"])
    # Idle connections are dropped after 4 s, before the gateway's uvicorn closes them (its
    # keep-alive timeout is 5 s; aiohttp's default 15 s): a connection idle between the two
    # was reused just as the server closed it, a "conn_error" (ServerDisconnectedError) that
    # the server never saw, in bursts whenever the generator fell behind on a busy machine.
    connector = aiohttp.TCPConnector(limit=int(spec.get("max_connections", 512)), force_close=False,
                                     ttl_dns_cache=None, keepalive_timeout=4.0)
    loop = asyncio.get_running_loop()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.time()
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = loop.time() + 0.05
        wall_t0 = time.time() + 0.05
        if spec.get("started_file"):   # tells the caller when the schedule begins
            Path(spec["started_file"]).write_text(str(wall_t0))
        stop = asyncio.Event()          # SIGUSR1: stop scheduling, finish what is in flight
        loop.add_signal_handler(signal.SIGUSR1, stop.set)

        async def one(request, scheduled: float) -> None:
            sent = loop.time()
            rec.lag_ms.append((sent - scheduled) * 1000)
            status, body = await _send(session, urls[len(rec.lag_ms) % len(urls)], headers, request, timeout_s)
            done = loop.time()
            if body is not None and "error_body" in body:
                rec.note_error(status, request[0], body)
                body = None
            rec.add(scheduled - t0, (done - scheduled) * 1000, status, request[0], (sent - scheduled) * 1000)
            if body is not None and request[0] == "events":
                rec.acks.append({"account_id": request[3]["events"][0]["account_id"],
                                 "event_ids": [e["event_id"] for e in request[3]["events"]],
                                 "t": round(scheduled - t0, 4)})
            elif body is not None and request[0] in ("delete", "delete_person"):
                rec.acks.append({"deletion_job": body.get("job_id"), "t": round(scheduled - t0, 4),
                                 "account_id": request[3]["scope"]["account_id"]})

        if spec["mode"] == "open":
            rate = float(spec["rate"])
            total = int(rate * duration)
            tasks = set()
            i = 0
            while i < total and not stop.is_set():
                now = loop.time()
                # Fire everything that is due (timers are coarser than 1/rate at high rates).
                while i < total and t0 + i / rate <= now:
                    task = asyncio.create_task(one(traffic.next(), t0 + i / rate))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    i += 1
                if i < total:
                    try:
                        await asyncio.wait_for(stop.wait(), max(0.0, t0 + i / rate - loop.time()))
                    except asyncio.TimeoutError:
                        pass
            if tasks:
                await asyncio.wait(tasks, timeout=timeout_s + 5)
        else:
            end = t0 + duration

            async def worker() -> None:
                while loop.time() < end and not stop.is_set():
                    await one(traffic.next(), loop.time())

            await asyncio.sleep(max(0.0, t0 - loop.time()))
            await asyncio.gather(*(worker() for _ in range(int(spec["concurrency"]))))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lag = sorted(rec.lag_ms) or [0.0]
    return {"requests": {"t": rec.t, "lat_ms": rec.lat_ms, "status": rec.status, "op": rec.op,
                         "lag_ms": rec.sent_lag_ms},
            "acks": rec.acks, "t0_wall": wall_t0, "error_samples": rec.error_samples,
            "without_retry_after": rec.without_retry_after,
            "generator": {"cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                          "wall_s": time.time() - wall0,
                          "lag_p99_ms": lag[min(len(lag) - 1, int(0.99 * len(lag)))], "lag_max_ms": lag[-1]}}


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    try:
        import uvloop
        result = uvloop.run(run(spec))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        result = asyncio.run(run(spec))
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
