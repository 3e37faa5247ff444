"""Durable audit append throughput through the real store:
``python -m bench.privacy_audit_e2e [--quick] [--dsn postgresql://...] [--grpc]``.

What one "event" costs here: a record built by the audit client (``audit.make_record``,
as every service's sink does), handed to ``AuditApp.append`` by one of ``--threads``
concurrent appenders in chunks of ``--chunk`` records (a sink sends up to 500 per
AppendAudit); the group-commit writer assigns seqs, builds the entries (canonical
JSON), hashes leaves and chain, signs one tree head per batch and writes entries +
state + STH in ONE transaction (SQLite: WAL, synchronous=FULL; PostgreSQL: whatever
the server's fsync setting is, reported), then extends the in-memory proof tree and
runs the suspicious-activity detector. ``append`` returns only after the commit, so
every counted event is durable. (Since the writer's fast path, the appender's own
thread validates and encodes its chunk before handing it over, and the writer stamps
the seqs: the same work, counted the same way, in the same process.)

Reported per backend (median over ``--repeats`` fresh logs):
  audit_events_per_s                concurrent appenders, chunks of --chunk
  audit_events_per_cpu_s            the same per CPU-second of the process
  single_record_calls_events_per_s  the same with one record per call (worst case)
  grpc_events_per_s                 (--grpc) AppendAudit over a real in-process gRPC
                                    server, --threads clients, 500 records per call
  inclusion_proof_ms_p50 / verify_events_per_s  after the run

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

from services.common import audit
from services.common.identity import Principal, Role
from services.common.storage.sql import PostgresDatabase, SqliteDatabase, migrate
from services.privacy.audit.app import AuditApp
from services.privacy.keys.signing import generate_private_key
from services.privacy.migrations import MIGRATIONS
from bench._common import cpu_model, log

TARGET_EVENTS_PER_S = 20_000
PRINCIPALS = [Principal(f"user-{i}", Role.ANALYST) for i in range(97)]
EVENTS = [audit.INGEST, audit.ASSIGN, audit.ATTRIBUTION_RUN, audit.FEEDBACK]



def records(n: int, offset: int = 0) -> list[audit.AuditRecord]:
    return [audit.make_record(EVENTS[i % len(EVENTS)], f"household:acc-{(offset + i) % 5000}",
                              details={"rpc": "bench", "n": i}, principal=PRINCIPALS[i % 97],
                              trace_id=f"{offset + i:032x}") for i in range(n)]


class Backend:
    def __init__(self, name: str, dsn: str | None) -> None:
        self.name, self.dsn = name, dsn
        self._tmp = tempfile.TemporaryDirectory(prefix="hearth-audit-bench-")
        self._count = 0

    def fresh(self):
        self._count += 1
        if self.dsn is None:
            db = SqliteDatabase(os.path.join(self._tmp.name, f"audit{self._count}.db"))
        else:
            db = PostgresDatabase(self.dsn, f"bench_audit_{os.getpid()}_{self._count}", max_size=8)
        migrate(db, MIGRATIONS)
        return db

    def drop(self, db) -> None:
        if self.dsn is not None:
            with db.transaction() as tx:
                tx.execute(f'DROP SCHEMA "{db.schema}" CASCADE')
        db.close()

    def fsync_setting(self) -> str:
        if self.dsn is None:
            return "sqlite WAL synchronous=FULL"
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            fsync = conn.execute("SHOW fsync").fetchone()[0]
            commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
        return f"postgres fsync={fsync} synchronous_commit={commit}"


def run_appenders(app: AuditApp, batch: list[audit.AuditRecord], threads: int, chunk: int,
                  cpu: list[float] | None = None) -> float:
    """Events per wall second; appends events per CPU-second of this process to ``cpu``
    (the machine is shared, so wall time includes waiting for a core)."""
    chunks = [batch[i:i + chunk] for i in range(0, len(batch), chunk)]
    started, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        acked = sum(len(s) for s in pool.map(app.append, chunks))
    elapsed = time.perf_counter() - started
    if cpu is not None:
        cpu.append(len(batch) / (time.process_time() - cpu0))
    assert acked == len(batch)
    return len(batch) / elapsed


def run_grpc(app: AuditApp, batch: list[audit.AuditRecord], threads: int) -> float:
    import grpc

    from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
    from services.common.server import build_server
    from services.privacy.audit.servicer import AuditLogServicer

    servicer = AuditLogServicer(app)

    def register(server):
        ppb_grpc.add_AuditLogServicer_to_server(servicer, server)
        return ["hearth.privacy.v1.AuditLog"]

    running = build_server("privacy", register, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = ppb_grpc.AuditLogStub(channel)
    metadata = Principal("svc:bench", Role.SERVICE).metadata("privacy")
    requests = [audit.to_append_request(batch[i:i + 500]) for i in range(0, len(batch), 500)]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: stub.AppendAudit(r, metadata=metadata, timeout=60), requests))
        return len(batch) / (time.perf_counter() - started)
    finally:
        channel.close()
        running.stop(0)


def bench_backend(backend: Backend, args) -> dict:
    results: dict[str, list[float]] = {"audit_events_per_s": [], "single_record_calls_events_per_s": [],
                                       "grpc_events_per_s": []}
    proof_ms: list[float] = []
    per_cpu_s: list[float] = []
    verify_rate: list[float] = []
    for repeat in range(args.repeats):
        batch = records(args.events, repeat * args.events)
        db = backend.fresh()
        app = AuditApp(db, generate_private_key())
        try:
            rate = run_appenders(app, batch, args.threads, args.chunk, per_cpu_s)
            results["audit_events_per_s"].append(rate)
            single = records(args.single_events, 10**9 + repeat * args.single_events)
            results["single_record_calls_events_per_s"].append(run_appenders(app, single, args.threads, 1))
            if args.grpc:
                results["grpc_events_per_s"].append(
                    run_grpc(app, records(args.events, 2 * 10**9 + repeat * args.events), args.threads))
            size = app.writer.size
            t = []
            for i in range(200):
                s0 = time.perf_counter()
                app.inclusion_proof((i * 7919) % size)
                t.append((time.perf_counter() - s0) * 1000)
            proof_ms.append(statistics.median(t))
            s0 = time.perf_counter()
            checked = app.verify()
            verify_rate.append(checked.entries / (time.perf_counter() - s0))
            assert checked.result.ok, checked.result.message
            log(f"{backend.name} repeat {repeat + 1}/{args.repeats}: {rate:,.0f} events/s "
                f"(chunks of {args.chunk}, {args.threads} threads), one-record calls "
                f"{results['single_record_calls_events_per_s'][-1]:,.0f}/s"
                + (f", gRPC {results['grpc_events_per_s'][-1]:,.0f}/s" if args.grpc else "")
                + f"; log of {size} verified")
        finally:
            app.close()
            backend.drop(db)
    out = {k: round(statistics.median(v)) for k, v in results.items() if v}
    out["runs"] = {k: [round(x) for x in v] for k, v in results.items() if v}
    out["audit_events_per_cpu_s"] = round(statistics.median(per_cpu_s))
    out["inclusion_proof_ms_p50"] = round(statistics.median(proof_ms), 4)
    out["verify_events_per_s"] = round(statistics.median(verify_rate))
    out["durability"] = backend.fsync_setting()
    out["target_met"] = out["audit_events_per_s"] >= TARGET_EVENTS_PER_S
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (< 60 s)")
    parser.add_argument("--dsn", default=os.environ.get("HEARTH_BENCH_POSTGRES_DSN"),
                        help="also run on this PostgreSQL (a throwaway schema per repeat)")
    parser.add_argument("--grpc", action="store_true", help="also measure AppendAudit over gRPC")
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    args.events = args.events or (20_000 if args.quick else 100_000)
    args.single_events = 2_000 if args.quick else 10_000
    args.repeats = args.repeats or (1 if args.quick else 3)
    backends = [Backend("sqlite", None)] + ([Backend("postgres", args.dsn)] if args.dsn else [])
    report: dict = {"events": args.events, "threads": args.threads, "chunk": args.chunk,
                    "repeats": args.repeats, "target_events_per_s": TARGET_EVENTS_PER_S,
                    "machine": {"cores": os.cpu_count(), "cpu": cpu_model(),
                                "load_avg_1m": round(os.getloadavg()[0], 2)},
                    "date": date.today().isoformat()}
    for backend in backends:
        log(f"--- {backend.name}")
        report[backend.name] = bench_backend(backend, args)
    # The machine is shared: say how busy it was at the end too.
    report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    report["audit_events_per_s"] = report["sqlite"]["audit_events_per_s"]
    report["audit_events_per_cpu_s"] = report["sqlite"]["audit_events_per_cpu_s"]
    if "postgres" in report:
        report["audit_events_per_s_postgres"] = report["postgres"]["audit_events_per_s"]
        report["audit_events_per_cpu_s_postgres"] = report["postgres"]["audit_events_per_cpu_s"]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
