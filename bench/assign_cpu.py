"""CPU per assign of every process of the running mesh, beside the transport floor and an
older commit's mesh or gateway, in one run (issue #11: where an assign's CPU goes).

    python -m bench.assign_cpu [--households 30] [--days 30] [--seconds 15] [--repeats 3]
                               [--concurrency 16] [--warmup-seconds 2] [--idle-seconds 5]
                               [--floor] [--baseline REF]
                               [--baseline-gateway REF] [--candidate-env K=V,...] [--profile DIR]
                               [--profile-processes clustering,privacy,gateway] [--gil]
                               [--mix OP=W,...] [--events-per-request N] [--stream-events] [--rate R]
    python -m bench.assign_cpu --top FILE

The one harness behind `make bench-assign-cpu` and `make bench-gateway` (bench/gateway.py
maps its options onto this one). It starts the mesh (every service and the gateway as
their own processes, SQLite, as `make run`), seeds households through the public HTTP API
(``bench.verify.seed_fitted_households``), then runs closed-loop ``POST /v1/assign``
(``bench.verify``'s assign mix: half by session id, half by feature vector, with an API
key) from its own process (bench/loadgen.py) against each *target* in turn, ``--repeats``
rounds, interleaved so that a change of machine load hits every target alike; it reads
each process's /proc utime+stime over every run. CPU milliseconds per completed assign is
the stable figure on a shared machine (throughput moves with the neighbours' load; the CPU
one request costs does not). The targets:

* ``candidate``: this checkout's mesh (``--candidate-env K=V,...``: with these variables set in
  its processes only, e.g. ``--baseline HEAD --candidate-env MALLOC_ARENA_MAX=2`` for what a
  setting costs);
* ``floor`` (``--floor``): the transport floor (bench/floor.py: FastAPI on the gateway's
  uvicorn settings, one grpc.aio call to an echo server, no Hearth logic); every target is
  then also quoted over it (saturation, gateway CPU over the floor's HTTP process CPU);
* ``baseline`` (``--baseline REF``): a second whole mesh run from commit REF's tree
  (``git archive``; this checkout's generated protobuf code is copied in, so REF must have
  the same protos), seeded the same way;
* ``gateway-baseline`` (``--baseline-gateway REF``): REF's gateway alone, in front of the
  candidate's services, so two gateways are compared on the same services and data.

``--mix`` replaces the assign mix by another of bench/loadgen.py's operations for the Hearth
targets (the floor keeps its assign): ``--mix events=1 --events-per-request 50`` measures
event ingest (``POST /v1/events`` of 50 new heartbeat events on one of a seeded household's
devices, through the gateway to clustering's store); every "per assign" figure is then per
request, and ``cpu_us_per_event`` divides each process's by ``--events-per-request``. Each
batch's events cover the last 30 s * N, so a device's batches overlap (each holds events
older than the device's previous batch's last: late events), and each batch rebuilds the
sessions it touches from their stored events: ingest costs more as a device's open session
grows, so a faster target would post more and pay more per event in a closed loop —
``--rate R`` sends R requests a second to every Hearth target instead (open loop), the same
events in each. ``--stream-events`` sends each device's batches as a client streams them,
every event after the device's previous one (spread over the time since it, millisecond
timestamps), which the store (since session 22) adds to the newest session's kept running
state instead (docs/clustering.md "Incremental sessions").

Per run it also splits the CPU of the gateway, clustering and privacy by thread (Python
thread names from ``py-spy dump``), and reads each process's idle CPU before the rounds.
``--profile DIR`` records ``--profile-processes`` of the candidate (and of the other
targets' gateways) with py-spy (``record -f raw``, idle frames dropped) during one extra
run each, ``--gil`` for Python CPU only; ``--top FILE`` summarises such a file.

Prints one JSON object last: ``{"targets": {label: {"cpu_ms_per_assign": {process:
median}, "assigns_per_s": median, "errors", "idle_cpu_ms_per_s", "threads", "runs"}},
"candidate": <its target>, "baseline": ..., "ratio": {process: candidate/baseline},
"over_floor": {label: {"saturation", "gateway_cpu", "total_cpu"}}, "profiles": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench._common import answers_health, cpu_model, cpu_times_s, log
from bench.floor import start_floor
from bench.verify import ASSIGN_ONLY, proc_sample, seed_fitted_households, summarise
from services.common.child_process import spawn_tied, stop_group
from services.testing.mesh import SERVICE_MODULES, Mesh, free_port, write_api_key
from services.testing.ports import serve_on_free_port

ROOT = Path(__file__).resolve().parents[1]
# The processes whose CPU is split by thread in every run (when the target has them).
THREAD_SPLIT = ("gateway", "clustering", "privacy")


def extract(ref: str, into: Path, own_protos: bool = False) -> Path:
    """The tree of commit ``ref`` in ``into``: with this checkout's generated protos (default,
    for a benchmark comparing two trees' code on the same messages), or with ``own_protos``
    its own, generated by its own scripts/gen_protos.py (a test of what that release does:
    this checkout's generated servicer bases list RPCs the older release never served, so on
    them its permission check answers PERMISSION_DENIED where the release as shipped answers
    UNIMPLEMENTED — no handler, nothing audited or counted; session 34)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if own_protos:
        made = subprocess.run([sys.executable, "scripts/gen_protos.py"], cwd=into, capture_output=True, text=True,
                              timeout=300)
        if made.returncode != 0:
            raise RuntimeError(f"{ref}'s scripts/gen_protos.py failed: {made.stdout}{made.stderr}")
        return into
    shutil.copytree(ROOT / "hearth", into / "hearth")
    # This checkout's code beside the older tree's protos/ on purpose (a newer release's
    # messages are a superset): without its stale-protos check (scripts/gen_protos.py),
    # which would refuse the pair; an empty digest says "not checked, on purpose" (a package
    # with none at all is refused as generated before the check existed: services/common).
    (into / "hearth" / "__init__.py").write_text('"""This checkout\'s generated code (bench/assign_cpu.py extract)."""\n'
                                                 'PROTOS_SHA256 = ""\n')
    return into


def thread_cpu(pid: int) -> dict[tuple[int, str], tuple[float, float]]:
    """(thread id, name) -> (user, system) CPU seconds of every thread of a process."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
            out[(int(task.name), comm)] = cpu_times_s((task / "stat").read_text())
        except OSError:
            continue
    return out


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name (``py-spy dump``), numbered pool threads
    under one name ("clustering-rpc_3" -> "clustering-rpc")."""
    try:
        out = subprocess.run([py_spy(), "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for m in re.finditer(r'^Thread (0x[0-9a-fA-F]+|\d+) \([^)]*\): "([^"]*)"', out, re.M):
        names[int(m.group(1), 0)] = re.sub(r"(_\d+|-\d+|\s*\(\w+\))$", "", m.group(2))
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


def profile_summary(raw: str, top: int = 25) -> dict:
    """py-spy's collapsed stacks (``-f raw``): the share of samples per frame, as the
    innermost frame (self) and anywhere on the stack (total)."""
    self_samples: Counter = Counter()
    total_samples: Counter = Counter()
    n = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        n += k
        frames = stack.split(";")
        self_samples[frames[-1]] += k
        for frame in set(frames):
            total_samples[frame] += k
    share = lambda c: {f: round(100 * s / n, 1) for f, s in c.most_common(top)}  # noqa: E731
    return {"samples": n, "self_pct": share(self_samples) if n else {}, "total_pct": share(total_samples) if n else {}}


def parse_env(text: str) -> dict[str, str]:
    """``K=V,K=V`` (``--candidate-env``) as a dict; a pair without ``=`` is refused."""
    env = {}
    for pair in filter(None, text.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--candidate-env: {pair!r} is not KEY=VALUE")
        env[key.strip()] = value.strip()
    return env


def parse_mix(text: str) -> dict[str, float]:
    """``OP=W,OP=W`` (``--mix``): bench/loadgen.py's operations and their weights."""
    mix = {}
    for pair in filter(None, text.split(",")):
        op, sep, weight = pair.partition("=")
        try:
            mix[op.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise SystemExit(f"--mix: {pair!r} is not OP=WEIGHT") from None
    return mix


def median(values) -> float | None:
    values = [x for x in values if x is not None]
    return round(statistics.median(values), 3) if values else None


@dataclass
class Target:
    """One thing assigns are sent to, and the processes whose CPU its assigns cost."""

    label: str
    url: str
    api_key: str
    households: list[dict]
    processes: dict[str, int]            # name -> pid; "gateway" is the HTTP process
    mix: dict = field(default_factory=lambda: dict(ASSIGN_ONLY))
    runs: list[dict] = field(default_factory=list)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    stream_events: bool = False          # --stream-events

    def run(self, seconds: float, concurrency: int, seed: int, work: Path, profile_dir: Path | None = None,
            profile_processes: tuple[str, ...] = (), gil: bool = False, events_per_request: int = 2,
            rate: float = 0.0) -> dict:
        spec = {"url": self.url, "urls": [self.url], "api_key": self.api_key, "households": self.households,
                "seed": seed, "timeout_s": 10.0, "max_connections": 512, "mix": self.mix,
                "mode": "open" if rate and self.label != "floor" else "closed", "rate": rate,
                "concurrency": concurrency, "duration_s": seconds, "events_per_request": events_per_request,
                "event_prefix": f"lg{seed}", "stream_events": self.stream_events}
        work.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = work / f"{seed:03d}-spec.json", work / f"{seed:03d}-result.json"
        spec_path.write_text(json.dumps(spec))
        spies = []
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            for name in profile_processes:
                if name in self.processes:
                    path = profile_dir / f"{self.label}-{name}{'-gil' if gil else ''}.txt"
                    spies.append((name, path, subprocess.Popen(
                        [py_spy(), "record", "-p", str(self.processes[name]), "-r", "100", "-d", str(int(seconds)),
                         "-f", "raw", "--nonblocking", *(["--gil"] if gil else []), "-o", str(path)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            time.sleep(0.5)
        split = {n: pid for n, pid in self.processes.items() if n in THREAD_SPLIT}
        threads0 = {n: thread_cpu(pid) for n, pid in split.items()}
        before = {n: proc_sample(pid) for n, pid in self.processes.items()}
        wall0 = time.time()
        gen = spawn_tied([sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        gen.wait()
        wall = time.time() - wall0
        after = {n: proc_sample(pid) for n, pid in self.processes.items()}
        threads1 = {n: thread_cpu(pid) for n, pid in split.items()}
        names = {n: python_thread_names(pid) for n, pid in split.items()}
        profiles = {}
        for name, path, spy in spies:   # py-spy lags on a loaded machine: SIGINT makes it write what it has
            try:
                spy.wait(seconds + 60)
            except subprocess.TimeoutExpired:
                spy.send_signal(2)
                spy.wait(60)
            profiles[name] = profile_summary(path.read_text() if path.exists() else "")
        raw = json.loads(out_path.read_text())
        summary = summarise(raw, spec)
        completed = max(1, summary["completed"])
        cpu = {n: round(1000 * (after[n][0] - before[n][0]) / completed, 3)
               for n in self.processes if before.get(n) and after.get(n)}
        run = {"assigns_per_s": summary["achieved"], "errors": summary["errors"], "p50_ms": summary["p50_ms"],
               "p99_ms": summary["p99_ms"], "wall_s": round(wall, 1), "cpu_ms_per_assign": cpu,
               "total_cpu_ms": round(sum(cpu.values()), 3),
               "loadgen_cpu_ms": round(1000 * raw["generator"]["cpu_s"] / completed, 3),
               "threads": {n: thread_split(threads0[n], threads1[n], completed, names[n]) for n in split}}
        if profile_dir is None:
            self.runs.append(run)
        else:
            run["profiles"] = profiles
        log(f"  {self.label}: {summary['achieved']} assigns/s, errors {summary['errors']}, CPU ms/assign {cpu}")
        return run

    def summary(self) -> dict:
        names = sorted({n for r in self.runs for n in r["cpu_ms_per_assign"]})
        threads = {p: {t: median(r["threads"].get(p, {}).get(t, {}).get("user", 0)
                                 + r["threads"].get(p, {}).get(t, {}).get("system", 0) for r in self.runs)
                       for t in sorted({t for r in self.runs for t in r["threads"].get(p, {})})}
                   for p in sorted({p for r in self.runs for p in r["threads"]})}
        return {"cpu_ms_per_assign": {n: median(r["cpu_ms_per_assign"].get(n) for r in self.runs) for n in names},
                "total_cpu_ms_per_assign": median(r["total_cpu_ms"] for r in self.runs),
                "assigns_per_s": median(r["assigns_per_s"] for r in self.runs),
                "errors": sum(r["errors"] for r in self.runs), "idle_cpu_ms_per_s": self.idle_cpu,
                "threads_cpu_ms_per_assign": threads, "runs": self.runs}


def idle_together(targets: list[Target], seconds: float) -> None:
    """Each target's ``idle_cpu``: CPU milliseconds per second of every process with no
    traffic (background threads: health checks, the prior rebuild, forwarders): what each
    process costs whatever the load, so a low assign rate on a busy machine inflates its
    per-assign figure by this divided by the rate. One window for every target: none has
    traffic then (until session 22 each read its own ``seconds``, one after the other)."""
    pids = {pid for t in targets for pid in t.processes.values()}
    before = {pid: proc_sample(pid) for pid in pids}
    time.sleep(seconds)
    after = {pid: proc_sample(pid) for pid in pids}
    for t in targets:
        t.idle_cpu = {n: round(1000 * (after[pid][0] - before[pid][0]) / seconds, 2)
                      for n, pid in t.processes.items() if before.get(pid) and after.get(pid)}
        log(f"  {t.label}: idle CPU ms/s {t.idle_cpu}")


class Harness:
    """The meshes, the floor and the baseline gateway of one run; stops all it started."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.meshes: list[Mesh] = []
        self.others: list[subprocess.Popen] = []
        self.targets: list[Target] = []
        self.mix = parse_mix(args.mix) if args.mix else dict(ASSIGN_ONLY)

    def start_mesh(self, label: str, root: Path, env: dict[str, str] | None = None) -> tuple[Mesh, str]:
        base = self.work / label.replace(" ", "-")
        mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", root=root, extra_env={
            "HEARTH_LOG_LEVEL": "WARNING",
            # Capacity, not the per-client token buckets, is measured.
            "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1_000_000, "burst": 1_000_000}), **(env or {})})
        mesh.data_dir.mkdir(parents=True, exist_ok=True)
        api_key = write_api_key(mesh.data_dir / "gateway-keys.json", "bench-admin", "admin")
        self.meshes.append(mesh)   # started by setup, both at once
        return mesh, api_key

    def seed(self, mesh: Mesh, api_key: str, label: str) -> list[dict]:
        started = time.monotonic()
        accounts = [f"hh-{i:04d}" for i in range(self.args.households)]
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": api_key}, timeout=60) as c:
            fitted = seed_fitted_households(c, accounts, random.Random(11), self.args.days, 600.0)
            households = []
            for account, h in fitted.items():
                closed = [s for s in h["sessions"] if s["feature_vector"]]
                households.append({"account_id": account, "sessions": [s["session_id"] for s in closed],
                                   "vector": closed[0]["feature_vector"],
                                   "devices": [(d["device_id"], d["device_type"]) for d in h["devices"]]})
            if len(households) < max(1, self.args.households // 2):
                raise RuntimeError(f"{label}: only {len(households)} of {self.args.households} households got a model")
            for i in range(50):   # decoded-model caches, keys, consent: warm before measuring
                h = households[i % len(households)]
                c.post("/v1/assign", json={"account_id": h["account_id"], "session_id": h["sessions"][0]})
        log(f"{label}: {len(households)} households seeded in {time.monotonic() - started:.0f}s")
        return households

    def start_floor(self) -> Target:
        procs, url = start_floor(self.work / "floor-logs")
        self.others.extend(procs.values())
        return Target("floor", url, "", [], {"gateway": procs["gateway"].pid, "echo": procs["echo"].pid},
                      mix={"floor_assign": 1.0})

    def start_old_gateway(self, ref: str, mesh: Mesh) -> str:
        """REF's gateway in front of ``mesh``'s services, with the same keys and settings;
        on a port another process took first it is started again on new ones
        (``serve_on_free_port``: its peers are only this bench's clients)."""
        tree = extract(ref, self.work / "gateway-baseline-tree")

        def env(port: int) -> dict[str, str]:
            return mesh.signing_env("gateway", {**mesh.env(), "PYTHONPATH": str(tree), "HEARTH_GATEWAY_PORT": str(port),
                                                "HEARTH_METRICS_PORT": str(free_port())})

        # cwd = the old tree: `python -m` puts the working directory first on sys.path.
        proc, port = serve_on_free_port(lambda _port: [sys.executable, "-m", "gateway"],
                                        self.work / "gateway-baseline.log", f"the gateway of {ref}", 180.0,
                                        env_for=env, cwd=tree)
        self.others.append(proc)
        url = f"http://127.0.0.1:{port}"
        if not answers_health(url):
            raise RuntimeError(f"the gateway of {ref} did not start (see {self.work}/gateway-baseline.log)")
        return url

    def setup(self) -> None:
        a = self.args
        sides = [("candidate", ROOT)]
        if a.baseline:
            sides.insert(0, ("baseline", extract(a.baseline, self.work / "baseline-tree")))
        envs = {"candidate": parse_env(a.candidate_env)}
        started = [(label, *self.start_mesh(label, root, envs.get(label))) for label, root in sides]
        floor = self.start_floor() if a.floor else None
        # Each started again on new ports if one was taken (services/testing/ports.py). From
        # the pool's threads: spawn_tied forks on a thread that lasts (a child's death signal
        # follows the thread that forked it: review35 R7, the meshes' "Connection refused").
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda s: s[1].start_healthy(180), started))
        # Both meshes at once: seeding mostly waits for each mesh's background fits, so the
        # second mesh's wait overlaps the first's instead of following it.
        with ThreadPoolExecutor(len(started)) as pool:
            seeded = list(pool.map(lambda s: self.seed(s[1], s[2], s[0]), started))
        for (label, mesh, api_key), households in zip(started, seeded):
            pids = {name: p.pid for name, p in mesh.processes.items()}
            self.targets.append(Target(label, mesh.url, api_key, households, pids, mix=dict(self.mix),
                                       stream_events=self.args.stream_events))
        if a.baseline_gateway:
            cand = self.targets[-1]
            mesh = self.meshes[-1]
            url = self.start_old_gateway(a.baseline_gateway, mesh)
            services = {n: pid for n, pid in cand.processes.items() if n in SERVICE_MODULES}
            self.targets.insert(-1, Target("gateway-baseline", url, cand.api_key, cand.households,
                                           {"gateway": self.others[-1].pid, **services}, mix=dict(self.mix),
                                           stream_events=self.args.stream_events))
        if floor is not None:
            self.targets.insert(0, floor)

    def stop(self) -> None:
        for mesh in self.meshes:
            mesh.stop()
        for proc in self.others:
            stop_group(proc, 15.0)


def report(args: argparse.Namespace, targets: list[Target], profiles: dict, load0: float, wall_s: float) -> dict:
    summaries = {t.label: t.summary() for t in targets}
    out = {"machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_average_before": round(load0, 2),
                       "load_average_after": round(os.getloadavg()[0], 2)},
           "households": args.households, "seconds": args.seconds, "repeats": args.repeats,
           "concurrency": args.concurrency, "mix": parse_mix(args.mix) if args.mix else dict(ASSIGN_ONLY),
           "events_per_request": args.events_per_request, "stream_events": args.stream_events,
           "rate": args.rate or None, "baseline_ref": args.baseline or None,
           "baseline_gateway_ref": args.baseline_gateway or None, "candidate_env": parse_env(args.candidate_env),
           "targets": summaries, "candidate": summaries["candidate"], "profiles": profiles,
           "wall_s": round(wall_s, 1)}
    if args.mix and set(parse_mix(args.mix)) == {"events"}:
        for label, s in summaries.items():
            if label == "floor":
                continue
            s["cpu_us_per_event"] = {n: round(1000 * v / args.events_per_request, 2)
                                     for n, v in s["cpu_ms_per_assign"].items() if v is not None}
    if "baseline" in summaries:
        base, cand = summaries["baseline"], summaries["candidate"]
        out["baseline"] = base
        out["ratio"] = {n: round(v / base["cpu_ms_per_assign"][n], 3)
                        for n, v in cand["cpu_ms_per_assign"].items() if v and base["cpu_ms_per_assign"].get(n)}
    floor = summaries.get("floor")
    if floor and floor["assigns_per_s"] and floor["cpu_ms_per_assign"].get("gateway"):
        out["over_floor"] = {
            label: {"saturation": round(s["assigns_per_s"] / floor["assigns_per_s"], 3),
                    "gateway_cpu": round(s["cpu_ms_per_assign"]["gateway"] / floor["cpu_ms_per_assign"]["gateway"], 2),
                    "total_cpu": round(s["total_cpu_ms_per_assign"] / floor["total_cpu_ms_per_assign"], 2)}
            for label, s in summaries.items() if label != "floor" and s["assigns_per_s"]}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CPU per assign of every process of the mesh, beside the floor "
                                            "and an older commit")
    p.add_argument("--households", type=int, default=30)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup-seconds", type=float, default=2.0,
                   help="the uncounted warm-up run of each target (imports, connections, caches)")
    p.add_argument("--idle-seconds", type=float, default=5.0,
                   help="how long each target's idle CPU is measured before the rounds")
    p.add_argument("--floor", action="store_true", help="measure the transport floor in the same rounds")
    p.add_argument("--baseline", default="", help="git commit whose whole mesh runs beside this checkout's")
    p.add_argument("--baseline-gateway", default="",
                   help="git commit whose gateway runs in front of this checkout's services")
    p.add_argument("--candidate-env", default="",
                   help="K=V,K=V set for the candidate mesh's processes only (with --baseline HEAD: the same "
                        "code with and without a setting, e.g. allocator variables)")
    p.add_argument("--mix", default="", help="OP=W,... of bench/loadgen.py's operations instead of the assign "
                                             "mix (e.g. events=1: event ingest)")
    p.add_argument("--events-per-request", type=int, default=2, help="events a POST /v1/events carries")
    p.add_argument("--stream-events", action="store_true",
                   help="with --mix events: each device's batches continue its stream (every event after its "
                        "previous one, as a client sends them); without it each batch covers the last 30 s * N, "
                        "overlapping the device's previous batch (late events)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="requests a second to each Hearth target, open loop (0: closed loop, --concurrency)")
    p.add_argument("--profile", type=Path, default=None, help="py-spy the targets into this directory")
    p.add_argument("--profile-processes", default="clustering,privacy,gateway")
    p.add_argument("--profile-seconds", type=float, default=None, help="default: --seconds")
    p.add_argument("--gil", action="store_true", help="with --profile: only the thread holding the GIL")
    p.add_argument("--out", type=Path, default=None, help="keep the meshes' logs and runs here")
    p.add_argument("--top", type=Path, default=None, help="summarise a py-spy raw file and exit")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.top:
        summary = profile_summary(args.top.read_text(), top=40)
        print(json.dumps(summary))
        return summary
    load0, started = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="hearth-assign-cpu-") as tmp:
        work = (args.out or Path(tmp)).resolve()
        harness = Harness(work, args)
        profiles: dict = {}
        try:
            harness.setup()
            targets = harness.targets
            # One short warm-up of each target (imports, connections, caches) that is not counted.
            seed = 0
            for t in targets:
                seed += 1
                t.run(args.warmup_seconds, args.concurrency, seed, work / "runs",
                      events_per_request=args.events_per_request, rate=args.rate)
                t.runs.clear()
            idle_together(targets, args.idle_seconds)
            for r in range(args.repeats):
                log(f"round {r + 1}/{args.repeats}")
                for t in targets:
                    seed += 1
                    t.run(args.seconds, args.concurrency, seed, work / "runs",
                          events_per_request=args.events_per_request, rate=args.rate)
            if args.profile is not None:
                wanted = tuple(filter(None, args.profile_processes.split(",")))
                for t in targets:
                    seed += 1
                    # Another target's services are the candidate's: profile only its gateway.
                    procs = wanted if t.label in ("candidate", "baseline") else tuple(p for p in wanted if p == "gateway")
                    profiles[t.label] = t.run(args.profile_seconds or args.seconds, args.concurrency, seed,
                                              work / "runs", profile_dir=args.profile, profile_processes=procs,
                                              gil=args.gil, events_per_request=args.events_per_request,
                                              rate=args.rate)["profiles"]
                (args.profile / "summary.json").write_text(json.dumps(profiles, indent=1))
        finally:
            harness.stop()
        out = report(args, harness.targets, profiles, load0, time.time() - started)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
