"""Benchmark of the pure audit-log path (no SQL): ``python -m bench.privacy_audit [--quick]``.

What one "event" costs here, per batch of ``--batch`` entries:
  AuditEntry construction (validation + canonical JSON) + leaf hash + chain hash +
  Merkle frontier append, then one Ed25519 signed tree head per batch, plus appending
  the leaf hashes to the in-memory ``MerkleTree`` that serves proofs.

Also measured: the same work with one tree head per entry (the peer, as a ratio),
full-log verification throughput, and building / proving in a 1M-leaf tree.

Progress goes to stderr; the last stdout line is one JSON object (keys of
the benchmark conventions, docs/benchmarks.md where they exist: ``audit_events_per_s``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from services.privacy.audit import domain as audit, merkle
from services.privacy.keys.signing import Ed25519PrivateKey
from bench._common import cpu_model, log

TARGET_EVENTS_PER_S = 20_000
T0 = datetime(2025, 1, 1, tzinfo=UTC)
EVENT_TYPES = list(audit.EventType)
ROLES = list(audit.Role)


def raw_events(n: int, start: int = 0) -> list[tuple]:
    """Field tuples as the servicer would receive them (before domain objects exist)."""
    return [
        (
            i,
            T0 + timedelta(milliseconds=i),
            EVENT_TYPES[i % len(EVENT_TYPES)].value,
            f"user-{i % 97}",
            ROLES[i % len(ROLES)].value,
            f"household:{i % 5003}",
            "success",
            f"{i:032x}",
            {"sessions": i % 17, "model_version": 3},
        )
        for i in range(start, start + n)
    ]


def run_append(
    events: list[tuple], batch: int, key: Ed25519PrivateKey
) -> tuple[float, float, list[float], dict[str, float]]:
    """Append all events in batches.

    Returns (wall seconds, CPU seconds of this process, per-batch wall seconds,
    CPU seconds per stage). CPU time is reported next to wall time because the
    benchmark machine is shared: wall time includes waiting for a core.
    """
    state = audit.AuditState()
    tree = merkle.MerkleTree()
    per_batch: list[float] = []
    stages = dict.fromkeys(("construct", "append_batch", "proof_tree", "sign"), 0.0)
    clock = time.process_time
    start_all, cpu_all = time.perf_counter(), clock()
    for pos in range(0, len(events), batch):
        t = time.perf_counter()
        c0 = clock()
        entries = [audit.AuditEntry(*fields) for fields in events[pos : pos + batch]]
        c1 = clock()
        state, leaves, _chains = audit.append_batch(state, entries)
        c2 = clock()
        tree.extend(leaves)
        c3 = clock()
        audit.sign_tree_head(state, key, entries[-1].ts)
        c4 = clock()
        per_batch.append(time.perf_counter() - t)
        stages["construct"] += c1 - c0
        stages["append_batch"] += c2 - c1
        stages["proof_tree"] += c3 - c2
        stages["sign"] += c4 - c3
    total, cpu = time.perf_counter() - start_all, clock() - cpu_all
    assert tree.root() == state.root  # the proof tree and the frontier agree
    return total, cpu, per_batch, stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 60 s)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    quick = args.quick
    n_events = 20_000 if quick else 200_000
    repeats = args.repeats or (3 if quick else 5)
    n_single = 1_000 if quick else 5_000
    big_tree = 100_000 if quick else 1_000_000
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"bench").digest())

    log(f"generating {n_events} raw events")
    events = raw_events(n_events)

    rates, cpu_rates, batch_times, stage_runs = [], [], [], []
    for r in range(repeats):
        total, cpu, per_batch, stages = run_append(events, args.batch, key)
        rates.append(n_events / total)
        cpu_rates.append(n_events / cpu)
        batch_times.extend(per_batch)
        stage_runs.append(stages)
        log(f"repeat {r + 1}/{repeats}: {rates[-1]:,.0f} events/s wall, "
            f"{cpu_rates[-1]:,.0f} events per CPU-second (batch {args.batch})")
    events_per_s = statistics.median(rates)
    breakdown_us = {
        stage: round(statistics.median(run[stage] for run in stage_runs) / n_events * 1e6, 2)
        for stage in stage_runs[0]
    }

    # Peer: the same work with a signed tree head after every single entry.
    single_rates = []
    for _ in range(repeats):
        total, _, _, _ = run_append(events[:n_single], 1, key)
        single_rates.append(n_single / total)
    single_per_s = statistics.median(single_rates)
    log(f"one tree head per entry: {single_per_s:,.0f} events/s")

    # Offline verification of the whole log (what `audit verify` does).
    entries = [audit.AuditEntry(*f) for f in events]
    state, _, chains = audit.append_batch(audit.AuditState(), entries)
    sth = audit.sign_tree_head(state, key, T0)
    verify_rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = audit.verify_log(entries, sth, key.public_key(), chain_hashes=chains)
        verify_rates.append(n_events / (time.perf_counter() - t))
        assert result.ok, result
    log(f"verify_log: {statistics.median(verify_rates):,.0f} events/s")

    # A large tree: build from stored leaf hashes (service restart), then proofs.
    log(f"building a {big_tree:,}-leaf tree")
    rng = np.random.default_rng(7)
    leaf_hashes = rng.integers(0, 256, size=(big_tree, 32), dtype=np.uint8)
    build_times = []
    for _ in range(1 if not quick else 2):
        t = time.perf_counter()
        tree = merkle.MerkleTree.from_leaf_hashes(leaf_hashes)
        build_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    frontier = merkle.Frontier().extend(leaf_hashes)
    frontier_s = time.perf_counter() - t
    root = tree.root()
    assert frontier.root() == root
    indices = rng.integers(0, big_tree, size=200)
    incl, cons, verify_us = [], [], []
    for i in indices:
        i = int(i)
        t = time.perf_counter()
        proof = tree.inclusion_proof(i)
        incl.append(time.perf_counter() - t)
        t = time.perf_counter()
        ok = merkle.verify_inclusion(bytes(leaf_hashes[i]), i, big_tree, proof, root)
        verify_us.append(time.perf_counter() - t)
        assert ok
        old = max(1, i)
        t = time.perf_counter()
        cproof = tree.consistency_proof(old)
        cons.append(time.perf_counter() - t)
        assert merkle.verify_consistency(old, big_tree, tree.root(old), root, cproof)
    tree_mb = sum(len(level) for level in tree._levels) / 1e6  # noqa: SLF001 - measurement

    ms = sorted(x * 1000 for x in batch_times)
    result_json = {
        "audit_events_per_s": round(events_per_s),
        "audit_events_per_cpu_s": round(statistics.median(cpu_rates)),
        "audit_cpu_us_per_event": breakdown_us,
        "audit_batch_size": args.batch,
        "audit_batch_p50_ms": round(ms[len(ms) // 2], 3),
        "audit_batch_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
        "audit_target_events_per_s": TARGET_EVENTS_PER_S,
        "audit_vs_target_ratio": round(events_per_s / TARGET_EVENTS_PER_S, 2),
        "audit_single_sth_events_per_s": round(single_per_s),
        "audit_batch_vs_single_ratio": round(events_per_s / single_per_s, 1),
        "audit_verify_events_per_s": round(statistics.median(verify_rates)),
        "merkle_leaves": big_tree,
        "merkle_build_s": round(statistics.median(build_times), 3),
        "merkle_frontier_build_s": round(frontier_s, 3),
        "merkle_tree_mb": round(tree_mb, 1),
        "inclusion_proof_us": round(statistics.median(incl) * 1e6, 1),
        "inclusion_verify_us": round(statistics.median(verify_us) * 1e6, 1),
        "consistency_proof_us": round(statistics.median(cons) * 1e6, 1),
        "events": n_events,
        "repeats": repeats,
        "quick": quick,
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    print(json.dumps(result_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
