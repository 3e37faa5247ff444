"""Ingest of a batch of new households, one event each, against two meshes at once: this
checkout and a baseline commit's tree (``--baseline``, default 5615909: main before
keyfetch27's warming). Each round posts a fresh batch (new accounts: every data key cold)
to each mesh in alternating order, while a probe posts one event of a known household
every 0.2 s to the same mesh — the "every other write waits" half of attack27's finding.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_key_warming --households 1000 --rounds 5
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_key_warming --baseline ed5316b --households 5000 \
        --rounds 3 --out /tmp/ingest-5000.json

JSON (printed, and written to ``--out``): per side, the batch's seconds and status of each
round, their median, the probes' median and max seconds, the fixed/baseline ratio of the
medians, the load average, the UTC start and end."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench._common import emit
from bench.assign_cpu import extract
from services.testing.mesh import Mesh, write_api_key

ROOT = Path(__file__).resolve().parents[1]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _event(account: str, event_id: str, ts: float) -> dict:
    return {"event_id": event_id, "account_id": account, "device_id": "tv-1", "device_type": "tv", "ts": _iso(ts),
            "kind": "heartbeat", "title_id": "title-1", "series_id": "show-1", "genres": ["drama"],
            "duration_s": 300, "maturity": "adult"}


def start(label: str, root: Path, work: Path) -> tuple[Mesh, str]:
    base = work / label
    mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", root=root, extra_env={
        "HEARTH_LOG_LEVEL": "WARNING",
        "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1_000_000, "burst": 1_000_000})})
    mesh.data_dir.mkdir(parents=True, exist_ok=True)
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "bench-admin", "admin")
    mesh.start()
    return mesh, key


def one_round(mesh: Mesh, key: str, households: int, tag: str) -> dict:
    ts = time.time() - 3600
    batch = [_event(f"{tag}-{i}", f"{tag}-e{i}", ts) for i in range(households)]
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=60) as c:
            n = 0
            while not done.is_set():
                n += 1
                t0 = time.perf_counter()
                c.post("/v1/events", json={"events": [_event("probe-acc", f"{tag}-p{n}", ts + n)]})
                probes.append(time.perf_counter() - t0)
                done.wait(0.2)

    prober = threading.Thread(target=probe)
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=60) as c:
        c.post("/v1/events", json={"events": [_event("probe-acc", f"{tag}-p0", ts)]})   # probe's key warm
        prober.start()
        t0 = time.perf_counter()
        r = c.post("/v1/events", json={"events": batch})
        seconds = time.perf_counter() - t0
    done.set()
    prober.join()
    return {"seconds": round(seconds, 3), "status": r.status_code,
            "accepted": r.json().get("accepted") if r.status_code == 200 else None,
            "probe_median_s": round(statistics.median(probes), 3) if probes else None,
            "probe_max_s": round(max(probes), 3) if probes else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="5615909")
    p.add_argument("--households", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="keyfetch27-bench-"))
    sides = {"baseline": extract(args.baseline, work / "tree"), "fixed": ROOT}
    meshes = {label: start(label, root, work) for label, root in sides.items()}
    load0 = os.getloadavg()[0]
    try:
        for mesh, _ in meshes.values():
            mesh.wait_healthy(180)
        runs: dict[str, list[dict]] = {label: [] for label in sides}
        for n in range(args.rounds):
            order = list(sides) if n % 2 == 0 else list(sides)[::-1]
            for label in order:
                mesh, key = meshes[label]
                runs[label].append(one_round(mesh, key, args.households, f"r{n}"))
    finally:
        for mesh, _ in meshes.values():
            mesh.stop()
    result = {"households": args.households, "rounds": args.rounds, "baseline": args.baseline,
              "started_utc": _iso(started), "ended_utc": _iso(time.time()),
              "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "sides": {}}
    for label, rs in runs.items():
        result["sides"][label] = {
            "runs": rs, "median_s": statistics.median(r["seconds"] for r in rs),
            "statuses": [r["status"] for r in rs],
            "probe_median_s": statistics.median(r["probe_median_s"] for r in rs if r["probe_median_s"] is not None),
            "probe_max_s": max(r["probe_max_s"] for r in rs if r["probe_max_s"] is not None)}
    b, f = result["sides"]["baseline"], result["sides"]["fixed"]
    result["fixed_over_baseline_median"] = round(f["median_s"] / b["median_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
