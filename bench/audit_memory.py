"""Memory of the audit writer as its log grows: ``python -m bench.audit_memory [--quick]``.

The 10-minute soak of ``make verify`` saw the privacy process grow (+32 MB/h). tracemalloc
in the running process (docs/benchmarks.md, "Soak") showed two things growing per audit
entry: the in-memory Merkle proof tree (~64 bytes per entry, for as long as the process
runs) and the record-id window that makes a retried record append once (bounded: two
generations of ``dedup_window`` ids). This benchmark appends ``--entries`` audit records
through the real writer on a SQLite file, in batches the size of a busy writer's group
commit, and samples the Python heap (tracemalloc) 60 times along the way, twice in one run:

* ``pruned``: the writer as it ships (the proof tree keeps the upper levels of complete
  1024-leaf chunks and reads a chunk's leaves back for a proof);
* ``whole``: the same writer with the proof tree kept whole (pruning switched off), the
  behaviour before.

For each it reports the heap growth per entry over the last half of the run (after the id
window has filled: ``--entries`` must exceed twice ``dedup_window``), the proof tree's
resident bytes, and the time per entry. Each mode runs in a fresh process so that one does
not inherit the other's heap. The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench._common import cpu_model, log

ROOT = Path(__file__).resolve().parents[1]


def run_mode(mode: str, entries: int, batch: int, every: int, dedup_window: int) -> dict:
    from services.common import audit
    from services.common.identity import Principal, Role
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.audit import merkle
    from services.privacy.audit.writer import AuditWriter
    from services.privacy.keys.signing import generate_private_key
    from services.privacy.migrations import MIGRATIONS

    if mode == "whole":
        merkle.MerkleTree._prune = lambda self: None   # the tree as it was: every level kept
    who = Principal("svc:clustering", Role.SERVICE)
    with tempfile.TemporaryDirectory(prefix="audit-memory-") as tmp:
        db = SqliteDatabase(Path(tmp) / "privacy.db")
        migrate(db, MIGRATIONS)
        writer = AuditWriter(db, generate_private_key(), dedup_window=dedup_window).start()
        tracemalloc.start(1)
        samples = []   # (entries appended, traced bytes, tree resident bytes)
        started = time.perf_counter()
        done, next_sample = 0, every
        try:
            while done < entries:
                n = min(batch, entries - done)
                writer.append([audit.make_record(audit.READ_HOUSEHOLD, f"household:hh-{(done + i) % 5003}",
                                                 details={"rpc": "Assign"}, principal=who)
                               for i in range(n)])
                done += n
                if done >= next_sample or done == entries:
                    next_sample += every
                    with writer.tree_lock:
                        tree_bytes = writer.tree.resident_bytes
                    samples.append((done, tracemalloc.get_traced_memory()[0], tree_bytes))
            seconds = time.perf_counter() - started
        finally:
            writer.close()
            db.close()
            tracemalloc.stop()
    x = np.array([s[0] for s in samples], dtype=float)
    heap = np.array([s[1] for s in samples], dtype=float)
    late = x >= entries / 2
    slope = float(np.polyfit(x[late], heap[late], 1)[0]) if late.sum() >= 3 else None
    return {"mode": mode, "entries": done, "seconds": round(seconds, 1),
            "us_per_entry": round(1e6 * seconds / done, 1),
            "heap_bytes_per_entry_last_half": round(slope, 2) if slope is not None else None,
            "heap_mb_at_half": round(float(heap[late][0]) / 2**20, 2),
            "heap_mb_at_end": round(float(heap[-1]) / 2**20, 2),
            "tree_resident_mb_at_end": round(samples[-1][2] / 2**20, 3),
            "samples": [[int(a), round(b / 2**20, 3), round(c / 2**20, 3)] for a, b, c in samples]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small log (the harness check, not a figure)")
    parser.add_argument("--entries", type=int, default=None, help="audit entries appended per mode")
    # One commit (fsync) per append: on this shared machine a commit takes up to a few
    # hundred ms, so the appends are the size of a busy writer's group commit.
    parser.add_argument("--batch", type=int, default=1000, help="records per append (one group commit)")
    parser.add_argument("--dedup-window", type=int, default=65_536, help="the writer's id window (its default)")
    parser.add_argument("--mode", choices=("pruned", "whole"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.dedup_window, args.batch = args.entries or 6_000, 1_000, 100
    entries = args.entries or 300_000
    every = max(args.batch, entries // 60)
    if args.mode:   # one mode, in this (fresh) process
        result = run_mode(args.mode, entries, args.batch, every, args.dedup_window)
        print(json.dumps(result))
        return result
    results = {}
    for mode in ("pruned", "whole"):
        log(f"{mode}: appending {entries} entries in batches of {args.batch}")
        out = subprocess.run([sys.executable, "-m", "bench.audit_memory", "--mode", mode, "--entries", str(entries),
                              "--batch", str(args.batch), "--dedup-window", str(args.dedup_window)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        log(f"  {mode}: {results[mode]['heap_bytes_per_entry_last_half']} B/entry over the last half, "
            f"heap {results[mode]['heap_mb_at_half']} -> {results[mode]['heap_mb_at_end']} MB, "
            f"proof tree {results[mode]['tree_resident_mb_at_end']} MB, {results[mode]['us_per_entry']} us/entry")
    report = {"entries": entries, "batch": args.batch, "dedup_window": args.dedup_window,
              **{f"{m}_{k}": results[m][k] for m in results
                 for k in ("heap_bytes_per_entry_last_half", "heap_mb_at_half", "heap_mb_at_end",
                           "tree_resident_mb_at_end", "us_per_entry")},
              "samples": {m: results[m]["samples"] for m in results},
              "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
