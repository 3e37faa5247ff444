"""A full PostgreSQL volume under load, through real processes (session 25, disk25).

    sudo .venv/bin/python -m bench.pg_full_disk [--size-mb 96] [--hold-s 20] [--threads 4]
                                                [--switch-wal] [--out /tmp/disk25-pgdrill]
    sudo .venv/bin/python -m bench.pg_full_disk --backend sqlite --size-mb 64 --kill clustering
                                                [--reserve-mb 0]

Needs root: PostgreSQL's data directory goes on a tmpfs of its own (``mount -t tmpfs``),
started with the production defaults (fsync on) by ``services.testing.servers``; the mesh
runs on ``HEARTH_STORAGE=postgres`` with its data directory (disk outboxes, keys, logs)
elsewhere, as in a deployment where the database has its own volume. Client threads send
event batches and read households through the gateway; after a warm-up the volume is
filled with a file (kept full for ``--hold-s``), then the file is removed. A postmaster
that exits meanwhile (a PANIC its restart cannot get past) is started again once the
space is back, as an orchestrator would.

With ``--backend sqlite`` the volume holds the mesh's data directory instead (every SQLite
database, the audit outboxes and reserve files: session 24's drill); ``--kill SERVICE``
SIGKILLs that service half-way through the hold (holding audit records) and starts it
again once the space is back; ``--reserve-mb`` sets ``HEARTH_AUDIT_RESERVE_MB`` (0: the
held records die with the process).

What it reports (one JSON object on stdout): the clients' answers per phase (status codes,
Retry-After, the distinct error bodies, any 5xx other than 503), the health timeline (the
gateway's /health, ``hearth_dependency_up`` of ``database`` and ``database writes``,
``hearth_audit_records_held``, the outboxes' depth, audit records dropped), the recovery
times after the space came back, PostgreSQL's PANICs and restarts from its log, every
acknowledged event looked for in its household's export (and no batch stored in part),
and the audit log: exported, verified (``hearth audit verify``), every request answered 200
looked for by its trace id (``x-trace-id``), and its entries per RPC and status compared
with ``hearth_rpc_requests_total``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench._common import cpu_model, log
from bench.verify import mesh_settings
from services.testing.mesh import Mesh, write_api_key
from services.testing.servers import PostgresServer

COMPARED_RPCS = ("hearth.clustering.v1.ClusteringService/IngestEvents",
                 "hearth.clustering.v1.ClusteringService/GetHousehold")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def utc(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 10)}"


class Volume:
    """A tmpfs of ``size_mb`` mounted at ``path``, and a file that fills it."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path, self.size_mb = path, size_mb
        self.filler = path / "filler"

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.path)],
                       check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Append to the filler until the volume refuses a byte; returns the bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as f:
            for size in (1 << 20, 1 << 12, 1):
                block = b"\0" * size
                while True:
                    try:
                        f.write(block)
                        written += size
                    except OSError:
                        break
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


class Drill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.volume = Volume(self.out / "pgvol", args.size_mb)
        self.pg: PostgresServer | None = None
        self.mesh: Mesh | None = None
        self.key = ""
        self.phase = "warm"
        self.stop_load = threading.Event()
        self.stop_watch = threading.Event()
        self.lock = threading.Lock()
        self.answers: dict[str, Counter] = defaultdict(Counter)   # phase -> "POST events 503" -> n
        self.retry_after: dict[str, Counter] = defaultdict(Counter)
        self.bodies: Counter = Counter()
        self.ok_traces: list[str] = []   # x-trace-id of every 200 (each served by clustering)
        self.killed: dict = {}
        self.acked: dict[str, set[str]] = defaultdict(set)   # account -> event ids acknowledged
        self.refused_batches: list[tuple[str, list[str]]] = []   # (account, ids) of batches not acknowledged
        self.write_times: list[tuple[float, int]] = []   # (ts, status) of every write
        self.timeline: list[dict] = []
        self.pg_restarts: list[dict] = []
        self.t: dict[str, float] = {}
        self.wal_switch = ""

    # ---- set-up ------------------------------------------------------------------------

    def start(self) -> None:
        subprocess.run(["umount", "-l", str(self.volume.path)], check=False, capture_output=True)
        self.volume.mount()
        env = mesh_settings()
        env.update({"HEARTH_LOG_LEVEL": "INFO", "HEARTH_AUDIT_RESERVE_MB": str(self.args.reserve_mb)})
        if self.args.backend == "postgres":
            self.pg = PostgresServer(self.volume.path / "pg", max_connections=100,
                                     settings={"logging_collector": "on", "log_directory": str(self.out / "pglog"),
                                               "log_filename": "postgresql.log"})
            (self.out / "pglog").mkdir(parents=True, exist_ok=True)
            subprocess.run(["chown", "postgres:postgres", str(self.out / "pglog")], check=True)
            self.pg.init().start()
            log(f"PostgreSQL up on a {self.args.size_mb} MB tmpfs, {self.volume.free_bytes() >> 20} MB free")
            env.update({"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": self.pg.dsn})
            data_dir = self.out / "mesh"
        else:   # SQLite: the mesh's data directory (databases, outboxes, reserve files) on the volume
            data_dir = self.volume.path / "mesh"
        self.mesh = Mesh.on_free_ports(data_dir, log_dir=self.out / "logs", extra_env=env)
        self.mesh.data_dir.mkdir(parents=True, exist_ok=True)
        self.key = write_api_key(self.mesh.data_dir / "gateway-keys.json", "drill-admin", "admin")
        self.mesh.start()
        self.mesh.wait_healthy(180)
        log(f"mesh healthy on {self.args.backend}, {self.volume.free_bytes() >> 20} MB free")

    def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.stop()
        if self.pg is not None:
            self.pg.stop()
        self.volume.unmount()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.mesh.url, headers={"X-API-Key": self.key}, timeout=15)

    # ---- load --------------------------------------------------------------------------

    def note(self, what: str, r: httpx.Response | None, error: str = "") -> None:
        with self.lock:
            phase = self.phase
            if r is None:
                self.answers[phase][f"{what} {error}"] += 1
                return
            self.answers[phase][f"{what} {r.status_code}"] += 1
            if r.status_code == 200 and r.headers.get("x-trace-id"):
                self.ok_traces.append(r.headers["x-trace-id"])
            if r.status_code != 200:
                self.retry_after[phase][f"{what} {r.status_code} Retry-After={r.headers.get('Retry-After')}"] += 1
                self.bodies[f"{r.status_code} {r.text[:200]}"] += 1

    def worker(self, index: int) -> None:
        accounts = [f"pgfull-{index}-{k}" for k in range(3)]
        n = 0
        with self.client() as c:
            while not self.stop_load.is_set():
                account = accounts[n % len(accounts)]
                base = time.time() - 3 * 86400
                ids = [f"{account}-e{n}-{i}" for i in range(5)]
                events = [{"event_id": eid, "account_id": account, "device_id": f"tv-{index}", "device_type": "tv",
                           "ts": _iso(base + n * 60 + i * 10), "kind": "heartbeat", "title_id": f"t-{n % 7}",
                           "genres": ["drama"], "duration_s": 600.0, "maturity": "adult"} for i, eid in enumerate(ids)]
                n += 1
                try:
                    r = c.post("/v1/events", json={"events": events})
                except httpx.HTTPError as exc:
                    self.note("POST /v1/events", None, type(exc).__name__)
                    with self.lock:
                        self.refused_batches.append((account, ids))
                    continue
                self.note("POST /v1/events", r)
                with self.lock:
                    self.write_times.append((time.time(), r.status_code))
                    if r.status_code == 200:
                        self.acked[account].update(ids)
                    else:
                        self.refused_batches.append((account, ids))
                try:
                    self.note("GET /v1/household", c.get(f"/v1/household/{account}"))
                except httpx.HTTPError as exc:
                    self.note("GET /v1/household", None, type(exc).__name__)

    # ---- watching ----------------------------------------------------------------------

    def metrics(self) -> dict[str, dict]:
        ports = {"gateway": self.mesh.gateway_metrics_port, **self.mesh.metrics_ports}
        out: dict[str, dict] = {}
        for name, port in ports.items():
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                out[name] = {"unreachable": True}
                continue
            values: dict = {"dropped": 0.0, "held": 0.0, "outbox": 0.0}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "hearth_dependency_up" and s.labels.get("dependency") in ("database", "database writes"):
                        values[s.labels["dependency"]] = s.value
                    elif s.name == "hearth_audit_records_held":
                        values["held"] += s.value
                    elif s.name == "hearth_audit_outbox_depth":
                        values["outbox"] += s.value
                    elif s.name == "hearth_audit_records_dropped_total":
                        values["dropped"] += s.value
            out[name] = values
        return out

    def watch(self) -> None:
        while not self.stop_watch.is_set():
            row: dict = {"t": round(time.time(), 1), "phase": self.phase,
                         "free_mb": round(self.volume.free_bytes() / 2**20, 1),
                         "postgres_running": self.pg is None or (self.pg.proc is not None and self.pg.proc.poll() is None)}
            try:
                h = httpx.get(self.mesh.url + "/health", timeout=3)
                row["health"] = h.status_code, h.json().get("status"), h.json().get("reasons", {})
            except (httpx.HTTPError, ValueError) as exc:
                row["health"] = type(exc).__name__
            row["metrics"] = self.metrics()
            self.timeline.append(row)
            self.stop_watch.wait(0.5)

    def keep_postgres(self) -> None:
        """Start PostgreSQL again if it exited (an orchestrator's restart), once the space
        is back: called on the main thread, which lives as long as the drill (the death
        signal of ``spawn_tied`` follows the thread that started the server)."""
        if self.pg is None:
            return
        proc = self.pg.proc
        if proc is None or proc.poll() is None or self.phase == "full":
            return
        exited = {"seen_utc": utc(time.time()), "code": proc.returncode}
        log(f"{utc(time.time())} PostgreSQL had exited ({proc.returncode}): starting it again")
        t0 = time.time()
        try:
            self.pg.start(120)
            exited.update(restarted_utc=utc(time.time()), start_s=round(time.time() - t0, 1))
        except RuntimeError as exc:
            exited["restart_failed"] = str(exc)
        self.pg_restarts.append(exited)

    def sleep_watching(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            self.keep_postgres()
            time.sleep(0.2)

    # ---- the drill ---------------------------------------------------------------------

    def run(self) -> dict:
        a = self.args
        watchers = [threading.Thread(target=self.watch, daemon=True)]
        workers = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(a.threads)]
        for th in watchers + workers:
            th.start()
        time.sleep(a.warm_s)
        self.t["full"] = time.time()
        with self.lock:
            self.phase = "full"
        filled = self.volume.fill()
        log(f"{utc(time.time())} volume full ({filled >> 20} MB written)")
        end = time.time() + a.hold_s
        switched = False
        while time.time() < end:   # keep it full: PostgreSQL frees space as it crashes and recovers
            self.volume.fill()
            if a.switch_wal and not switched and time.time() > self.t["full"] + a.hold_s / 4:
                switched = True
                self.switch_wal()
            if a.kill and not self.killed and time.time() > self.t["full"] + a.hold_s / 2:
                self.kill_service(a.kill)
            time.sleep(0.2)
        self.volume.free()
        self.t["freed"] = time.time()
        if self.killed:   # started again once the space is back, as its pod would be
            self.mesh.start_service(a.kill)
            self.killed["restarted_utc"] = utc(time.time())
        with self.lock:
            self.phase = "after"
        log(f"{utc(self.t['freed'])} volume freed")
        self.sleep_watching(a.after_s)
        self.stop_load.set()
        for th in workers:
            th.join(30)
        self.t["load_stopped"] = time.time()
        self.keep_postgres()
        settled = self.settle(60)
        self.stop_watch.set()
        for th in watchers:
            th.join(10)
        return self.report(settled)

    def kill_service(self, name: str) -> None:
        """SIGKILL ``name`` while it holds audit records (what it held just before)."""
        port = self.mesh.metrics_ports[name]
        held = None
        try:
            held = self.metrics().get(name, {}).get("held")
        except httpx.HTTPError:
            pass
        self.mesh.processes[name].kill()
        self.mesh.processes[name].wait()
        self.t["killed"] = time.time()
        self.killed = {"service": name, "held_before_kill": held, "metrics_port": port}
        log(f"{utc(time.time())} {name} SIGKILLed holding {held} audit records")

    def switch_wal(self) -> None:
        """Close the current WAL segment (``pg_switch_wal``): the next write needs a new
        segment file on the full volume (the drill's cluster is fresh: no recycled one) —
        what any write load meets once its recycled segments are used up."""
        import psycopg

        self.t["wal_switched"] = time.time()
        try:
            with psycopg.connect(self.pg.dsn, connect_timeout=3, autocommit=True) as conn:
                self.wal_switch = str(conn.execute("SELECT pg_switch_wal()").fetchone()[0])
        except psycopg.Error as exc:
            self.wal_switch = f"{type(exc).__name__}: {exc}"
        log(f"{utc(time.time())} pg_switch_wal: {self.wal_switch}")

    def settle(self, timeout_s: float) -> float | None:
        """Seconds after the load stopped until no process holds audit records in memory
        and every outbox is empty; None if not within ``timeout_s``."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            m = self.metrics()
            if all(not v.get("unreachable") and v["held"] == 0 and v["outbox"] == 0 for v in m.values()):
                return round(time.time() - t0, 1)
            time.sleep(0.5)
        return None

    # ---- checks ------------------------------------------------------------------------

    def check_events(self, c: httpx.Client) -> dict:
        stored: dict[str, set[str]] = {}
        for account in sorted({acc for acc, _ in self.refused_batches} | set(self.acked)):
            for _ in range(60):
                r = c.get(f"/v1/household/{account}/export")
                if r.status_code == 200:
                    break
                time.sleep(1)
            r.raise_for_status()
            stored[account] = {e["event_id"] for e in r.json()["services"]["clustering"]["events"]}
        missing = sum(len(ids - stored.get(acc, set())) for acc, ids in self.acked.items())
        partial = sum(1 for acc, ids in self.refused_batches if 0 < len(set(ids) & stored[acc]) < len(ids))
        stored_refused = sum(1 for acc, ids in self.refused_batches if set(ids) <= stored[acc])
        return {"acknowledged": sum(len(v) for v in self.acked.values()), "acknowledged_missing": missing,
                "refused_batches": len(self.refused_batches), "refused_batches_stored_in_part": partial,
                "refused_batches_stored_whole": stored_refused}

    def check_audit(self, c: httpx.Client) -> dict:
        r = c.get("/v1/audit/export", timeout=120)
        r.raise_for_status()
        path = self.out / "audit.jsonl"
        path.write_text(r.text)
        verify = subprocess.run([os.sys.executable, "-m", "services.cli", "audit", "verify", str(path),
                                 "--public-key", str(self.mesh.data_dir / "audit-signing-key.pub")],
                                capture_output=True, text=True)
        per_rpc: Counter = Counter()
        traces: set[str] = set()
        entries = 0
        for line in r.text.splitlines():
            doc = json.loads(line)
            if "entry" not in doc:
                continue
            entries += 1
            entry = doc["entry"]
            details = entry.get("details") or {}
            if isinstance(details, str):
                details = json.loads(details)
            if details.get("rpc") in COMPARED_RPCS:
                per_rpc[f"{details['rpc'].rsplit('/', 1)[1]} {details.get('code')}"] += 1
                traces.add(entry.get("trace_id", ""))
        served: Counter = Counter()
        text = httpx.get(f"http://127.0.0.1:{self.mesh.metrics_ports['clustering']}/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "hearth_rpc_requests_total":
                    method = s.labels.get("method", "").rsplit("/", 1)[-1]
                    if method in ("IngestEvents", "GetHousehold") and s.value:
                        served[f"{method} {s.labels.get('code')}"] += int(s.value)
        missing = [t for t in self.ok_traces if t not in traces]
        return {"entries": entries, "requests_200": len(self.ok_traces), "requests_200_without_entry": len(missing),
                "verify_rc": verify.returncode, "verify_out": (verify.stdout + verify.stderr)[-400:],
                "log_per_rpc": dict(sorted(per_rpc.items())), "served_per_rpc": dict(sorted(served.items())),
                # a killed process's counters started again from 0: compared by trace ids above
                "one_entry_per_rpc_served": per_rpc == served if not self.killed else None}

    def pg_log(self) -> dict:
        if not (self.out / "pglog").exists():
            return {}
        text = ""
        for f in sorted((self.out / "pglog").glob("*")):
            text += f.read_text(errors="replace")
        lines = text.splitlines()
        pick = [ln for ln in lines if any(k in ln for k in ("PANIC", "terminated by signal", "could not write",
                                                            "No space left", "database system is ready",
                                                            "all server processes terminated",
                                                            "shutting down because", "startup process",
                                                            "redo", "checkpoint"))]
        return {"panics": sum("PANIC" in ln for ln in lines),
                "no_space_errors": sum("No space left" in ln for ln in lines),
                "ready_lines": sum("database system is ready" in ln for ln in lines),
                "excerpt": pick[:40]}

    def report(self, settled: float | None) -> dict:
        full, freed = self.t["full"], self.t["freed"]
        first_ok_after = next((ts for ts, st in self.write_times if ts > freed and st == 200), None)
        last_refused = max((ts for ts, st in self.write_times if st != 200), default=None)
        not_degraded = next((row["t"] for row in self.timeline if row["t"] > freed and isinstance(row["health"], tuple)
                             and row["health"][1] == "SERVING"), None)
        first_degraded = next((row["t"] for row in self.timeline if row["t"] >= full and isinstance(row["health"], tuple)
                               and row["health"][1] != "SERVING"), None)
        held_peak = {name: max((row["metrics"].get(name, {}).get("held", 0) for row in self.timeline), default=0)
                     for name in self.timeline[-1]["metrics"]} if self.timeline else {}
        dropped_end = {name: v.get("dropped") for name, v in self.timeline[-1]["metrics"].items()} if self.timeline else {}
        down = [row["t"] for row in self.timeline if not row["postgres_running"]]
        health_seen: Counter = Counter()
        for row in self.timeline:
            if isinstance(row["health"], tuple):
                code, status, reasons = row["health"]
                health_seen[f"{row['phase']} {code} {status} {json.dumps(reasons, sort_keys=True)}"] += 1
            else:
                health_seen[f"{row['phase']} {row['health']}"] += 1
        writes_down = Counter()
        for row in self.timeline:
            for name, v in row["metrics"].items():
                if v.get("database writes") == 0:
                    writes_down[f"{row['phase']} {name}"] += 1
        with self.client() as c:
            events = self.check_events(c)
            audit = self.check_audit(c)
        return {
            "bench": "pg_full_disk", "utc": _iso(full), "cpu": cpu_model(), "load_1m": os.getloadavg()[0],
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "times_utc": {k: utc(v) for k, v in self.t.items()},
            "answers": {k: dict(v) for k, v in self.answers.items()},
            "non_200": {k: dict(v) for k, v in self.retry_after.items()},
            "bodies": dict(self.bodies.most_common(12)),
            "other_5xx": sum(n for ph in self.answers.values() for k, n in ph.items()
                             if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500 and k.split()[-1] != "503"),
            "recovery": {
                "first_write_200_after_free_s": round(first_ok_after - freed, 1) if first_ok_after else None,
                "last_write_refused_after_free_s": round(last_refused - freed, 1) if last_refused else None,
                "health_first_not_serving_after_full_s": round(first_degraded - full, 1) if first_degraded else None,
                "health_serving_again_after_free_s": round(not_degraded - freed, 1) if not_degraded else None,
                "audit_settled_after_load_s": settled,
                "postgres_down_utc": [utc(min(down)), utc(max(down))] if down else None},
            "postgres": ({"exits": self.pg_restarts, "wal_switch": self.wal_switch, **self.pg_log()}
                         if self.pg is not None else None),
            "killed": self.killed or None,
            "health_seen": dict(health_seen),
            "database_writes_down_samples": dict(writes_down),
            "audit_held_peak": held_peak, "audit_dropped_total_end": dropped_end,
            "events": events, "audit": audit,
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=96, help="the PostgreSQL volume (tmpfs) size")
    parser.add_argument("--hold-s", type=float, default=20.0, help="how long the volume stays full")
    parser.add_argument("--warm-s", type=float, default=8.0)
    parser.add_argument("--after-s", type=float, default=15.0, help="load kept on after the space is back")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--switch-wal", action="store_true",
                        help="a quarter into the hold, switch to a new WAL segment (pg_switch_wal): "
                             "PostgreSQL cannot create it and PANICs")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres",
                        help="postgres: PostgreSQL's data directory on the volume; sqlite: the mesh's data "
                             "directory (databases, audit outboxes, reserve files)")
    parser.add_argument("--kill", choices=("clustering", "attribution", "privacy", "feedback"),
                        help="SIGKILL this service half-way through the hold, start it again once the space is back")
    parser.add_argument("--reserve-mb", type=float, default=4.0, help="HEARTH_AUDIT_RESERVE_MB (0: no reserve file)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/disk25-pgdrill"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.pg_full_disk mounts a tmpfs: run it as root")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    drill = Drill(args)
    try:
        drill.start()
        result = drill.run()
    finally:
        drill.stop()
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
