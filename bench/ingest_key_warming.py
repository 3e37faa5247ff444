"""Ingest of a batch of new households, one event each, against two meshes at once: this
checkout and a baseline commit's tree (``--baseline``, default 5615909: main before
keyfetch27's warming). Each round posts a fresh batch (new accounts: every data key cold)
to each mesh in alternating order, while a probe posts one event of a known household
every 0.2 s to the same mesh — the "every other write waits" half of attack27's finding.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_key_warming --households 1000 --rounds 5
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_key_warming --baseline ed5316b --households 5000 \
        --rounds 3 --out /tmp/ingest-5000.json
    ... --known: each round's households' second event (their first posted before, untimed)
    ... --py-spy DIR: py-spy records clustering's process during each timed batch (DIR/<side>-r<n>.txt)
    ... --refresh: after each batch, the background model refresh it queued (one a household)
        watched until clustering is idle: its seconds and clustering's and feedback's CPU
        seconds meanwhile, from /proc (ingest32: the refresh's variants in one call)

JSON (printed, and written to ``--out``): per side, the batch's seconds and status of each
round, their median, the probes' median and max seconds, the fixed/baseline ratio of the
medians, the load average, the UTC start and end."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    return mesh, key   # started by main, both at once


def _spy(mesh: Mesh, out: Path | None) -> subprocess.Popen | None:
    """py-spy recording clustering's process (collapsed stacks, ``out``) until stopped."""
    if out is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "--nonblocking", "--rate", "100", "--format", "raw", "-o", str(out),
                             "-p", str(mesh.processes["clustering"].pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch_refresh(mesh: Mesh, limit_s: float = 600.0) -> dict:
    """From now until clustering has been idle for two seconds running (< 0.03 CPU-s a
    second: its refresh queue done), or ``limit_s``: the seconds to the last busy second, and
    clustering's and feedback's CPU seconds in between."""
    pids = {name: mesh.processes[name].pid for name in ("clustering", "feedback")}
    start = {name: _cpu_s(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    last, busy_until, quiet = start["clustering"], 0.0, 0
    while quiet < 2 and time.perf_counter() - t0 < limit_s:
        time.sleep(1.0)
        now = _cpu_s(pids["clustering"])
        if now - last < 0.03:
            quiet += 1
        else:
            quiet, busy_until = 0, time.perf_counter() - t0
        last = now
    return {"refresh_s": round(busy_until, 1),
            **{f"{name}_cpu_s": round(_cpu_s(pid) - start[name], 2) for name, pid in pids.items()}}


def one_round(mesh: Mesh, key: str, households: int, tag: str, known: bool = False,
              spy_out: Path | None = None, refresh: bool = False) -> dict:
    ts = time.time() - 3600
    batch = [_event(f"{tag}-{i}", f"{tag}-e{i}", ts) for i in range(households)]
    if known:   # the households' first events stored first (untimed, 500 a request): the batch is their second
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=120) as c:
            for start in range(0, households, 500):
                for _ in range(3):   # a 504 stored nothing: sent again (idempotent event ids)
                    first = c.post("/v1/events", json={"events": batch[start:start + 500]})
                    if first.status_code == 200:
                        break
                assert first.status_code == 200, first.text[:300]
        batch = [_event(f"{tag}-{i}", f"{tag}-f{i}", ts + 60.0) for i in range(households)]
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
        spy = _spy(mesh, spy_out)
        t0 = time.perf_counter()
        r = c.post("/v1/events", json={"events": batch})
        seconds = time.perf_counter() - t0
        if spy is not None:
            time.sleep(0.5)   # the commit and the answer's last work
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
    done.set()
    prober.join()
    return {"seconds": round(seconds, 3), "status": r.status_code,
            "accepted": r.json().get("accepted") if r.status_code == 200 else None,
            "probe_median_s": round(statistics.median(probes), 3) if probes else None,
            "probe_max_s": round(max(probes), 3) if probes else None,
            **(watch_refresh(mesh) if refresh else {})}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="5615909")
    p.add_argument("--households", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default=None)
    p.add_argument("--py-spy", default=None, metavar="DIR",
                   help="record clustering with py-spy during each timed batch (collapsed stacks in DIR)")
    p.add_argument("--known", action="store_true",
                   help="time each round's households' second event (the batch of known households), "
                        "their first posted before, untimed")
    p.add_argument("--refresh", action="store_true",
                   help="after each batch, watch the model refresh it queued until clustering is idle")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="keyfetch27-bench-"))
    sides = {"baseline": extract(args.baseline, work / "tree"), "fixed": ROOT}
    meshes = {label: start(label, root, work) for label, root in sides.items()}
    load0 = os.getloadavg()[0]
    try:
        with ThreadPoolExecutor(len(meshes)) as pool:   # each started again on new ports if one was taken
            list(pool.map(lambda m: m[0].start_healthy(180), meshes.values()))
        runs: dict[str, list[dict]] = {label: [] for label in sides}
        for n in range(args.rounds):
            order = list(sides) if n % 2 == 0 else list(sides)[::-1]
            for label in order:
                mesh, key = meshes[label]
                spy_out = Path(args.py_spy) / f"{label}-r{n}.txt" if args.py_spy else None
                runs[label].append(one_round(mesh, key, args.households, f"r{n}", args.known, spy_out, args.refresh))
    finally:
        for mesh, _ in meshes.values():
            mesh.stop()
    result = {"households": args.households, "rounds": args.rounds, "baseline": args.baseline, "known": args.known,
              "started_utc": _iso(started), "ended_utc": _iso(time.time()),
              "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "sides": {}}
    for label, rs in runs.items():
        result["sides"][label] = {
            "runs": rs, "median_s": statistics.median(r["seconds"] for r in rs),
            "statuses": [r["status"] for r in rs],
            "probe_median_s": statistics.median(r["probe_median_s"] for r in rs if r["probe_median_s"] is not None),
            "probe_max_s": max(r["probe_max_s"] for r in rs if r["probe_max_s"] is not None)}
        if args.refresh:
            for k in ("refresh_s", "clustering_cpu_s", "feedback_cpu_s"):
                result["sides"][label][f"median_{k}"] = statistics.median(r[k] for r in rs)
    b, f = result["sides"]["baseline"], result["sides"]["fixed"]
    result["fixed_over_baseline_median"] = round(f["median_s"] / b["median_s"], 3)
    if args.refresh:
        result["refresh_fixed_over_baseline"] = {
            k: round(f[f"median_{k}"] / b[f"median_{k}"], 3) if b[f"median_{k}"] else None
            for k in ("refresh_s", "clustering_cpu_s", "feedback_cpu_s")}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
