"""What an authorised ``POST /v1/events`` costs the gateway process's CPU (``/proc``), through
a mesh of real processes, for three bodies sent by the service role:

* ``over``: 8 MiB of ``{"events": [{}, {}, ...]}`` (2.8 million objects, over the 10,000
  events a batch may hold: 422 ``events``);
* ``invalid``: 10,000 (``--invalid-events``) complete events each missing ``kind`` (within
  the bound: 422 naming ``events[0].kind``);
* ``valid``: 20 valid events (200), with its latency.

    .venv/bin/python -m bench.gateway_body_bounds --rounds 5
    .venv/bin/python -m bench.gateway_body_bounds --baseline /tmp/base-tree   # A/B, alternated

``--baseline``: a second source tree (e.g. ``git archive <ref>`` with this checkout's
generated ``hearth/`` copied in) run as a second mesh beside this one; the rounds alternate
between the two, so the machine's load falls on both alike. Figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from bench._common import process_cpu_s
from services.testing.mesh import ROOT, running_mesh

MAX_BODY = 8 * 1024 * 1024


def over_bound_body() -> bytes:
    n = (MAX_BODY - 16) // 3
    return b'{"events": [' + b",".join([b"{}"] * n) + b"]}"


def events(prefix: str, n: int, kind: bool = True, genres: int = 1) -> list[dict]:
    start = datetime.now(timezone.utc) - timedelta(seconds=30 * n + 3600)
    out = []
    for i in range(n):
        e = {"event_id": f"{prefix}-{i}", "account_id": f"{prefix}-acct", "device_id": "tv-1", "device_type": "tv",
             "ts": (start + timedelta(seconds=30 * i)).strftime("%Y-%m-%dT%H:%M:%SZ"), "title_id": "t1",
             "genres": ["drama"] if genres == 1 else [f"{g:02d}-" + "g" * 45 for g in range(genres)],
             "duration_s": 30.0}
        if kind:
            e["kind"] = "heartbeat" if i else "play_start"
        out.append(e)
    return out


def one_round(client: httpx.Client, pid: int, tag: str, over: bytes, invalid: bytes, valid_n: int) -> dict:
    out = {}
    for name, body, status in (("over", over, 422), ("invalid", invalid, 422)):
        before = process_cpu_s(pid)
        r = client.post("/v1/events", content=body)
        out[name + "_cpu_s"] = process_cpu_s(pid) - before
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        out[name + "_answer"] = r.json()
    before, lat = process_cpu_s(pid), []
    for i in range(valid_n):
        body = json.dumps({"events": events(f"bb-{tag}-{time.time_ns()}-{i}", 20)}).encode()
        t = time.perf_counter()
        r = client.post("/v1/events", content=body)
        lat.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text[:300]
    out["valid_cpu_ms"] = (process_cpu_s(pid) - before) / valid_n * 1000
    out["valid_latency_ms"] = statistics.median(lat) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="a second source tree, measured alternately")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--valid", type=int, default=40, help="valid requests a round")
    ap.add_argument("--invalid-events", type=int, default=10_000, help="events of the invalid body")
    ap.add_argument("--invalid-genres", type=int, default=1, help="genres of 48 characters an invalid event holds "
                                                                  "(12: the invalid body is ~8 MiB)")
    args = ap.parse_args()
    roots = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    env = {"HEARTH_LOG_LEVEL": "WARNING", "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1000, "burst": 1000})}
    over = over_bound_body()
    invalid = json.dumps({"events": events("bb-invalid", args.invalid_events, kind=False, genres=args.invalid_genres)}).encode()
    with contextlib.ExitStack() as stack:
        meshes = {}
        for name, root in roots.items():
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"body-bounds-{name}-")))
            meshes[name] = stack.enter_context(running_mesh(work, root=root, extra_env=env,
                                                            keys={"bench-service": "service"}))
        clients = {name: stack.enter_context(httpx.Client(
            base_url=m.url, timeout=120, headers={"X-API-Key": m.api_key, "Content-Type": "application/json"}))
            for name, m in meshes.items()}
        time.sleep(2.0)
        rounds: dict[str, list[dict]] = {name: [] for name in meshes}
        for k in range(args.rounds):
            for name in (list(meshes) if k % 2 == 0 else list(reversed(meshes))):
                rounds[name].append(one_round(clients[name], meshes[name].processes["gateway"].pid, name,
                                              over, invalid, args.valid))
        result = {}
        for name, rs in rounds.items():
            result[name] = {"root": str(roots[name]), "over_body_bytes": len(over), "invalid_body_bytes": len(invalid),
                            "over_answer": rs[0]["over_answer"], "invalid_answer": rs[0]["invalid_answer"]}
            for key in ("over_cpu_s", "invalid_cpu_s", "valid_cpu_ms", "valid_latency_ms"):
                result[name][key] = round(statistics.median(r[key] for r in rs), 3)
                result[name][key + "_rounds"] = [round(r[key], 3) for r in rs]
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
