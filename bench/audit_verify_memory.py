"""Memory and time of ``VerifyAudit`` as the log grows, streamed vs whole-log:
``OMP_NUM_THREADS=1 python -m bench.audit_verify_memory [--sizes 10000,100000,1000000] [--baseline 960ab3f]``.

Until session 32 the verification held every entry of the log at once (the parsed entries,
their chain hashes, a bytearray of every leaf hash, then a second pass building a whole
Merkle tree for the stored heads); now ``LogVerifier`` streams the rows a bounded page at a
time. For each size a SQLite log is appended through the real writer (records of ~360
canonical bytes, batches of 5,000), then ``AuditProofs.verify`` runs over it in fresh
processes, alternating:

* ``after``: this tree's code;
* ``before``: the baseline commit's ``services/`` (``git archive``), the same call on the same file.

Each run reports the verification's wall time, the growth of the process's peak RSS over
the verification (VmHWM after minus the resident size just before; the process's
imports and the open database are before) and, in a separate process per mode, the Python
heap peak of the verification under tracemalloc (which slows it: not timed). The writer is
not started (its start-up rebuild of the proof tree is not the verification): a stand-in
gives the verifier the public key and no in-process head, as a restarted service has.
The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench._common import cpu_model, log

ROOT = Path(__file__).resolve().parents[1]


def build_log(path: Path, entries: int, batch: int = 5_000) -> str:
    """A SQLite audit log of ``entries`` entries at ``path``; returns the public key (PEM)."""
    from services.common import audit
    from services.common.identity import Principal, Role
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.audit.writer import AuditWriter
    from services.privacy.keys.signing import generate_private_key, public_key_to_pem
    from services.privacy.migrations import MIGRATIONS

    who = Principal("svc:clustering", Role.SERVICE)
    key = generate_private_key()
    db = SqliteDatabase(path)
    migrate(db, MIGRATIONS)
    writer = AuditWriter(db, key, max_batch=batch).start()
    try:
        done = 0
        while done < entries:
            n = min(batch, entries - done)
            writer.append([audit.make_record(audit.READ_HOUSEHOLD, f"household:hh-{(done + i) % 5003}",
                                             details={"rpc": "Assign", "code": "OK", "component": "clustering"},
                                             principal=who) for i in range(n)], timeout_s=600)
            done += n
    finally:
        writer.close()
        db.close()
    return public_key_to_pem(key.public_key())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak resident size (VmHWM). Not ``ru_maxrss``: Linux carries the
    peak of the forked parent's copy over the exec into it (this benchmark's parent holds
    the 1M-entry writer it appended with: 110 MB), which read as 50 MB of growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def verify_once(db_path: str, public_pem: str, traced: bool) -> dict:
    """One verification in this process (the code on sys.path: this tree's or the baseline's)."""
    import tracemalloc

    from services.common.storage.sql import SqliteDatabase
    from services.privacy.audit.proofs import AuditProofs
    from services.privacy.audit.store import AuditStore
    from services.privacy.keys.signing import load_public_key

    class RestartedWriter:   # what AuditProofs.verify asks of the writer
        public_key = load_public_key(public_pem)

        @staticmethod
        def latest_sth():
            return None

    db = SqliteDatabase(Path(db_path))
    proofs = AuditProofs(AuditStore(db), RestartedWriter())
    rss_before = _rss_bytes()
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    result = proofs.verify()
    seconds = time.perf_counter() - started
    import services.privacy.audit.proofs as loaded

    out = {"ok": result.result.ok, "entries": result.entries, "message": result.result.message,
           "code": str(Path(loaded.__file__).parents[3])}
    if traced:
        out["heap_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
    else:
        out["seconds"] = round(seconds, 3)
        peak = _peak_rss_bytes()
        out["rss_growth_mb"] = round(max(peak - rss_before, 0) / 2**20, 1)
        out["rss_peak_mb"] = round(peak / 2**20, 1)
    db.close()
    return out


def _run(code_root: Path, db_path: Path, pem: str, traced: bool) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.audit_verify_memory", "--one", str(db_path),
                          "--public-key", pem, "--code-root", str(code_root), *(["--traced"] if traced else [])],
                         cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="log sizes (entries), comma-separated")
    parser.add_argument("--baseline", default="960ab3f", help="commit whose services/ is the 'before' code")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode and size (alternating)")
    parser.add_argument("--work", default=None, help="directory for the logs (default: a temporary one)")
    parser.add_argument("--no-traced", action="store_true", help="skip the tracemalloc runs (the slow part)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--public-key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        # The code under test first on the path (python -m puts the working directory,
        # this tree, ahead of PYTHONPATH); nothing of services/ is imported before this.
        assert not any(name == "services" or name.startswith("services.") for name in sys.modules)
        sys.path.insert(0, args.code_root)
        result = verify_once(args.one, args.public_key, args.traced)
        print(json.dumps(result))
        return result
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="audit-verify-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "baseline"
    if not (baseline / "services").is_dir():
        archive = subprocess.run(["git", "archive", args.baseline, "services"], cwd=ROOT, check=True,
                                 stdout=subprocess.PIPE).stdout
        baseline.mkdir(exist_ok=True)
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(baseline, filter="data")
    roots = {"after": ROOT, "before": baseline}
    report = {"baseline": args.baseline, "cpu": cpu_model(), "cores": os.cpu_count(),
              "load_at_start": [round(x, 2) for x in os.getloadavg()], "sizes": {}}
    for size in sizes:
        db_path = work / f"audit-{size}.db"
        pem_path = work / f"audit-{size}.pub"
        if not db_path.exists():
            log(f"{size}: appending the log")
            started = time.perf_counter()
            pem_path.write_text(build_log(db_path, size))
            log(f"  {time.perf_counter() - started:.0f} s, {db_path.stat().st_size / 2**20:.0f} MB")
        pem = pem_path.read_text()
        # Every run reads the database file itself: a write-ahead log left behind would be
        # read (and its index mapped) by the first runs only.
        import sqlite3

        with sqlite3.connect(db_path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.repeats):
            for mode in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[mode].append(_run(roots[mode], db_path, pem, traced=False))
                log(f"  {size} {mode}: {runs[mode][-1]}")
        traced = {} if args.no_traced else {mode: _run(roots[mode], db_path, pem, traced=True)
                                            for mode in ("before", "after")}
        log(f"  {size} traced: {traced}")
        block = {}
        for mode in ("before", "after"):
            assert all(run["ok"] and run["entries"] == size for run in runs[mode] + [traced.get(mode, runs[mode][0])])
            block[mode] = {"seconds_median": round(statistics.median(run["seconds"] for run in runs[mode]), 3),
                           "seconds": [run["seconds"] for run in runs[mode]],
                           "rss_growth_mb_median": statistics.median(run["rss_growth_mb"] for run in runs[mode]),
                           "rss_peak_mb_median": statistics.median(run["rss_peak_mb"] for run in runs[mode]),
                           "heap_peak_mb": traced[mode]["heap_peak_mb"] if traced else None}
        block["time_ratio_after_to_before"] = round(block["after"]["seconds_median"]
                                                    / block["before"]["seconds_median"], 3)
        block["same_answer"] = runs["before"][0]["message"] == runs["after"][0]["message"]
        report["sizes"][str(size)] = block
    report["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
