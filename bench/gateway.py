"""`make bench-gateway`: the gateway's CPU per request, beside the transport floor, in one run.

    python -m bench.gateway [--baseline REF] [--rounds 3] [--seconds 8] [--concurrency 16]
                            [--households 12] [--py-spy DIR]

Starts the transport floor (``bench/floor.py``) and the mesh as real processes (SQLite),
seeds a few households through the HTTP API (``bench.verify``'s seeding), then runs
closed-loop ``POST /v1/assign`` (half by session, half by vector; the floor gets its own
assign) against each target in turn, ``--rounds`` times, interleaved so that a change of
machine load hits every target alike. Per run it reads every process's CPU from /proc.

``--baseline REF`` also starts the gateway of an older commit (``git archive REF``) on
its own port, in front of the *same* services, so before and after are measured in the
same run on the same data. ``--py-spy DIR`` records the gateway (``py-spy record
--idle=false -f raw``) during one extra run of each gateway and writes the collapsed
stacks and a summary of the top frames there.

Figures (medians over rounds): saturation (req/s), gateway CPU ms per request, the
whole mesh's CPU ms per request, each target's saturation over the floor's and its
gateway CPU over the floor's HTTP process CPU. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import httpx

from bench._common import cpu_model, log
from bench.verify import ASSIGN_ONLY, QUICK, TICK, Verify
from services.common.child_process import spawn_tied
from services.testing.mesh import free_port

ROOT = Path(__file__).resolve().parents[1]
MESH_PROCESSES = ("clustering", "privacy", "feedback", "attribution")


def start_baseline_gateway(v: Verify, ref: str) -> str:
    """The gateway of commit ``ref`` (its whole tree, so its imports are its own), in
    front of the same services, with the same keys and settings; returns its URL."""
    src = v.out / f"baseline-{ref}"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    shutil.copytree(ROOT / "hearth", src / "hearth")   # generated protos (never committed)
    port, metrics_port = free_port(), free_port()
    env = {**v.mesh.env(), "PYTHONPATH": str(src), "HEARTH_GATEWAY_PORT": str(port),
           "HEARTH_METRICS_PORT": str(metrics_port)}
    log_file = open(v.out / "logs" / "gateway-baseline.log", "ab")
    # cwd = the old tree: `python -m` puts the working directory first on sys.path.
    v.mesh.processes["gateway-baseline"] = spawn_tied([sys.executable, "-m", "gateway"], cwd=src, env=env,
                                                      stdout=log_file, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the baseline gateway ({ref}) did not start (see logs/gateway-baseline.log)")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of one process (threads of one name summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def one_run(v: Verify, target: str, url: str, gateway_process: str, seconds: float, concurrency: int) -> dict:
    pid = (v.floor_procs["gateway"] if target == "floor" else v.mesh.processes[gateway_process]).pid
    threads0 = thread_cpu(pid)
    if target == "floor":
        spec = v.spec(url=url, urls=[url], api_key="", households=[], mix={"floor_assign": 1.0},
                      mode="closed", concurrency=concurrency, duration_s=seconds)
    else:
        spec = v.spec(url=url, urls=[url], mix=ASSIGN_ONLY, mode="closed", concurrency=concurrency,
                      duration_s=seconds)
    run = v.run_load(target, spec, include_floor=True)
    threads1 = thread_cpu(pid)
    completed = max(1, run["completed"])
    by_thread = {name: round(1000 * (threads1[name] - threads0.get(name, 0.0)) / completed, 3)
                 for name in threads1 if threads1[name] - threads0.get(name, 0.0) > 0}
    cpu = {name: p["cpu_ms_per_request"] for name, p in run["processes"].items()}
    mesh_cpu = None if target == "floor" else round(cpu[gateway_process] + sum(cpu.get(s, 0) for s in MESH_PROCESSES), 3)
    return {"achieved_rps": run["achieved"], "errors": run["errors"], "p99_ms": run["p99_ms"],
            "gateway_cpu_ms": cpu[gateway_process],
            "total_cpu_ms": round(cpu["floor-gateway"] + cpu["floor-echo"], 3) if target == "floor" else mesh_cpu,
            "cpu_ms_by_process": cpu, "gateway_cpu_ms_by_thread": by_thread}


def profile_gateway(v: Verify, target: str, url: str, process: str, pid: int, seconds: float,
                    concurrency: int, out: Path) -> dict:
    """py-spy on one gateway during a closed-loop run; the top frames by self and total samples."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = out / f"{target}.txt"
    recorder = subprocess.Popen([py_spy, "record", "-p", str(pid), "-r", "200", "-d", str(int(seconds)),
                                 "-f", "raw", "-o", str(raw), "--nonblocking", *(["--gil"] if os.environ.get("BENCH_PY_SPY_GIL") else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run = one_run(v, target, url, process, seconds, concurrency)
    recorder.wait(30)
    return {**summarise_profile(raw), "requests": round(run["achieved_rps"] * seconds),
            "gateway_cpu_ms": run["gateway_cpu_ms"]}


def summarise_profile(raw: Path, top: int = 25) -> dict:
    self_samples: Counter = Counter()
    total_samples: Counter = Counter()
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        n += k
        frames = stack.split(";")
        self_samples[frames[-1]] += k
        for frame in set(frames):
            total_samples[frame] += k
    share = lambda c: {f: round(100 * s / n, 1) for f, s in c.most_common(top)}  # noqa: E731
    return {"samples": n, "self_pct": share(self_samples), "total_pct": share(total_samples)}


def median(values) -> float | None:
    values = [x for x in values if x is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Gateway CPU per assign beside the transport floor")
    parser.add_argument("--baseline", default="", help="git ref whose gateway runs beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--households", type=int, default=12)
    parser.add_argument("--py-spy", type=Path, default=None, help="directory for py-spy profiles of each gateway")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or ROOT / "var" / "bench-gateway" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = replace(QUICK, households=args.households, victims=0, attribution_accounts=0)
    v = Verify(argparse.Namespace(quick=True, backend="sqlite", replicas=1), profile, out)
    started = time.time()
    load0 = os.getloadavg()[0]
    try:
        v.start_floor()
        v.start_mesh()
        v.seed()
        targets = {"floor": (v.floor_url, "floor-gateway"), "gateway": (v.mesh.url, "gateway")}
        if args.baseline:
            targets["gateway-baseline"] = (start_baseline_gateway(v, args.baseline), "gateway-baseline")
        # One short warm-up of each target (imports, connections, caches) that is not counted.
        for name, (url, proc) in targets.items():
            one_run(v, name, url, proc, 2.0, args.concurrency)
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            for name, (url, proc) in targets.items():
                runs[name].append(one_run(v, name, url, proc, args.seconds, args.concurrency))
        profiles = {}
        if args.py_spy is not None:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            for name, (url, proc) in targets.items():
                pid = (v.floor_procs["gateway"] if name == "floor" else v.mesh.processes[proc]).pid
                profiles[name] = profile_gateway(v, name, url, proc, pid, args.profile_seconds,
                                                 args.concurrency, args.py_spy)
            (args.py_spy / "summary.json").write_text(json.dumps(profiles, indent=1))
    finally:
        v.stop()
    summary = {name: {"saturation_rps": median(x["achieved_rps"] for x in rs),
                      "gateway_cpu_ms_per_request": median(x["gateway_cpu_ms"] for x in rs),
                      "total_cpu_ms_per_request": median(x["total_cpu_ms"] for x in rs),
                      "gateway_cpu_ms_by_thread": {t: median(x["gateway_cpu_ms_by_thread"].get(t) for x in rs)
                                                   for t in sorted({t for x in rs for t in x["gateway_cpu_ms_by_thread"]})},
                      "errors": sum(x["errors"] for x in rs)} for name, rs in runs.items()}
    floor = summary["floor"]
    for name, s in summary.items():
        if name != "floor":
            s["saturation_over_floor"] = round(s["saturation_rps"] / floor["saturation_rps"], 3)
            s["gateway_cpu_over_floor_http_cpu"] = round(s["gateway_cpu_ms_per_request"]
                                                         / floor["gateway_cpu_ms_per_request"], 2)
    report = {"bench": "gateway", "date": stamp, "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                                             "loadavg_before": round(load0, 2),
                                                             "loadavg_after": round(os.getloadavg()[0], 2)},
              "settings": {"rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency,
                           "households": len(v.households), "baseline": args.baseline or None},
              "summary": summary, "runs": runs, "profiles": profiles,
              "wall_s": round(time.time() - started, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"report: {out / 'report.json'}")
    print(json.dumps({k: report[k] for k in ("bench", "date", "machine", "settings", "summary", "wall_s")}))
    return report


if __name__ == "__main__":
    main()
