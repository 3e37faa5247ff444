"""The whole mesh for a long time under a steady realistic mix, with faults mid-run:
what grows, what creeps, what never recovers.

    python -m bench.soak --minutes 40 --backend postgres|sqlite [--rate 6] [--out DIR]
                         [--sample-s 30] [--no-faults]

Reuses ``make verify``'s harness (bench/verify.py: the mesh as real processes, a real
PostgreSQL cluster and redis-server for ``--backend postgres``, the seeded households, the
open-loop generator bench/loadgen.py, the read-back of acknowledged writes) and adds:

* **one** open-loop run for the whole soak (no settling between phases): assign by
  session and by vector, household reads, event ingest, attribution, feedback labels
  (assign, then a label on its prediction), occasional household and person erasures;
* a **data key rotation** of every household (``POST /v1/keys/rotate-households``) at
  15 % of the run;
* **faults** (unless ``--no-faults``): clustering killed -9 at 30 % and restarted 3 s
  later (as a kubelet would); on PostgreSQL, redis-server stopped for 60 s at 50 % and
  PostgreSQL restarted (fast shutdown, start) at 70 %; on SQLite (``make run``'s mesh, where
  every service's own file is the store) each process in turn: attribution at 38 %, privacy
  at 46 % 0.05 s after accepting a household erasure (its job must still complete and its
  marker vanish), feedback at 54 % while it recalibrates (``HEARTH_FEEDBACK_CHECK_INTERVAL_S``
  1 and ``..._RECALIBRATE_MIN_NEW`` 1 for this run, so a fit runs nearly every second),
  the gateway at 62 %;
* a **sample every --sample-s seconds**: each process's RSS, open FDs and threads (the
  four services, the gateway, the PostgreSQL server with its backends, redis-server);
  PostgreSQL: every table's size and live rows, per schema, and pg_wal's size; Redis:
  used memory, keys, keys without a TTL; SQLite: each database file with its -wal; the
  gateway's /metrics request counters per route and status;
* a real **Prometheus** scraping every process with deploy/prometheus/hearth.rules.yaml
  loaded: which alerts fired, and when, relative to the faults;
* **afterwards**: every acknowledged event read back through the export; every accepted
  erasure completed; every erased household's marker absent from the raw bytes of every
  store (PostgreSQL's data directory incl. WAL, every Redis key and value, the SQLite
  files with their -wal and -shm, the logs, every process's /metrics) while a control
  household's marker is found (the scan sees the stores).

Figures are ratios within the run: the last window (``--window-min``, 5 min) over the
first after warm-up (latency p50/p99 per route, RSS, FDs, threads, table sizes), and
least-squares slopes over the last half (growth that does not level off). JSON to
``OUT/soak.json`` and as stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench._common import cpu_model, log
from bench.verify import FULL, Profile, Verify, household_events, percentile
from services.testing.mesh import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "hearth.rules.yaml"
# The steady mix. Deletions are occasional: ~one of each kind a minute at the default rate.
MIX = {"assign_session": 0.30, "assign_vector": 0.14, "household": 0.15, "events": 0.20,
       "attribution": 0.08, "feedback": 0.10, "delete": 0.003, "delete_person": 0.003}
# What the erasure path needs to remove WAL segments physically (docs/privacy.md §11).
PURGEABLE_WAL = {"wal_recycle": "off", "full_page_writes": "on", "wal_keep_size": "0"}
MARKER = "zrsoak"   # in every erased household's title and series ids
CONTROL = "zrkeep"  # the same in a household never erased: the raw scan must find it
REDIS_DOWN_S = 60.0
RESTART_AFTER_S = 3.0   # as a kubelet would
# On SQLite each process is killed in turn (at these fractions of the run), privacy just
# after it accepted an erasure, feedback while it recalibrates (made near-continuous below).
SQLITE_KILLS = {"attribution": 0.38, "privacy": 0.46, "feedback": 0.54, "gateway": 0.62}
PRIVACY_KILL_AFTER_ACCEPT_S = 0.05
RECALIBRATING_FEEDBACK = {"HEARTH_FEEDBACK_CHECK_INTERVAL_S": "1", "HEARTH_FEEDBACK_RECALIBRATE_MIN_NEW": "1"}
# A resource "levels off" when its slope over the last half of the run, projected over
# an hour, is under this fraction of its value at the end (noise, a cache filling), or
# under the measure's floor per hour (a table going from 0 to 2 rows, a thread added to a
# bounded pool: listed as growing in session 29's first runs, which buried what grew).
LEVELS_OFF_FRACTION_PER_H = 0.10
FLOOR_PER_H = {"rss_mb": 5.0, "fds": 10.0, "threads": 5.0, "mb": 1.0, "rows": 100.0, "wal_mb": 16.0,
               "used_mb": 1.0, "keys": 50.0, "keys_without_ttl": 10.0, "connections": 5.0}


def _profile(args: argparse.Namespace) -> Profile:
    return Profile(households=args.households, victims=0, attribution_accounts=min(10, args.households), days=20,
                   step_s=FULL.step_s, saturation_s=FULL.saturation_s, concurrency=FULL.concurrency,
                   ladder=FULL.ladder, soak_rate=int(args.rate), soak_warmup_frac=0.2, fault_rate=int(args.rate),
                   fault_pre_s=0, fault_hold_s=0, fault_post_s=0)


def _marked(events: list[dict], marker: str) -> list[dict]:
    """The marker in each event's id (kept in clear by the stores that hold events: what
    the raw scan can see) and in its title and series ids (sealed where they are)."""
    for n, e in enumerate(events):
        e["event_id"] = f"{marker}-e{n}"
        e["title_id"] = f"{marker}-{e['title_id']}"
        e["series_id"] = f"{marker}-{e['series_id']}"
    return events


# ---------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------

def _proc(pid: int) -> dict | None:
    """RSS (MB), open FDs and threads of one process, None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, AttributeError, ValueError):
        return None
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": fds, "threads": threads}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _pss_mb(pid: int) -> float | None:
    try:
        return int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M).group(1)) / 1024
    except (OSError, AttributeError, ValueError):
        return None


def _group(pid: int) -> dict | None:
    """A server and its children summed (the postmaster and its backends). Memory is the
    proportional set size: each backend's RSS counts every page of shared_buffers it has
    touched, so their sum rose with each backend's share of the buffers (335 -> 741 MB in
    12 minutes of session 29's first run) without any memory being added."""
    pids = [pid, *_children(pid)]
    parts = [x for x in (_proc(p) for p in pids) if x]
    if not parts:
        return None
    pss = [m for m in (_pss_mb(p) for p in pids) if m is not None]
    return {"rss_mb": round(sum(pss), 1) if pss else None, "fds": sum(x["fds"] for x in parts),
            "threads": sum(x["threads"] for x in parts), "processes": len(parts)}


def _dir_mb(path: Path) -> float:
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            pass
    return round(total / 2**20, 2)


class Sampler:
    def __init__(self, v: Verify, t0: float) -> None:
        self.v, self.t0 = v, t0
        self.samples: list[dict] = []

    def pg(self) -> dict | None:
        if self.v.postgres is None:
            return None
        import psycopg

        try:
            with psycopg.connect(self.v.postgres.dsn, connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT schemaname, relname, pg_total_relation_size(relid), n_live_tup, n_dead_tup "
                    "FROM pg_stat_user_tables").fetchall()
                conns = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0]
        except psycopg.Error as exc:
            return {"error": repr(exc)[:200]}
        tables = {f"{s}.{t}": {"mb": round(size / 2**20, 3), "rows": live, "dead": dead} for s, t, size, live, dead in rows}
        schemas: dict[str, float] = {}
        for name, t in tables.items():
            schemas[name.split(".")[0]] = round(schemas.get(name.split(".")[0], 0.0) + t["mb"], 3)
        return {"tables": tables, "schemas_mb": schemas, "wal_mb": _dir_mb(self.v.postgres.data_dir / "pg_wal"),
                "connections": conns}

    def redis(self) -> dict | None:
        if self.v.redis is None:
            return None
        import redis

        try:
            r = redis.Redis(port=self.v.redis.port, socket_timeout=3)
            info = r.info("memory")
            keys, no_ttl, prefixes = 0, 0, {}
            for key in r.scan_iter(count=500):
                keys += 1
                if r.ttl(key) == -1:
                    no_ttl += 1
                    prefix = key.decode(errors="replace").split(":")[0]
                    prefixes[prefix] = prefixes.get(prefix, 0) + 1
            r.close()
        except redis.RedisError as exc:
            return {"error": repr(exc)[:200]}
        return {"used_mb": round(info["used_memory"] / 2**20, 3), "keys": keys, "keys_without_ttl": no_ttl,
                "no_ttl_by_prefix": prefixes}

    def sqlite(self) -> dict | None:
        if self.v.postgres is not None:
            return None
        out = {}
        for f in sorted(self.v.mesh.data_dir.glob("*.db*")):
            try:
                out[f.name] = round(f.stat().st_size / 2**20, 3)
            except OSError:
                pass
        return out

    def gateway(self) -> dict | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.v.mesh.gateway_metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError as exc:
            return {"error": repr(exc)[:200]}
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "hearth_http_requests":
                for s in family.samples:
                    if s.name == "hearth_http_requests_total":
                        key = f"{s.labels['method']} {s.labels['route']} {s.labels['status']}"
                        counts[key] = int(s.value)
        return counts

    def take(self) -> dict:
        s = {"t": round(time.time() - self.t0, 1)}
        s["processes"] = {n: _proc(pid) for n, pid in self.v.pids().items()}
        for name, server in (("postgres", self.v.postgres), ("redis", self.v.redis)):
            if server is not None and server.proc is not None and server.proc.poll() is None:
                s["processes"][name] = _group(server.proc.pid)
        s["pg"], s["redis"], s["sqlite"] = self.pg(), self.redis(), self.sqlite()
        s["gateway_requests"] = self.gateway()
        self.samples.append(s)
        return s


# ---------------------------------------------------------------------------------------
# Prometheus with the alert rules
# ---------------------------------------------------------------------------------------

def start_prometheus(v: Verify, base: Path) -> tuple[subprocess.Popen | None, str]:
    import yaml

    binary = shutil.which("prometheus")
    if not binary:
        log("prometheus not found: no alert record")
        return None, ""
    targets = [(f"127.0.0.1:{port}", name) for name, port in v.metrics_ports().items()]
    config = {"global": {"scrape_interval": "5s", "evaluation_interval": "5s"}, "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "hearth", "honor_labels": True, "static_configs": [
                  {"targets": [t], "labels": {"hearth_component": c, "namespace": "soak"}} for t, c in targets]}]}
    base.mkdir(parents=True, exist_ok=True)
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    logf = open(base / "prometheus.log", "ab")
    from services.common.child_process import spawn_tied

    proc = spawn_tied([binary, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=logf, stderr=logf)
    return proc, f"http://127.0.0.1:{port}"


def fired_alerts(url: str, t0: float, t1: float, state: str = "firing") -> dict[str, dict]:
    """Each alert that was in ``state`` (firing, pending) at some point in [t0, t1]: its
    first and last instant in it (seconds from t0) and its labels."""
    try:
        r = httpx.get(url + "/api/v1/query_range", params={"query": f'ALERTS{{alertstate="{state}"}}', "start": t0,
                                                          "end": t1, "step": "5s"}, timeout=30).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": {"detail": repr(exc)[:200]}}
    out: dict[str, dict] = {}
    for series in r.get("data", {}).get("result", []):
        name = series["metric"]["alertname"]
        times = [float(t) - t0 for t, _ in series["values"]]
        labels = {k: v for k, v in series["metric"].items() if k not in ("alertname", "alertstate", "__name__")}
        a = out.setdefault(name, {"first_s": min(times), "last_s": max(times), "series": []})
        a["first_s"], a["last_s"] = round(min(a["first_s"], min(times)), 1), round(max(a["last_s"], max(times)), 1)
        a["series"].append(labels)
    return out


def prom_query_range(url: str, query: str, t0: float, t1: float, step: str = "30s") -> list:
    try:
        r = httpx.get(url + "/api/v1/query_range", params={"query": query, "start": t0, "end": t1, "step": step},
                      timeout=30).json()
        return [{"metric": s["metric"], "values": [[round(float(t) - t0), v] for t, v in s["values"]]}
                for s in r.get("data", {}).get("result", [])]
    except (httpx.HTTPError, ValueError) as exc:
        return [{"error": repr(exc)[:200]}]


# ---------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------

def latency_windows(raw: dict, window_s: float) -> list[dict]:
    req = raw["requests"]
    t = np.array(req["t"])
    lat = np.array(req["lat_ms"])
    ops = np.array(req["op"])
    ok = np.array([s.startswith("2") for s in req["status"]])
    out = []
    if not len(t):
        return out
    for start in np.arange(0.0, float(t.max()) + 1e-9, window_s):
        w = (t >= start) & (t < start + window_s)
        row = {"start_s": float(start), "requests": int(w.sum()), "errors": int((w & ~ok).sum()), "ops": {}}
        for op in sorted(set(ops[w])):
            m = w & (ops == op)
            good = lat[m & ok]
            row["ops"][op] = {"n": int(m.sum()), "errors": int((m & ~ok).sum()),
                              "p50_ms": percentile(good, 50) if len(good) else None,
                              "p99_ms": percentile(good, 99) if len(good) else None}
        good = lat[w & ok]
        row["p50_ms"] = percentile(good, 50) if len(good) else None
        row["p99_ms"] = percentile(good, 99) if len(good) else None
        out.append(row)
    return out


def first_last(raw: dict, start_first: float, window_s: float, end: float) -> dict:
    """Latency per op in [start_first, +window) vs the last window before ``end``."""
    req = raw["requests"]
    t = np.array(req["t"])
    lat = np.array(req["lat_ms"])
    ops = np.array(req["op"])
    ok = np.array([s.startswith("2") for s in req["status"]])
    first = (t >= start_first) & (t < start_first + window_s)
    last = (t >= end - window_s) & (t < end)
    out = {}
    for op in ["all", *sorted(set(ops))]:
        sel = np.ones(len(t), bool) if op == "all" else ops == op
        row = {}
        for q in (50, 99):
            a = percentile(lat[first & sel & ok], q) if (first & sel & ok).any() else None
            b = percentile(lat[last & sel & ok], q) if (last & sel & ok).any() else None
            row[f"p{q}_first_ms"], row[f"p{q}_last_ms"] = a, b
            row[f"p{q}_ratio"] = round(b / a, 3) if a and b else None
        row["errors_first"] = int((first & sel & ~ok).sum())
        row["errors_last"] = int((last & sel & ~ok).sum())
        row["n_first"], row["n_last"] = int((first & sel).sum()), int((last & sel).sum())
        out[op] = row
    return out


def _series(samples: list[dict], get) -> tuple[np.ndarray, np.ndarray]:
    pts = [(s["t"], get(s)) for s in samples]
    pts = [(t, v) for t, v in pts if v is not None]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def growth(samples: list[dict], get, start_first: float, window_s: float, end: float,
           floor_per_h: float = 0.0) -> dict | None:
    t, v = _series(samples, get)
    if len(t) < 4:
        return None
    first = v[(t >= start_first) & (t < start_first + window_s)]
    last = v[(t >= end - window_s) & (t <= end + 1)]
    half = t >= t[0] + (t[-1] - t[0]) / 2
    slope_h = float(np.polyfit(t[half] / 3600.0, v[half], 1)[0]) if half.sum() >= 3 else None
    f = float(np.median(first)) if len(first) else float(v[0])
    l_ = float(np.median(last)) if len(last) else float(v[-1])
    return {"first": round(f, 3), "last": round(l_, 3), "ratio": round(l_ / f, 3) if f else None,
            "slope_per_h_last_half": round(slope_h, 3) if slope_h is not None else None,
            "levels_off": bool(slope_h is None
                               or slope_h <= max(LEVELS_OFF_FRACTION_PER_H * abs(l_), floor_per_h, 1e-9))}


def resources(samples: list[dict], start_first: float, window_s: float, end: float) -> dict:
    out: dict = {"processes": {}, "tables": {}, "schemas_mb": {}}
    names = sorted({n for s in samples for n in (s.get("processes") or {})})
    for n in names:
        out["processes"][n] = {k: growth(samples, lambda s, n=n, k=k: ((s["processes"].get(n) or {}).get(k)),
                                         start_first, window_s, end, FLOOR_PER_H[k]) for k in ("rss_mb", "fds", "threads")}
    pg = [s for s in samples if s.get("pg") and "tables" in s["pg"]]
    if pg:
        for table in sorted(pg[-1]["pg"]["tables"]):
            out["tables"][table] = {
                k: growth(pg, lambda s, table=table, k=k: (s["pg"]["tables"].get(table) or {}).get(k),
                          start_first, window_s, end, FLOOR_PER_H[k]) for k in ("mb", "rows")}
        for schema in sorted(pg[-1]["pg"]["schemas_mb"]):
            out["schemas_mb"][schema] = growth(pg, lambda s, schema=schema: s["pg"]["schemas_mb"].get(schema),
                                               start_first, window_s, end, FLOOR_PER_H["mb"])
        out["wal_mb"] = growth(pg, lambda s: s["pg"]["wal_mb"], start_first, window_s, end, FLOOR_PER_H["wal_mb"])
        out["pg_connections"] = growth(pg, lambda s: s["pg"]["connections"], start_first, window_s, end,
                                       FLOOR_PER_H["connections"])
    rd = [s for s in samples if s.get("redis") and "keys" in s["redis"]]
    if rd:
        for k in ("used_mb", "keys", "keys_without_ttl"):
            out[f"redis_{k}"] = growth(rd, lambda s, k=k: s["redis"][k], start_first, window_s, end, FLOOR_PER_H[k])
        out["redis_no_ttl_by_prefix_last"] = rd[-1]["redis"]["no_ttl_by_prefix"]
    sq = [s for s in samples if s.get("sqlite")]
    if sq:
        for f in sorted(sq[-1]["sqlite"]):
            out["tables"][f] = {"mb": growth(sq, lambda s, f=f: s["sqlite"].get(f), start_first, window_s, end,
                                             FLOOR_PER_H["mb"])}
    return out


def gateway_route_errors(samples: list[dict], events: list[dict]) -> dict:
    """From the gateway's own counters (``hearth_http_requests_total``, sampled): per route,
    the requests and the 5xx answers between consecutive samples, summed over each stretch
    between two of the run's events (faults, the rotation), so an SRE's view of each fault
    can be set beside the generator's. A counter that went down (the gateway restarted)
    starts again from 0."""
    marks = [0.0, *sorted(e["t"] for e in events), float("inf")]
    out: dict[str, dict] = {}
    prev: dict[str, int] = {}
    for s in samples:
        counts = s.get("gateway_requests")
        if not isinstance(counts, dict) or "error" in counts:
            continue
        if not prev:   # the first sample: what the seeding sent, the baseline
            prev = counts
            continue
        stretch = max(i for i, m in enumerate(marks) if m <= s["t"])
        label = f"{marks[stretch]:.0f}s-" + ("end" if marks[stretch + 1] == float("inf") else f"{marks[stretch + 1]:.0f}s")
        for key, value in counts.items():
            delta = value - prev.get(key, 0) if value >= prev.get(key, 0) else value
            method, route, status = key.rsplit(" ", 2)[0], key.rsplit(" ", 2)[1], key.rsplit(" ", 2)[2]
            row = out.setdefault(label, {}).setdefault(f"{method} {route}", {"requests": 0, "5xx": 0})
            row["requests"] += delta
            if status.startswith("5"):
                row["5xx"] += delta
        prev = counts
    return {label: {r: v for r, v in routes.items() if v["requests"]} for label, routes in out.items()}


def not_levelling(res: dict) -> list[str]:
    """Every resource whose growth over the last half did not level off (events and
    their derived rows grow with ingest by design: listed too, judged by the reader)."""
    flagged = []
    for n, ks in res["processes"].items():
        for k, g in ks.items():
            if g and not g["levels_off"]:
                flagged.append(f"{n}.{k}")
    for table, ks in res["tables"].items():
        for k, g in ks.items():
            if g and not g["levels_off"]:
                flagged.append(f"{table}.{k}")
    for k in ("wal_mb", "redis_used_mb", "redis_keys", "redis_keys_without_ttl", "pg_connections"):
        if res.get(k) and not res[k]["levels_off"]:
            flagged.append(k)
    return flagged


# ---------------------------------------------------------------------------------------
# erasure: raw bytes
# ---------------------------------------------------------------------------------------

def raw_hits(v: Verify, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Where each needle's bytes occur: PostgreSQL's data directory (WAL included), every
    Redis key and value, the mesh's data directory (SQLite files), the logs."""
    hits: dict[str, list[str]] = {k: [] for k in needles}
    roots = [v.mesh.data_dir, v.out / "logs"]
    if v.postgres is not None:
        roots.append(v.postgres.data_dir)
    for root in roots:
        for f in root.rglob("*"):
            try:
                if not f.is_file():
                    continue
                data = f.read_bytes()
            except OSError:
                continue
            for k, needle in needles.items():
                if needle in data:
                    hits[k].append(str(f.relative_to(v.out)))
    for name, port in v.metrics_ports().items():
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).content
        except httpx.HTTPError:
            continue
        for k, needle in needles.items():
            if needle in text:
                hits[k].append(f"metrics:{name}")
    if v.redis is not None and v.redis.proc is not None:
        import redis

        r = redis.Redis(port=v.redis.port)
        for key in r.scan_iter(count=500):
            value = r.dump(key) or b""
            for k, needle in needles.items():
                if needle in key or needle in value:
                    hits[k].append(f"redis:{key[:80]!r}")
        r.close()
    return hits


def _receipt_public_key(v: Verify):
    """The receipt key ``make run``'s privacy generated (``privacy-receipt-signing.pub``),
    None on a mesh configured with its own (then the receipts' embedded key is used)."""
    from services.privacy.keys.signing import load_public_key

    path = v.mesh.data_dir / "privacy-receipt-signing.pub"
    return load_public_key(path.read_text(), argument=str(path)) if path.exists() else None


def _receipt_problem(receipt: dict | None, ack: dict, public_key) -> str:
    """'' when the completed job's receipt verifies and names its job and account."""
    from services.privacy.deletion.receipts import ReceiptVerificationError, SignedReceipt, verify_receipt

    if not receipt:
        return "completed without a receipt"
    try:
        r = verify_receipt(SignedReceipt.from_dict(receipt), public_key)
    except (ValueError, ReceiptVerificationError) as exc:
        return f"does not verify: {exc}"[:200]
    if r.job_id != ack["deletion_job"] or r.account_id != ack["account_id"]:
        return f"names job {r.job_id} / account {r.account_id}"
    return ""


def erasure_check(v: Verify, acks: list[dict], victims: dict[str, str]) -> dict:
    """Every accepted erasure: its job's state and, once completed, its signed receipt
    verified with the mesh's receipt public key (as ``hearth verify-receipt --public-key``);
    for completed household erasures, the household's read and export through the API, and
    its marker in the raw bytes."""
    jobs = [a for a in acks if a.get("deletion_job")]
    states: dict[str, int] = {}
    receipts = {"verified": 0, "invalid": []}
    completed_households = []
    public_key = _receipt_public_key(v)
    with v.client() as c:
        for a in jobs:
            deadline = time.monotonic() + 120
            while True:
                body = c.get(f"/v1/delete/{a['deletion_job']}").json()
                st = body.get("state")
                if st in ("completed", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            states[st or "unknown"] = states.get(st or "unknown", 0) + 1
            if st == "completed":
                problem = _receipt_problem(body.get("receipt"), a, public_key)
                if problem:
                    receipts["invalid"].append(f"{a['deletion_job']}: {problem}")
                else:
                    receipts["verified"] += 1
            if st == "completed" and a["account_id"] in victims:
                completed_households.append(a["account_id"])
        api_remnants = []
        for account in completed_households:
            h = c.get(f"/v1/household/{account}")
            if h.status_code == 200 and (h.json().get("sessions") or h.json().get("devices")):
                api_remnants.append(f"{account}: household read has {len(h.json()['sessions'])} sessions")
            e = c.get(f"/v1/household/{account}/export")
            if e.status_code == 200 and MARKER.encode() in e.content:
                api_remnants.append(f"{account}: export holds its marker")
    needles = {a: victims[a].encode() for a in completed_households}
    needles["control"] = CONTROL.encode()
    hits = raw_hits(v, needles)
    control = hits.pop("control")
    return {"jobs": len(jobs), "states": states, "receipts": receipts,
            "households_checked": len(completed_households),
            "api_remnants": api_remnants, "raw_remnants": {k: h for k, h in hits.items() if h},
            "control_found_in": sorted(control)[:10], "scan_sees_stores": bool(control)}


# ---------------------------------------------------------------------------------------
# afterwards: the audit chain, the logs
# ---------------------------------------------------------------------------------------

def audit_verified(v: Verify) -> dict:
    """privacy's ``VerifyAudit`` over the whole log the soak wrote (every request, the
    rotation, the erasures, through the faults), called as the gateway forwarding an admin:
    the chain and the stored signed heads must still verify at the end."""
    import grpc

    from hearth.privacy.v1 import privacy_pb2, privacy_pb2_grpc
    from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role

    admin = Principal("soak-admin", Role.ADMIN)
    metadata = [(PRINCIPAL_KEY, admin.id), (ROLE_KEY, admin.role.value),
                (TOKEN_KEY, v.mesh.signer("gateway").sign(admin, audience="privacy"))]
    started = time.monotonic()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{v.mesh.grpc_ports['privacy']}") as channel:
            r = privacy_pb2_grpc.AuditLogStub(channel).VerifyAudit(privacy_pb2.VerifyAuditRequest(),
                                                                   metadata=metadata, timeout=600)
    except grpc.RpcError as exc:   # recorded, not fatal: the rest of the report still stands
        return {"valid": False, "error": f"{exc.code().name}: {exc.details()}"[:300]}
    return {"valid": r.valid, "entries": r.entries, "first_bad_seq": r.first_bad_seq, "reason": r.reason,
            "message": r.message, "tree_size": r.tree_head.tree_size, "seconds": round(time.monotonic() - started, 1)}


# A service's log line at these levels, or a Python traceback anywhere in it (a handler's
# exc_info, or a crash written to stderr before logging was set up), is a finding.
_BAD_LEVELS = ("ERROR", "CRITICAL")


def log_findings(log_dir: Path, samples: int = 3) -> dict[str, dict]:
    """Per log file: lines logged at ERROR or CRITICAL, and tracebacks, with the first few
    of each (shortened). Warnings are the faults' expected noise (a peer unreachable while
    it is killed) and are counted, not listed."""
    out: dict[str, dict] = {}
    for f in sorted(log_dir.glob("*.log")):
        found = {"error_lines": 0, "tracebacks": 0, "warnings": 0, "first": []}
        for line in f.read_text(errors="replace").splitlines():
            level = ""
            if line.startswith("{"):
                try:
                    level = str(json.loads(line).get("level", "")).upper()
                except ValueError:
                    pass
            bad = level in _BAD_LEVELS
            traceback = "Traceback (most recent call last)" in line
            found["error_lines"] += bad
            found["tracebacks"] += traceback
            found["warnings"] += level == "WARNING"
            if (bad or traceback) and len(found["first"]) < samples:
                found["first"].append(line[:400])
        out[f.stem] = found
    return out


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        out = args.out or ROOT / "var" / "soak" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out.mkdir(parents=True, exist_ok=True)
        vargs = argparse.Namespace(backend=args.backend, replicas=1, quick=False, soak_min=args.minutes)
        self.v = Verify(vargs, _profile(args), out, pg_settings=dict(PURGEABLE_WAL))
        self.events: list[dict] = []   # the faults and the rotation: what happened when
        self.victims: dict[str, str] = {}          # household erasure victims -> marker
        self.person_victims: list[str] = []
        # The household whose erasure privacy is killed in the middle of (not the generator's).
        self.kill_victim: tuple[str, str] | None = None
        self.fault_erasures: list[dict] = []   # acks of erasures the faults requested
        self.sqlite_kills = args.backend == "sqlite" and not args.no_faults

    def note(self, what: str, **kw) -> None:
        row = {"t": round(time.time() - self.t0, 1), "what": what, **kw}
        self.events.append(row)
        log(f"  [{row['t']:7.1f}s] {what} {kw if kw else ''}")

    def seed_victims(self, n_households: int, n_persons: int) -> None:
        rng = random.Random(29)
        tag = f"{int(time.time()) % 100000:05d}"
        with self.v.client() as c:
            for i in range(n_households):
                account = f"soakvictim-{i:04d}"
                marker = f"{MARKER}{tag}h{i:04d}x"
                r = c.post("/v1/events", json={"events": _marked(household_events(account, rng, 4, n_persons=1),
                                                                 marker)})
                r.raise_for_status()
                self.victims[account] = marker
            for i in range(n_persons):
                account = f"soakperson-{i:04d}"
                c.post("/v1/events", json={"events": household_events(account, rng, 8, n_persons=2)}).raise_for_status()
                self.person_victims.append(account)
            if self.sqlite_kills:
                account, marker = "soakkill-0000", f"{MARKER}{tag}kx"
                c.post("/v1/events", json={"events": _marked(household_events(account, rng, 4, n_persons=1),
                                                             marker)}).raise_for_status()
                self.kill_victim = (account, marker)
            control = "soakcontrol-0000"
            c.post("/v1/events", json={"events": _marked(household_events(control, rng, 4, n_persons=1),
                                                         f"{CONTROL}{tag}")}).raise_for_status()

    def rotate(self) -> None:
        with self.v.client() as c:
            try:
                r = c.post("/v1/keys/rotate-households", json={"older_than_days": 0.0001, "limit": 1000,
                                                                 "request_id": f"soak-{int(self.t0)}"})
                self.note("data key rotation requested", status=r.status_code, body=r.text[:200])
                job = r.json().get("job_id")
                deadline = time.time() + 900
                while job and time.time() < deadline:
                    try:
                        st = c.get(f"/v1/keys/rotate-households/{job}")
                    except httpx.TransportError:   # the gateway killed meanwhile (a fault): ask again
                        time.sleep(5)
                        continue
                    state = st.json().get("state") if st.status_code == 200 else None
                    if state in ("completed", "failed"):
                        body = st.json()
                        self.note("data key rotation finished", state=state,
                                  households=len(body.get("households", [])),
                                  outcomes=_count_states(body.get("households", [])))
                        return
                    time.sleep(5)
                self.note("data key rotation not finished", job=job)
            except (httpx.HTTPError, ValueError) as exc:
                self.note("data key rotation failed to run", error=repr(exc)[:200])

    def guarded(self, name: str, action) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a harness failure is recorded, not fatal
            self.note(f"{name} failed", error=repr(exc)[:300])

    # The faults are steps run by the main thread, never by a helper thread: a restarted
    # process is tied to the thread that spawns it (PR_SET_PDEATHSIG fires when that
    # *thread* exits), so one restarted from a thread that then ended was killed at once.
    def kill_service(self, name: str) -> None:
        self.v.mesh.processes[name].kill()
        self.v.mesh.processes[name].wait()
        self.note(f"{name} killed -9")

    def start_service(self, name: str) -> None:
        self.v.mesh.start_service(name)
        self.note(f"{name} restarted")

    def kill_gateway(self) -> None:
        from services.common.child_process import stop_group

        stop_group(self.v.mesh.processes.pop("gateway"), sig=signal.SIGKILL)
        self.note("gateway killed -9")

    def start_gateway(self) -> None:
        self.v.mesh._spawn("gateway", "gateway", {**self.v.mesh.env(),
                                                  "HEARTH_METRICS_PORT": str(self.v.mesh.gateway_metrics_port)})
        self.note("gateway restarted")

    def kill_privacy_mid_erasure(self) -> None:
        """A household erasure accepted (202: the job is stored), then privacy killed -9
        while it fans the erasure out to the services; on restart the job must resume."""
        account, marker = self.kill_victim
        with self.v.client() as c:
            r = c.post("/v1/delete", json={"scope": {"kind": "household", "account_id": account},
                                            "request_id": f"soakkill-{int(self.t0)}"})
        time.sleep(PRIVACY_KILL_AFTER_ACCEPT_S)
        self.kill_service("privacy")
        job = r.json().get("job_id") if r.status_code == 202 else None
        self.note("erasure accepted before the kill", status=r.status_code, job=job)
        if job:
            self.fault_erasures.append({"deletion_job": job, "account_id": account})
            self.victims[account] = marker

    def feedback_recalibrations(self) -> int | None:
        """The newest calibrator version feedback has stored, summed over variants (read-only,
        from its SQLite file; the count is capped by the purge): fits ran around the kill."""
        import sqlite3

        try:
            with sqlite3.connect(f"file:{self.v.mesh.data_dir / 'feedback.db'}?mode=ro", uri=True, timeout=5) as db:
                return int(db.execute("SELECT coalesce(sum(v), 0) FROM (SELECT max(version) AS v FROM calibrators "
                                      "GROUP BY variant)").fetchone()[0])
        except sqlite3.Error:
            return None

    def kill_feedback_recalibrating(self) -> None:
        before = self.feedback_recalibrations()
        self.kill_service("feedback")
        self.note("feedback killed while recalibrating every second", calibrator_versions_before=before)

    def restart_feedback(self) -> None:
        self.start_service("feedback")
        time.sleep(5)
        self.note("feedback calibrator versions 5 s after its restart", versions=self.feedback_recalibrations())

    def redis_stop(self) -> None:
        self.v.redis.stop()
        self.note("redis-server stopped")

    def redis_start(self) -> None:
        self.v.redis.start()
        self.note("redis-server started (empty)")

    def postgres_restart(self) -> None:
        self.v.postgres.stop()
        self.note("PostgreSQL stopped (fast)")
        self.v.postgres.start()
        self.note("PostgreSQL started")

    def schedule(self) -> list[tuple[float, str, object, tuple | None]]:
        """(seconds into the run, name, action, then): ``then`` = (delay, name, action) runs
        ``delay`` after the action *ended* — a restart RESTART_AFTER_S after its kill, however
        long the kill took (privacy's waits for its erasure's 202 first; on a loaded machine
        the loop's sample can run late, and a restart planned at an absolute time came 0.6 s
        after clustering's kill in a run of session 33)."""
        d = self.args.minutes * 60
        plan = [(0.15 * d, "rotation", lambda: threading.Thread(target=self.guarded, args=("rotation", self.rotate),
                                                                 daemon=True).start(), None)]
        if not self.args.no_faults:
            plan.append((0.30 * d, "kill", lambda: self.kill_service("clustering"),
                         (RESTART_AFTER_S, "restart", lambda: self.start_service("clustering"))))
            if self.sqlite_kills:
                kills = {"attribution": lambda: self.kill_service("attribution"),
                         "privacy": self.kill_privacy_mid_erasure, "feedback": self.kill_feedback_recalibrating,
                         "gateway": self.kill_gateway}
                for name, frac in SQLITE_KILLS.items():
                    restart = {"gateway": self.start_gateway, "feedback": self.restart_feedback}.get(
                        name, lambda n=name: self.start_service(n))
                    plan.append((frac * d, f"kill {name}", kills[name], (RESTART_AFTER_S, f"restart {name}", restart)))
            if self.v.redis is not None:
                plan.append((0.50 * d, "redis stop", self.redis_stop, (REDIS_DOWN_S, "redis start", self.redis_start)))
            if self.v.postgres is not None:
                plan.append((0.70 * d, "postgres", self.postgres_restart, None))
        return sorted(plan, key=lambda x: x[0])

    def run(self) -> dict:
        a, v = self.args, self.v
        duration = a.minutes * 60
        prom = None
        try:
            if self.sqlite_kills:
                os.environ.update(RECALIBRATING_FEEDBACK)   # the mesh copies this process's environment
            v.start_mesh()
            v.wait_mesh()
            log(f"mesh up ({a.backend}); seeding")
            v.seed()
            n_del = int(a.rate * duration * MIX["delete"] * 1.5) + 2
            n_person = int(a.rate * duration * MIX["delete_person"] * 1.5) + 2
            self.t0 = time.time()
            self.seed_victims(n_del, n_person)
            prom, prom_url = start_prometheus(v, v.out / "prometheus")
            v.settle()
            spec = v.spec(mix=MIX, mode="open", rate=a.rate, duration_s=duration, victims=list(self.victims),
                          person_victims=list(self.person_victims), stream_events=True, timeout_s=10.0)
            load = os.getloadavg()
            proc, out_path = v.launch(spec)
            self.t0 = time.time()
            sampler = Sampler(v, self.t0)
            plan = self.schedule()
            log(f"soak: {a.rate}/s for {a.minutes} min, load {load}")
            next_sample = self.t0
            while proc.poll() is None:
                now = time.time()
                if now >= next_sample:
                    s = sampler.take()
                    next_sample = max(next_sample + a.sample_s, time.time())
                    gw = (s["processes"].get("gateway") or {})
                    log(f"  [{s['t']:7.1f}s] sample: gateway rss {gw.get('rss_mb')} fds {gw.get('fds')} "
                        f"load {os.getloadavg()[0]:.1f}")
                while plan and now - self.t0 >= plan[0][0]:
                    _, name, action, then = plan.pop(0)
                    self.guarded(name, action)
                    if then is not None:
                        delay, then_name, then_action = then
                        plan = sorted([*plan, (time.time() - self.t0 + delay, then_name, then_action, None)],
                                      key=lambda x: x[0])
                time.sleep(0.5)
            t_end = time.time()
            sampler.take()
            load_end = os.getloadavg()
            raw = json.loads(out_path.read_text())
            log("reading back acknowledged writes and erasures")
            event_acks = [x for x in raw["acks"] if "event_ids" in x]
            lost_events = v.lost(event_acks)
            erasure = erasure_check(v, raw["acks"] + self.fault_erasures, self.victims)
            erasure["fault_erasures"] = self.fault_erasures
            log("VerifyAudit over the whole log")
            audit = audit_verified(v)
            alerts = fired_alerts(prom_url, self.t0, t_end + 30) if prom else {}
            pending = fired_alerts(prom_url, self.t0, t_end + 30, "pending") if prom else {}
            window = a.window_min * 60
            warm = min(a.warmup_min * 60, duration / 4)
            res = resources(sampler.samples, warm, window, duration)
            report = {
                "command": f"python -m bench.soak --minutes {a.minutes:g} --backend {a.backend} --rate {a.rate:g}"
                           + (" --no-faults" if a.no_faults else ""),
                "date": datetime.fromtimestamp(self.t0, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "load_start": [round(x, 2) for x in load],
                            "load_end": [round(x, 2) for x in load_end]},
                "backend": a.backend, "minutes": a.minutes, "rate": a.rate, "mix": MIX,
                "seed": v.results.get("seed"), "events": self.events,
                "requests": len(raw["requests"]["t"]),
                "status": _count_states([{"state": s} for s in raw["requests"]["status"]]),
                "errors_by_op": _errors_by_op(raw),
                "error_samples": raw.get("error_samples", {}),
                "without_retry_after": raw.get("without_retry_after", {}),
                "generator": raw["generator"],
                "latency_first_vs_last": first_last(raw, warm, window, duration),
                "windows_s": a.sample_s, "first_window_start_s": warm, "window_s": window,
                "resources": res, "not_levelling_off": not_levelling(res),
                "acknowledged": {"event_batches": len(event_acks),
                                 "events": sum(len(x["event_ids"]) for x in event_acks),
                                 "events_lost": lost_events},
                "erasure": erasure,
                "audit": audit,
                "logs": log_findings(v.out / "logs"),
                "gateway_metrics_by_stretch": gateway_route_errors(sampler.samples, self.events),
                "alerts_fired": alerts, "alerts_pending": pending,
            }
            if prom:
                report["prometheus"] = {
                    "gateway_5xx_rate": prom_query_range(prom_url, 'sum(rate(hearth_http_requests_total{status=~"5.."}[1m]))',
                                                         self.t0, t_end),
                    "service_up": prom_query_range(prom_url, "up", self.t0, t_end, "15s"),
                    "dependency_up": prom_query_range(
                        prom_url, "min by (hearth_component, dependency) (hearth_dependency_up)", self.t0, t_end, "15s")}
            (v.out / "windows.json").write_text(json.dumps(latency_windows(raw, a.sample_s)))
            (v.out / "samples.json").write_text(json.dumps(sampler.samples))
            (v.out / "soak.json").write_text(json.dumps(report, indent=1, default=str))
            return report
        finally:
            if prom is not None:
                from services.common.child_process import stop_group

                stop_group(prom)
            v.stop()


def _count_states(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        k = str(r.get("state") or r.get("outcome") or "unknown")
        out[k] = out.get(k, 0) + 1
    return out


def _errors_by_op(raw: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for op, status in zip(raw["requests"]["op"], raw["requests"]["status"]):
        if not status.startswith("2"):
            out.setdefault(op, {})[status] = out.setdefault(op, {}).get(status, 0) + 1
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="The mesh under a steady mix and faults for a long time")
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="postgres")
    p.add_argument("--rate", type=float, default=6.0, help="requests per second, open loop (default 6)")
    p.add_argument("--households", type=int, default=30)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--window-min", type=float, default=5.0, help="the first and last windows compared")
    p.add_argument("--warmup-min", type=float, default=2.0, help="the first window starts after this")
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    soak = Soak(args)

    def on_signal(signum, _frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    report = soak.run()
    print(json.dumps({k: report[k] for k in ("command", "date", "backend", "requests", "status", "without_retry_after",
                                             "latency_first_vs_last", "not_levelling_off", "acknowledged",
                                             "erasure", "audit", "logs", "alerts_fired", "events")}, default=str))
    return report


if __name__ == "__main__":
    main()
