"""Admission control through real processes: driven past its capacity, the gateway
answers the excess at once with 503 + Retry-After, and the requests it admits keep being
served at about the rate it serves when not overloaded (no goodput collapse, no timeouts).

The mesh runs with a small admission limit on clustering so that "past capacity" is
reached with a modest offered rate on a shared machine: capacity is measured first, in
the same run, closed loop with as many workers as there are slots; then the open-loop
generator (bench/loadgen.py, its own process, latency from the scheduled send) offers
three times that rate."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench._common import process_cpu_s
from bench.verify import household_events
from services.testing.mesh import Mesh, write_api_key

ROOT = Path(__file__).resolve().parents[2]
SLOTS = 4
# A refusal's median may take this many closed-loop assign round trips (measured in the same
# run) beyond the queue timeout, and never less than 1 s in all.
REFUSAL_PACE_FACTOR = 25.0


def _load(tmp_path: Path, name: str, spec: dict) -> dict:
    spec_path, out_path = tmp_path / f"{name}-spec.json", tmp_path / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
                   cwd=ROOT, check=True, timeout=120)
    return json.loads(out_path.read_text())["requests"]


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_overload_gets_fast_503s_and_goodput_stays_near_capacity(tmp_path):
    limits = {"clustering": {"max_in_flight": SLOTS, "max_queue": 2 * SLOTS, "queue_timeout_s": 0.25}}
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs",
                              extra_env={"HEARTH_ADMISSION_LIMITS": json.dumps(limits),
                                         "HEARTH_RATE_LIMIT_ENABLED": "false",
                                         "HEARTH_ACCESS_LOG": "false", "HEARTH_LOG_LEVEL": "WARNING"})
    mesh.data_dir.mkdir(parents=True)
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "admission-admin", "admin")
    try:
        mesh.start_healthy(180)
        rng = random.Random(3)
        accounts = [f"adm-{i}" for i in range(3)]
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=60) as c:
            for account in accounts:
                r = c.post("/v1/events", json={"events": household_events(account, rng, 6)})
                assert r.status_code == 200, r.text
            # Assignments need each household's model (fitted in the background after ingest).
            households, deadline = [], time.monotonic() + 120
            while len(households) < len(accounts) and time.monotonic() < deadline:
                households = []
                for account in accounts:
                    h = c.get(f"/v1/household/{account}").json()
                    closed = [s["session_id"] for s in h["sessions"] if s["feature_vector"]]
                    if h["model_version"] > 0 and closed:
                        households.append({"account_id": account, "sessions": closed, "devices": []})
                time.sleep(0.3)
            assert len(households) == len(accounts), "no model was fitted after ingest"
        spec = {"url": mesh.url, "api_key": key, "mix": {"assign_session": 1.0}, "timeout_s": 10.0,
                "households": households}

        # Capacity and overload in alternating rounds (the machine is shared: its speed
        # drifts, so each overload round is compared with the capacity measured just
        # before it, and the medians are what is asserted).
        capacities, goodputs, refused, served, statuses = [], [], [], [], set()
        closed_ms = []   # one assign's round trip through the gateway and clustering, closed loop
        per_cpu_closed, per_cpu_over = [], []   # assigns served per clustering CPU-second
        clustering = mesh.processes["clustering"].pid
        duration = 4.0
        for round_ in range(3):
            # Capacity: closed loop with one worker per slot (never refused).
            cpu0 = process_cpu_s(clustering)
            closed = _load(tmp_path, f"capacity-{round_}", {**spec, "mode": "closed", "concurrency": SLOTS,
                                                             "duration_s": 3.0, "seed": round_})
            per_cpu_closed.append(len(closed["status"]) / max(process_cpu_s(clustering) - cpu0, 0.01))
            assert set(closed["status"]) == {"200"}, set(closed["status"])
            capacities.append(len(closed["status"]) / 3.0)
            closed_ms += closed["lat_ms"]
            # Three times that, open loop.
            cpu0 = process_cpu_s(clustering)
            over = _load(tmp_path, f"overload-{round_}", {**spec, "mode": "open", "rate": max(30.0, 3 * capacities[-1]),
                                                           "duration_s": duration, "seed": 10 + round_})
            per_cpu_over.append(float((np.array(over["status"]) == "200").sum())
                                / max(process_cpu_s(clustering) - cpu0, 0.01))
            # The gateway's answer time runs from the actual send: on a busy machine the
            # generator itself falls behind its schedule (seen: 3.6 s), which is its lag, not
            # the gateway's (the schedule-based latency, bench/loadgen.py, includes it).
            status, lat = np.array(over["status"]), np.array(over["lat_ms"]) - np.array(over["lag_ms"])
            statuses |= set(status)
            refused += list(lat[status == "503"])
            served += list(lat[status == "200"])
            goodputs.append(float((status == "200").sum()) / duration)
        # Each round's goodput over the capacity measured just before it: the medians of the
        # two lists apart compare rounds minutes apart (a fresh-clone run beside other jobs,
        # load 8-10: capacities 396/373/217, goodputs 350/178/149 — per round 0.88/0.48/0.68).
        ratio = float(np.median(np.array(goodputs) / np.array(capacities)))
        cpu_ratio = float(np.median(np.array(per_cpu_over) / np.array(per_cpu_closed)))
        refused, served = np.array(refused), np.array(served)
        # How fast "fast" can be on this machine now, from the same run: a refusal makes the
        # round trip a served assign makes (gateway -> clustering -> gateway) plus at most the
        # queue timeout, while the gateway and the generator handle three times the rate. Idle,
        # a closed-loop assign takes ~10 ms and the bound is the 1 s it always was; a loaded
        # machine stretches both alike (load ~13, session 27: closed-loop p50 27-68 ms a round,
        # refusal p50 1,052 ms against the constant 1,000 — and 1,019 / 1,653 at load ~20).
        pace_ms = float(np.median(closed_ms))
        refusal_bound_ms = max(1000.0, 250.0 + REFUSAL_PACE_FACTOR * pace_ms)
        print(f"admission e2e: capacity {capacities} goodput {goodputs} refused {len(refused)} of "
              f"{len(refused) + len(served)}, refusal p50 {np.median(refused):.1f} ms p99 {np.percentile(refused, 99):.1f} ms "
              f"(bound {refusal_bound_ms:.0f} ms: closed-loop p50 {pace_ms:.1f} ms); "
              f"served per clustering CPU-s closed {per_cpu_closed} overloaded {per_cpu_over}")
        # Every request is either served or refused: no timeouts, no 5xx of another kind.
        assert statuses <= {"200", "503"}, statuses
        assert len(refused) > 0.3 * (len(refused) + len(served))
        # Fast: a refusal waits at most the queue timeout (0.25 s) plus the gateway's own
        # handling; nothing gets near the 10 s deadline of the old collapse (both from the
        # request's send).
        assert np.median(refused) < refusal_bound_ms, (np.percentile(refused, [50, 99]), pace_ms)
        assert np.percentile(served, 99) < 5000, np.percentile(served, [50, 99])
        # Goodput stays near capacity: the admitted requests are served at about the rate
        # measured closed loop (without the limit it fell to 10-25 % of it: docs/benchmarks.md),
        # and clustering spends its CPU on requests that are served, not on ones whose callers
        # gave up. The wall-clock ratio depends on the CPU the machine leaves the mesh: three
        # times the offered rate means the generator and the gateway's refusals take CPU the
        # closed loop left to clustering, so with other work on two cores (a fresh-clone run at
        # load ~12: per round 0.40 / 0.47 / 1.35) it falls below a half with no collapse at all.
        # Per clustering CPU-second the comparison does not depend on what else runs.
        assert cpu_ratio >= 0.6, (per_cpu_over, per_cpu_closed)
        assert ratio >= 0.3, (goodputs, capacities)

        metrics = httpx.get(f"http://127.0.0.1:{mesh.gateway_metrics_port}/metrics").text
        rejected = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith('hearth_gateway_admission_rejected_total{') and 'clustering' in line)
        assert rejected == len(refused)
        # Refusals are counted with the route template like every other response.
        counted_503 = sum(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("hearth_http_requests_total{") and 'status="503"' in line
                          and 'route="/v1/assign"' in line)
        assert counted_503 == len(refused)
    finally:
        mesh.stop()
