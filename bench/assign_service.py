"""The service's own batch throughput: ``AssignSessions`` through real gRPC on a running
mesh (every service and the gateway as their own processes, SQLite, as `make run`).

Seeds ``households`` households through the public HTTP API (events in, models fitted
by the service in the background), collects their closed sessions' feature vectors,
then streams ``messages`` AssignSessions messages of ``batch`` vectors each (households
mixed at random within a message, as a nightly re-scoring job would send them) and
times them. Every answer is what a caller gets: scored by the vectorised batch scorer,
recalibrated, logged durably as a prediction (one transaction per message) and
converted to protobuf.

Reported: sessions per wall second (client's view, median of the repeats) and per
CPU second of the clustering process (its /proc utime+stime over the same window; on
a shared machine the CPU figure is the stable one), the latter also over all the repeats
at once (``assign_sessions_per_service_cpu_s_all``: one repeat is ~1 s of CPU, read in
10 ms ticks). bench/assign.py puts these beside the in-process scorer's figure measured
in the same run; ``python -m bench.assign_service [--repeats N]`` runs this part alone
(what an A/B of the service path alternates).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np

from bench._common import log, process_cpu_s
from bench.verify import seed_fitted_households
from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.clustering.domain import features as F
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
from services.testing.mesh import Mesh, write_api_key


def _seed(mesh: Mesh, key: str, households: int, days: int, timeout_s: float) -> dict[str, np.ndarray]:
    """account -> (n, FEATURE_DIM) float32 vectors of its closed sessions, once fitted."""
    rng = random.Random(7)
    accounts = [f"bench-hh-{i:04d}" for i in range(households)]
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=60) as c:
        fitted = seed_fitted_households(c, accounts, rng, days, timeout_s)
    vectors = {account: np.asarray([s["feature_vector"] for s in h["sessions"] if s["feature_vector"]],
                                   dtype=np.float32) for account, h in fitted.items()}
    if len(vectors) < households // 2:
        raise RuntimeError(f"only {len(vectors)} of {households} households got a model in {timeout_s} s")
    return vectors


def measure(households: int = 100, days: int = 30, batch: int = 1000, messages: int = 20,
            repeats: int = 5, timeout_s: float = 600.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="hearth-bench-assign-") as tmp:
        base = Path(tmp)
        mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs")
        mesh.data_dir.mkdir(parents=True)
        key = write_api_key(mesh.data_dir / "gateway-keys.json", "bench-admin", "admin")
        try:
            mesh.start_healthy(180)
            started = time.perf_counter()
            vectors = _seed(mesh, key, households, days, timeout_s)
            log(f"service: seeded {len(vectors)} households in {time.perf_counter() - started:.0f} s")
            admin = Principal("bench-admin", Role.ADMIN)
            token = mesh.signer("gateway").sign(admin, audience="clustering")   # as the gateway forwards it
            metadata = [(PRINCIPAL_KEY, admin.id), (ROLE_KEY, admin.role.value), (TOKEN_KEY, token)]
            accounts = sorted(vectors)
            rng = np.random.default_rng(1)
            requests = []
            for m in range(messages):
                who = rng.integers(len(accounts), size=batch)
                X = np.vstack([vectors[accounts[h]][rng.integers(vectors[accounts[h]].shape[0])] for h in who])
                requests.append(cpb.AssignSessionsRequest(
                    batch_id=f"b{m}", account_ids=[accounts[h] for h in who], feature_vectors=F.to_bytes(X),
                    feature_schema_version=F.FEATURE_SCHEMA_VERSION))
            pid = mesh.processes["clustering"].pid
            wall, cpu = [], []
            cpu_all = 0.0
            with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}",
                                       options=[("grpc.max_receive_message_length", 256 << 20)]) as channel:
                stub = cpb_grpc.ClusteringServiceStub(channel)
                answered = list(stub.AssignSessions(iter(requests[:2]), metadata=metadata, timeout=600))  # warm-up
                assert all(len(a.assignments) == batch for a in answered)
                for r in range(repeats):
                    c0, t0 = process_cpu_s(pid), time.perf_counter()
                    answered = list(stub.AssignSessions(iter(requests), metadata=metadata, timeout=600))
                    dt, dc = time.perf_counter() - t0, process_cpu_s(pid) - c0
                    n = sum(len(a.assignments) for a in answered)
                    if n != batch * messages:
                        raise RuntimeError(f"AssignSessions answered {n} of {batch * messages} vectors")
                    wall.append(n / dt)
                    cpu.append(n / max(dc, 1e-9))
                    cpu_all += dc
                    log(f"service repeat {r}: {n / dt:,.0f} sessions/s wall, {n / max(dc, 1e-9):,.0f} per "
                        f"clustering CPU second")
        finally:
            mesh.stop()
    return {
        "assign_sessions_per_s": round(float(np.median(wall))),
        "assign_sessions_per_service_cpu_s": round(float(np.median(cpu))),
        "assign_sessions_per_service_cpu_s_all": round(batch * messages * repeats / max(cpu_all, 1e-9)),
        "households": len(vectors),
        "vectors_per_message": batch,
        "messages_per_stream": messages,
        "repeats": repeats,
        "storage": "sqlite",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="the service's AssignSessions throughput alone (JSON)")
    ap.add_argument("--households", type=int, default=100)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1000, help="vectors per message")
    ap.add_argument("--messages", type=int, default=20, help="messages per stream")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(measure(households=args.households, days=args.days, batch=args.batch,
                             messages=args.messages, repeats=args.repeats)))


if __name__ == "__main__":
    main()
