"""CPU per assign of every process of the running mesh, optionally beside another commit's
mesh in the same run (issue #11: the clustering and audit share of an assign).

    python -m bench.assign_cpu [--households 30] [--seconds 15] [--repeats 3]
                               [--concurrency 16] [--baseline REF] [--profile DIR]

Starts the mesh (every service and the gateway as their own processes, SQLite, as
`make run`), seeds households through the public HTTP API, waits for their models, then
runs closed-loop assign traffic (``bench.verify``'s assign mix: half by session id, half
by feature vector, through the gateway with an API key) in its own process
(bench/loadgen.py) and reads each process's /proc utime+stime over the run: CPU
milliseconds per completed assign, per process. On a shared machine this is the stable
figure (throughput moves with the neighbours' load; the CPU one request costs does not).

``--baseline REF`` also starts a second mesh from the git commit REF (extracted with
``git archive`` into a temporary directory; the generated protobuf code of this checkout
is copied in, so REF must have the same protos), seeds it the same way, and alternates
the runs (baseline, candidate, baseline, ...): the report gives both medians and their
ratio, measured under the same machine load.

``--profile DIR`` records the candidate's clustering and privacy processes with py-spy
(``record --format raw``, 100 Hz, idle frames dropped) during one extra run and writes
the collapsed stacks to DIR, then again with ``--gil`` (Python CPU only) (summarise them with ``python -m bench.assign_cpu --top FILE``).

Prints one JSON object last: ``{"candidate": {...}, "baseline": {...}, "ratio": {...}}``
where each side is ``{"cpu_ms_per_assign": {process: median}, "assigns_per_s": median,
"runs": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench._common import cpu_model, log
from bench.verify import ASSIGN_ONLY, TICK, proc_sample, seed_fitted_households, summarise
from services.common.child_process import spawn_tied
from services.testing.mesh import Mesh, write_api_key

ROOT = Path(__file__).resolve().parents[1]


def thread_cpu(pid: int) -> dict[tuple[int, str], tuple[float, float]]:
    """(thread id, name) -> (user, system) CPU seconds of every thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(int(task.name), comm)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name (``py-spy dump``), numbered pool threads
    under one name ("clustering-rpc_3" -> "clustering-rpc")."""
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "-p", str(pid)],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for m in re.finditer(r'^Thread (0x[0-9a-fA-F]+|\d+) \([^)]*\): "([^"]*)"', out, re.M):
        tid = int(m.group(1), 0)
        names[tid] = re.sub(r"(_\d+|-\d+|\s*\(\w+\))$", "", m.group(2))
    return names


def thread_split(before: dict, after: dict, completed: int, names: dict[int, str] | None = None
                 ) -> dict[str, dict[str, float]]:
    """CPU ms per assign by thread name (threads of one name summed), user and system;
    ``names`` maps native ids to Python thread names (else the OS name, "python")."""
    split: dict[str, list[float]] = {}
    for key, (user, system) in after.items():
        u0, s0 = before.get(key, (0.0, 0.0))
        acc = split.setdefault((names or {}).get(key[0], key[1]), [0.0, 0.0])
        acc[0] += user - u0
        acc[1] += system - s0
    rows = {name: {"user": round(1000 * u / completed, 3), "system": round(1000 * s / completed, 3)}
            for name, (u, s) in split.items() if u + s > 0}
    return dict(sorted(rows.items(), key=lambda kv: -(kv[1]["user"] + kv[1]["system"])))


def extract(ref: str, into: Path) -> Path:
    """The tree of commit ``ref`` in ``into``, with this checkout's generated protos
    (``--baseline``; the mesh then runs from that tree: ``Mesh(root=...)``)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copytree(ROOT / "hearth", into / "hearth")
    return into


class Side:
    """One mesh, seeded, and the runs measured on it."""

    def __init__(self, label: str, root: Path, base: Path) -> None:
        self.label = label
        self.mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", root=root, extra_env={
            "HEARTH_LOG_LEVEL": "WARNING",
            # Capacity, not the per-client token buckets, is measured.
            "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1_000_000, "burst": 1_000_000})})
        self.base = base
        self.mesh.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_key = write_api_key(self.mesh.data_dir / "gateway-keys.json", "bench-admin", "admin")
        self.households: list[dict] = []
        self.runs: list[dict] = []
        self.idle_cpu: dict[str, float] = {}

    def start(self) -> None:
        self.mesh.start()

    def seed(self, households: int, days: int, timeout_s: float = 600.0) -> None:
        rng = random.Random(11)
        accounts = [f"hh-{i:04d}" for i in range(households)]
        with httpx.Client(base_url=self.mesh.url, headers={"X-API-Key": self.api_key}, timeout=60) as c:
            fitted = seed_fitted_households(c, accounts, rng, days, timeout_s)
        for account, h in fitted.items():
            closed = [s for s in h["sessions"] if s["feature_vector"]]
            self.households.append({"account_id": account, "sessions": [s["session_id"] for s in closed],
                                    "vector": closed[0]["feature_vector"], "devices": []})
        if len(self.households) < households // 2:
            raise RuntimeError(f"{self.label}: only {len(self.households)} of {households} households got a model")

    def warm(self, n: int = 50) -> None:
        """A few assignments of every household (decoded-model caches, keys, consent)."""
        with httpx.Client(base_url=self.mesh.url, headers={"X-API-Key": self.api_key}, timeout=60) as c:
            for i in range(n):
                h = self.households[i % len(self.households)]
                c.post("/v1/assign", json={"account_id": h["account_id"], "session_id": h["sessions"][0]})

    def idle(self, seconds: float = 5.0) -> dict[str, float]:
        """CPU milliseconds per second of every process with no traffic (background
        threads: health checks, the prior rebuild, forwarders): what each process costs
        whatever the load, so a low assign rate on a busy machine inflates its per-assign
        figure by this divided by the rate."""
        pids = {name: p.pid for name, p in self.mesh.processes.items()}
        before = {n: proc_sample(pid) for n, pid in pids.items()}
        time.sleep(seconds)
        after = {n: proc_sample(pid) for n, pid in pids.items()}
        self.idle_cpu = {n: round(1000 * (after[n][0] - before[n][0]) / seconds, 2)
                         for n in pids if before.get(n) and after.get(n)}
        log(f"  {self.label}: idle CPU ms/s {self.idle_cpu}")
        return self.idle_cpu

    def run(self, seconds: float, concurrency: int, seed: int, profile_dir: Path | None = None,
            gil: bool = False) -> dict:
        spec = {"url": self.mesh.url, "urls": [self.mesh.url], "api_key": self.api_key, "households": self.households,
                "seed": seed, "timeout_s": 10.0, "max_connections": 512, "mix": ASSIGN_ONLY, "mode": "closed",
                "concurrency": concurrency, "duration_s": seconds}
        runs = self.base / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = runs / f"{seed:03d}-spec.json", runs / f"{seed:03d}-result.json"
        spec_path.write_text(json.dumps(spec))
        pids = {name: p.pid for name, p in self.mesh.processes.items()}
        spies = []
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            for name in ("clustering", "privacy", "gateway"):
                spies.append(subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pids[name]), "-r", "100",
                     "-d", str(int(seconds)), "-f", "raw", *(["--gil"] if gil else []),
                     "-o", str(profile_dir / f"{name}{'-gil' if gil else ''}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        threads0 = {n: thread_cpu(pids[n]) for n in ("clustering", "privacy")}
        before = {n: proc_sample(pid) for n, pid in pids.items()}
        wall0 = time.time()
        gen = spawn_tied([sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        gen.wait()
        wall = time.time() - wall0
        after = {n: proc_sample(pid) for n, pid in pids.items()}
        threads1 = {n: thread_cpu(pids[n]) for n in threads0}
        names = {n: python_thread_names(pids[n]) for n in threads0}
        for spy in spies:   # py-spy lags on a loaded machine: SIGINT makes it write what it has
            try:
                spy.wait(seconds + 60)
            except subprocess.TimeoutExpired:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        raw = json.loads(out_path.read_text())
        summary = summarise(raw, spec)
        completed = max(1, summary["completed"])
        cpu = {n: round(1000 * (after[n][0] - before[n][0]) / completed, 3)
               for n in pids if before.get(n) and after.get(n)}
        cpu["loadgen"] = round(1000 * raw["generator"]["cpu_s"] / completed, 3)
        run = {"assigns_per_s": summary["achieved"], "errors": summary["errors"], "p50_ms": summary["p50_ms"],
               "p99_ms": summary["p99_ms"], "wall_s": round(wall, 1), "cpu_ms_per_assign": cpu,
               "profiled": profile_dir is not None,
               "threads": {n: thread_split(threads0[n], threads1[n], completed, names[n]) for n in threads0}}
        if profile_dir is None:
            self.runs.append(run)
        log(f"  {self.label}: {summary['achieved']} assigns/s, errors {summary['errors']}, CPU ms/assign {cpu}")
        return run

    def summary(self) -> dict:
        if not self.runs:   # --repeats 0: only the profile was wanted
            return {"cpu_ms_per_assign": {}, "assigns_per_s": None, "errors": 0,
                    "idle_cpu_ms_per_s": self.idle_cpu, "runs": []}
        names = sorted({n for r in self.runs for n in r["cpu_ms_per_assign"]})
        return {"cpu_ms_per_assign": {n: round(statistics.median(r["cpu_ms_per_assign"][n] for r in self.runs
                                                                 if n in r["cpu_ms_per_assign"]), 3)
                                      for n in names},
                "assigns_per_s": round(statistics.median(r["assigns_per_s"] for r in self.runs), 1),
                "errors": sum(r["errors"] for r in self.runs), "idle_cpu_ms_per_s": self.idle_cpu,
                "runs": self.runs}

    def stop(self) -> None:
        self.mesh.stop()


def top(path: Path, n: int = 40) -> None:
    """Inclusive share of the samples per function of py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for frame in set(frames):
            inclusive[frame] += k
    print(f"{path}: {total} samples; inclusive:")
    for frame, k in inclusive.most_common(n):
        print(f"{100 * k / total:6.1f} %  {frame}")
    print("own (leaf):")
    for frame, k in own.most_common(n // 2):
        print(f"{100 * k / total:6.1f} %  {frame}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="CPU per assign of every process of the mesh")
    parser.add_argument("--households", type=int, default=30)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline", default="", help="git commit to measure beside this checkout")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the candidate into this directory")
    parser.add_argument("--top", type=Path, default=None, help="summarise a py-spy raw file and exit")
    args = parser.parse_args(argv)
    if args.top:
        top(args.top)
        return {}
    with tempfile.TemporaryDirectory(prefix="hearth-assign-cpu-") as tmp:
        tmp_path = Path(tmp)
        sides = [Side("candidate", ROOT, tmp_path / "candidate")]
        if args.baseline:
            sides.insert(0, Side(f"baseline {args.baseline}", extract(args.baseline, tmp_path / "baseline-tree"),
                                 tmp_path / "baseline"))
        try:
            for side in sides:
                side.start()
            for side in sides:
                side.mesh.wait_healthy(180)
            for side in sides:
                started = time.monotonic()
                side.seed(args.households, args.days)
                side.warm()
                log(f"{side.label}: {len(side.households)} households seeded in {time.monotonic() - started:.0f}s")
            for side in sides:
                side.idle()
            seed = 0
            for _ in range(args.repeats):
                for side in sides:
                    seed += 1
                    side.run(args.seconds, args.concurrency, seed)
            if args.profile is not None:
                seed += 1
                sides[-1].run(args.seconds, args.concurrency, seed, profile_dir=args.profile)
                seed += 1   # Python CPU only: samples of the thread holding the GIL
                sides[-1].run(args.seconds, args.concurrency, seed, profile_dir=args.profile, gil=True)
        finally:
            for side in sides:
                side.stop()
    report = {"machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
                          "load_average": os.getloadavg()},
              "households": args.households, "seconds": args.seconds, "repeats": args.repeats,
              "concurrency": args.concurrency, "candidate": sides[-1].summary()}
    if args.baseline:
        base, cand = sides[0].summary(), report["candidate"]
        report["baseline"] = base
        report["baseline_ref"] = args.baseline
        report["ratio"] = {n: round(cand["cpu_ms_per_assign"][n] / base["cpu_ms_per_assign"][n], 3)
                           for n in cand["cpu_ms_per_assign"] if base["cpu_ms_per_assign"].get(n)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
