"""Deletion latency across the real services: ``python -m bench.privacy [--quick]``.

A store of ``--households`` households (default 10,000; ``--quick`` 1,000) is generated
directly through the stores (not HTTP) with encryption at rest on, exactly as the
services write it: per household 3 devices, 4 sessions of 5 events (20 events),
sessions assigned to persons p1/p2, 4 touchpoints (half with a known person, half
resolved through clustering), 1 conversion and 4 predictions. Then the four services
run as in-process gRPC servers over those files (real servicers, stores, peers and
the privacy deletion worker) and, for each scope, ``--deletions`` households are
deleted one after the other: the latency is from ``RequestDeletion`` until
``GetDeletion`` reports the job completed (polled every 2 ms), i.e. the durable job,
every service's Erase in order, the crypto-shred (household) and the signed receipt.

Targets (issue 6): household <= 1 s, person <= 500 ms, device <= 200 ms (p99).
``audit_events_per_s`` is merged from ``bench/privacy_audit_e2e.py`` run as a subprocess
(its last JSON line); ``--skip-audit`` leaves it out.

Progress goes to stderr; the last stdout line is one JSON object (keys of
the benchmark conventions, docs/benchmarks.md, plus more).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench._common import cpu_model, log

TARGETS_MS = {"household": 1000.0, "person": 500.0, "device": 200.0}
DEVICES = (("tv-1", "tv"), ("ph-1", "mobile"), ("tab-1", "tablet"))
DAY = 86400.0


def account(i: int) -> str:
    return f"hh-{i:06d}"


def generate(data_dir: Path, households: int, seed: int = 7) -> dict[str, int]:
    """Write the store through the service stores (SQLite files of a mesh data dir)."""
    from services.attribution.domain.records import Conversion, Touchpoint
    from services.attribution.store import AttributionStore
    from services.clustering.domain.events import ViewingEvent
    from services.clustering.store import ClusteringStore
    from services.common.field_crypto import FieldCipher
    from services.common.storage.sql import SqliteDatabase
    from services.feedback.store import FeedbackStore, PredictionRecord
    from services.privacy.keys.store import DataKeyStore
    from services.privacy.keys.app import KeyService, load_keks
    from services.privacy.consent.store import ConsentStore

    rng = random.Random(seed)
    pdb = SqliteDatabase(data_dir / "privacy.db")
    ConsentStore(pdb).migrate()
    keys = KeyService(DataKeyStore(pdb), *load_keks("", "", data_dir))
    cipher = FieldCipher(lambda a, v: keys.data_key(a, v))
    cdb, adb, fdb = (SqliteDatabase(data_dir / f"{s}.db") for s in ("clustering", "attribution", "feedback"))
    for db in (pdb, cdb, adb, fdb):
        # Generation only (not measured): no fsync per transaction. The services run
        # later with the normal synchronous=FULL connections.
        db._conn().execute("PRAGMA synchronous=OFF")
    clustering = ClusteringStore(cdb, cipher=cipher)
    attribution = AttributionStore(adb, cipher=cipher)
    feedback = FeedbackStore(fdb)
    for store in (clustering, attribution, feedback):
        store.migrate()
    base = time.time() - 30 * DAY
    totals = {"events": 0, "touchpoints": 0, "predictions": 0}
    started = time.perf_counter()
    batch = 250
    for lo in range(0, households, batch):
        events, tps, convs, preds = [], [], [], []
        for i in range(lo, min(households, lo + batch)):
            acct = account(i)
            start = base + rng.uniform(0, 20 * DAY)
            # tv: 2 sessions a day apart; phone and tablet: one each
            plan = [(0, 0.0), (0, DAY), (1, 2 * DAY), (2, 3 * DAY)]
            for s, (d, offset) in enumerate(plan):
                device, dtype = DEVICES[d]
                for k in range(5):
                    events.append(ViewingEvent(
                        event_id=f"{acct}-{s}-{k}", account_id=acct, device_id=device, device_type=dtype,
                        ts=start + offset + k * 600, kind="heartbeat", title_id=f"title-{rng.randrange(500)}",
                        series_id=f"series-{rng.randrange(50)}", genres=("drama", "crime") if d else ("kids",),
                        duration_s=600.0, maturity="adult" if d else "kids", country="FR", vpn=False,
                        profile_hint=None))
            for t in range(4):
                device = DEVICES[t % 3][0]
                tps.append(Touchpoint(f"{acct}-t{t}", acct, device, start + t * DAY - 3600, "email",
                                      f"camp-{t}", "p1" if t < 2 else None))
            convs.append(Conversion(f"{acct}-c0", acct, start + 3 * DAY + 7200, "subscribe", 9.99, None))
            for q in range(4):
                preds.append(PredictionRecord(f"{acct}-q{q}", acct, f"{acct}-s{q}", "p1" if q % 2 == 0 else "p2",
                                              {"p1": 0.7, "p2": 0.3}, "kmeans", 1, start + q * DAY, False, 2))
        clustering.ingest(events)
        for i in range(lo, min(households, lo + batch)):
            acct = account(i)
            sessions = clustering.closed_sessions(acct)
            clustering.set_persons(acct, {s.session_id: ("p1" if n % 2 == 0 else "p2")
                                          for n, s in enumerate(sorted(sessions, key=lambda s: s.start_ts))})
        attribution.record_touchpoints(tps)
        attribution.record_conversions(convs)
        feedback.record_predictions(preds)
        totals["events"] += len(events)
        totals["touchpoints"] += len(tps)
        totals["predictions"] += len(preds)
        done = min(households, lo + batch)
        if done % 1000 == 0 or done == households:
            log(f"  generated {done}/{households} households ({time.perf_counter() - started:.0f} s)")
    for db in (pdb, cdb, adb, fdb):
        db.close()
    return totals


def measure(mesh, scope_of, households: list[int]) -> tuple[list[float], list[float]]:
    """Client latency (request -> observed completed) and server-side job duration, ms."""
    from hearth.privacy.v1 import privacy_pb2 as ppb
    from services.common import identity

    stub = mesh.stub("privacy", identity.Principal("bench-officer", identity.Role.PRIVACY_OFFICER))
    client, server = [], []
    for i in households:
        t0 = time.perf_counter()
        job = stub.RequestDeletion(ppb.RequestDeletionRequest(scope=scope_of(account(i)), reason="bench"))
        while True:
            r = stub.GetDeletion(ppb.GetDeletionRequest(job_id=job.job_id))
            if r.state in (ppb.JOB_STATE_COMPLETED, ppb.JOB_STATE_FAILED):
                break
            time.sleep(0.002)
        client.append((time.perf_counter() - t0) * 1000)
        if r.state != ppb.JOB_STATE_COMPLETED:
            raise RuntimeError(f"deletion of {account(i)} failed: {r}")
        server.append((r.completed_at.ToDatetime(tzinfo=UTC) - r.requested_at.ToDatetime(tzinfo=UTC))
                      .total_seconds() * 1000)
    return client, server


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "max": round(float(a.max()), 2), "n": len(values)}


def audit_throughput(quick: bool) -> dict:
    for module, label in (("bench.privacy_audit_e2e", "e2e"), ("bench.privacy_audit", "pure")):
        if not (Path(__file__).parent / f"{module.split('.')[-1]}.py").exists():
            continue
        log(f"running {module} {'--quick' if quick else ''} ...")
        proc = subprocess.run([sys.executable, "-m", module, *(["--quick"] if quick else [])],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            log(f"{module} gave no JSON (exit {proc.returncode}): {proc.stderr[-500:]}")
            continue
        return {"audit_events_per_s": result.get("audit_events_per_s"), "audit_source": label,
                "audit_detail": result}
    return {"audit_events_per_s": None, "audit_source": "unavailable"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="600 households, 8 deletions per scope (< 60 s)")
    parser.add_argument("--households", type=int, default=None)
    parser.add_argument("--deletions", type=int, default=None, help="deletions per scope")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated store here")
    args = parser.parse_args(argv)
    households = args.households or (600 if args.quick else 10_000)
    deletions = args.deletions or (8 if args.quick else 50)
    if households < 4 * deletions:
        parser.error("--households must be at least 4 x --deletions")

    from hearth.common.v1 import common_pb2
    from services.common.pbutil import float_to_ts
    from services.testing import inprocess

    import logging
    logging.basicConfig(level=logging.ERROR)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="hearth-bench-privacy-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"generating {households} households in {data_dir} ...")
    t = time.perf_counter()
    totals = generate(data_dir, households)
    generate_s = time.perf_counter() - t
    log(f"generated {totals} in {generate_s:.1f} s; starting the services in-process ...")
    mesh = inprocess.start(data_dir, privacy={"deletion_poll_s": 0.5})
    chosen = random.Random(11).sample(range(households), 4 * deletions)
    groups = {scope: chosen[k * deletions:(k + 1) * deletions]
              for k, scope in enumerate(("device", "person", "household", "window"))}
    scopes = {
        "device": lambda a: common_pb2.ErasureScope(account_id=a, device_id="ph-1"),
        "person": lambda a: common_pb2.ErasureScope(account_id=a, person_id="p1"),
        "household": lambda a: common_pb2.ErasureScope(account_id=a, household=True),
        "window": lambda a: common_pb2.ErasureScope(account_id=a, window=common_pb2.TimeRange(
            start=float_to_ts(time.time() - 60 * DAY), end=float_to_ts(time.time() - 18 * DAY))),
    }
    results: dict = {}
    try:
        measure(mesh, scopes["household"], [chosen[-1]])  # warm-up: channels, caches, JIT-free paths
        for scope, fn in scopes.items():
            ids = [i for i in groups[scope] if i != chosen[-1]]
            log(f"deleting {len(ids)} x {scope} ...")
            client, server = measure(mesh, fn, ids)
            results[scope] = (pct(client), pct(server))
            log(f"  {scope}: client p50 {results[scope][0]['p50']} ms, p99 {results[scope][0]['p99']} ms; "
                f"server p50 {results[scope][1]['p50']} ms")
    finally:
        mesh.stop()
    out: dict = {
        "households": households,
        **{f"delete_{s}_ms": {"p50": results[s][0]["p50"], "p99": results[s][0]["p99"],
                              "max": results[s][0]["max"], "n": results[s][0]["n"],
                              "server_p50": results[s][1]["p50"], "server_p99": results[s][1]["p99"]}
           for s in results},
        "targets_ms_p99": TARGETS_MS,
        "targets_met": {s: results[s][0]["p99"] <= TARGETS_MS[s] for s in TARGETS_MS},
        "store": {**totals, "generate_s": round(generate_s, 1), "backend": "sqlite", "encryption_at_rest": True},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "quick": args.quick,
    }
    if not args.skip_audit:
        out.update(audit_throughput(args.quick))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
