"""A SQLite service stays SERVING while a long write holds its database (attack27).

The health monitor's ``database`` check ran ``SELECT 1`` in a *write* transaction, which on
SQLite is ``BEGIN IMMEDIATE``: it waited for the database's one write lock. A long write —
the data key rotation of a household of 100,000 events holds clustering's for ~22 s while it
re-encrypts them, a batch of a few thousand new households for over 10 s — made the check
"no answer in 5 s" and, the check being critical, the whole service NOT_SERVING (seen on
`scripts/run.py`: "health: NOT_SERVING (degraded: database: no answer in 15 s)"), so a
kubelet's readiness probe would take the only replica (SQLite runs one) out of its Service,
reads included, which the write lock does not block (WAL). The check reads now."""

from __future__ import annotations

import sqlite3
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _status(stub) -> str:
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def test_a_long_write_holding_the_database_does_not_make_the_service_not_serving(mesh):
    writer = sqlite3.connect(mesh.data_dir / "clustering.db", timeout=10, isolation_level=None)
    seen, reads = [], []
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert _status(stub) == "SERVING"
        writer.execute("BEGIN IMMEDIATE")   # the write lock, as a long Rekey or ingest holds it
        try:
            # The monitor checks every 2 s and gives a check 5 s: two rounds past it.
            deadline = time.monotonic() + 11.0
            while time.monotonic() < deadline:
                seen.append(_status(stub))
                time.sleep(0.5)
            reads.append(httpx.get(f"{mesh.url}/v1/household/lock-probe-unknown",
                                   headers={"X-API-Key": mesh.api_key}, timeout=15).status_code)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    # Before the fix: SERVING for ~6 s, then NOT_SERVING until the lock went.
    assert set(seen) == {"SERVING"}, seen
    assert reads == [404], reads   # a read is served while the write lock is held
