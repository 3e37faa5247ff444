"""CPU of the model refresh each ingest batch schedules, in process, by how long the
household's history is (docs/benchmarks.md "The model refresh an ingest batch schedules").

    python -m bench.refresh_cpu [--days 100,400,1200] [--stream-days 30] [--batch 2]

A ``ClusteringApp`` (no background thread) on a store with a ``FieldCipher`` (a real key
ring) on SQLite in a temporary directory. Per history length: a household of three
persons (``bench.verify.household_events``: about two sessions a day) with ``--days`` of
viewing ingested and fitted, then its next ``--stream-days`` of viewing moved to end a
minute ago and streamed in time order, ``--batch`` events a batch, the refresh each batch
schedules run after it (``ModelKeeper.refresh``, as the service's refresh thread does;
sessions close by their device's next session). Prints one JSON object: per history
length, the closed sessions before and after, and the CPU ms per batch (process time) of
the ingest and of the refresh, the refresh also without the batches whose refresh
saved a new model version (folds: every ``MICRO_BATCH`` closed sessions, drift refits)
and per fold. Run it from another tree (``git archive REF | tar -x -C DIR``, with this
tree's generated ``hearth/``) for that commit's figures: it calls only what main has.

    python -m bench.refresh_cpu --fold [--days 100,400,1200] [--stream-days 60]
                                [--baseline REF] [--repeats 3] [--out FILE]

``--fold`` (session 24, docs/benchmarks.md "A fold's drift check"): the stream is
moved by whole weeks to start a day from now (the devices' watermarks close its
sessions, hours and weekdays are kept) and the keeper is asked to refresh only when a
fold is due
(``MICRO_BATCH`` sessions closed since the model's last update), so every refresh
timed is a fold; per history length the median CPU ms of a fold, of its drift check
(``ModelKeeper._check_drift``, timed around the call) and the first fold's (the one
after the history's fit, which builds the drift detector) separately.
``--baseline REF`` runs each measurement in a child process from this tree and from
commit REF's (``bench.assign_cpu.extract``, this file copied in so both sides measure
the same way), alternating, ``--repeats`` times each; prints medians per side and the
ratio candidate / baseline.

    python -m bench.refresh_cpu --build [--days 100,400,1200] [--build-repeats 5]
                                [--baseline REF] [--repeats 3] [--out FILE]

``--build`` (session 25, docs/benchmarks.md "The drift detector's build after a
refit"): per history length the household's history is ingested and fitted as above,
then the drift detector of the fitted model's reference (every closed session: a full
fit's reference) is built ``--build-repeats`` times (``build_detector(X, seed)``, what
the first fold after every full refit runs): the median CPU ms of the build and of its
window MMD's part alone (``_WindowMMD``), the build's peak memory (tracemalloc, numpy's
allocations included; a separate build, tracing slows it) and the median CPU ms of
reading and opening every closed session (``ModelKeeper.snapshot``, what every fold
pays).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bench.ingest_cpu import _fetcher
from bench.verify import household_events
from services.clustering.app import ClusteringApp
from services.clustering.household import MICRO_BATCH
from services.clustering.modeling import ModelKeeper
from services.clustering.domain.events import ViewingEvent
from services.clustering import store as store_module
from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek

ACCOUNT = "acct-refresh"


def _event(d: dict) -> ViewingEvent:
    return ViewingEvent(event_id=d["event_id"], account_id=d["account_id"], device_id=d["device_id"],
                        device_type=d["device_type"], ts=datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp(),
                        kind=d["kind"], title_id=d["title_id"], series_id=d["series_id"], genres=tuple(d["genres"]),
                        duration_s=d["duration_s"], maturity=d["maturity"])


class _StreamClock:
    """The clustering store's clock (``services.clustering.store.time``) set to the
    stream's time while installed."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)

    def __enter__(self) -> "_StreamClock":
        store_module.time = self
        return self

    def __exit__(self, *exc) -> None:
        store_module.time = time


class _DriftClock:
    """CPU seconds spent in ``ModelKeeper._check_drift`` (the wrapper is installed for
    the measurement and removed after)."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._orig = ModelKeeper._check_drift

    def __enter__(self) -> "_DriftClock":
        orig, clock = self._orig, self

        def timed(keeper, *args, **kwargs):
            c0 = time.process_time()
            try:
                return orig(keeper, *args, **kwargs)
            finally:
                clock.spent += time.process_time() - c0
        ModelKeeper._check_drift = timed
        return self

    def __exit__(self, *exc) -> None:
        ModelKeeper._check_drift = self._orig


def _household(days: int, stream_days: int, db: Path) -> tuple[ClusteringStore, ClusteringApp, list, float]:
    """A store on SQLite (``db``) with a ``FieldCipher``, its app (no background thread), the
    household's events (``days + stream_days`` of viewing) in time order and the time that
    cuts the history from the stream."""
    store = ClusteringStore(SqliteDatabase(db), cipher=FieldCipher(_fetcher(KeyRing([generate_kek("k1")], "k1"))))
    store.migrate()
    app = ClusteringApp(store, background=False)
    events = sorted((_event(d) for d in household_events(ACCOUNT, random.Random(days), days + stream_days,
                                                          n_persons=3)), key=lambda e: (e.ts, e.event_id))
    return store, app, events, events[-1].ts - stream_days * 86400.0


def measure(days: int, stream_days: int, batch: int, root: Path, fold_only: bool = False) -> dict:
    store, app, events, cut = _household(days, stream_days, root / f"refresh-{days}.db")
    history = [e for e in events if e.ts <= cut]
    # the last stream_days, moved to end a minute ago: live, so sessions close by their
    # device's next session (its watermark), as a client's stream closes them
    shift = time.time() - 60.0 - events[-1].ts
    clock = None
    if fold_only:
        # Not moved, and the store's clock is the stream's (the newest event ingested):
        # the stream is live, as a client's: a session closes one gap after its end
        # and no later batch extends it. (Moved to end a minute ago as above, the
        # stream's past is closed by the real clock at once, its sessions then extended
        # by the next batches, and its hours and weekdays move by a fraction of a day,
        # which is a change of habits to the drift detector: nearly every fold of it
        # refits.)
        shift = 0.0
        clock = _StreamClock(cut)
    stream = [replace(e, ts=e.ts + shift) for e in events if e.ts > cut]
    with clock or contextlib.nullcontext():
        for i in range(0, len(history), 1000):
            store.ingest(history[i:i + 1000])
        version, _ = app.keeper.refresh(ACCOUNT)
        closed_before = store.closed_session_count(ACCOUNT)
    if clock is not None:
        clock.__enter__()
    try:
        return _stream(app, store, stream, batch, version, closed_before, fold_only, clock)
    finally:
        if clock is not None:
            clock.__exit__()


def measure_build(days: int, stream_days: int, root: Path, repeats: int) -> dict:
    """The drift detector's build on the household's closed sessions after its history's
    fit (``--build``)."""
    import tracemalloc

    from services.clustering.domain.drift import DEFAULT_THRESHOLDS, _WindowMMD, build_detector

    store, app, events, cut = _household(days, stream_days, root / f"build-{days}.db")
    history = [e for e in events if e.ts <= cut]
    with _StreamClock(cut):
        for i in range(0, len(history), 1000):
            store.ingest(history[i:i + 1000])
        app.keeper.refresh(ACCOUNT)
        snapshot_ms: list[float] = []
        for _ in range(repeats):
            c0 = time.process_time()
            snap = app.keeper.snapshot(ACCOUNT)
            snapshot_ms.append(1e3 * (time.process_time() - c0))
    X = snap.X
    build_ms: list[float] = []
    mmd_ms: list[float] = []
    for _ in range(repeats):
        c0 = time.process_time()
        build_detector(X, seed=app.keeper.seed)
        c1 = time.process_time()
        _WindowMMD(X, DEFAULT_THRESHOLDS.window)
        build_ms.append(1e3 * (c1 - c0))
        mmd_ms.append(1e3 * (time.process_time() - c1))
    tracemalloc.start()
    build_detector(X, seed=app.keeper.seed)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    app.close()
    store.db.close()
    return {"closed_sessions": int(X.shape[0]), "folds": 0, "repeats": repeats,
            "build_ms_median": round(statistics.median(build_ms), 1),
            "build_mmd_ms_median": round(statistics.median(mmd_ms), 1),
            "build_peak_mb": round(peak / 1e6, 1),
            "snapshot_ms_median": round(statistics.median(snapshot_ms), 1),
            "build_ms": [round(v, 1) for v in build_ms]}


def _stream(app: ClusteringApp, store: ClusteringStore, stream: list[ViewingEvent], batch: int, version: int,
            closed_before: int, fold_only: bool, clock: _StreamClock | None) -> dict:
    ingest = refresh = fold = 0.0
    batches = folds = 0
    fold_ms: list[float] = []
    drift_ms: list[float] = []
    with _DriftClock() as drift:
        for i in range(0, len(stream), batch):
            if clock is not None:
                clock.now = stream[i:i + batch][-1].ts + 1.0
            c0 = time.process_time()
            app.ingest(stream[i:i + batch])
            c1 = time.process_time()
            if fold_only:
                _, envelope = app.keeper.load(ACCOUNT)
                if store.closed_session_count(ACCOUNT) - envelope.included < MICRO_BATCH:
                    continue
                c1 = time.process_time()   # what the due check cost is not the fold's
            drift_before = drift.spent
            new_version, _ = app.keeper.refresh(ACCOUNT)
            c2 = time.process_time()
            batches += 1
            ingest += c1 - c0
            refresh += c2 - c1
            if new_version != version:
                folds += 1
                fold += c2 - c1
                fold_ms.append(1e3 * (c2 - c1))
                drift_ms.append(1e3 * (drift.spent - drift_before))
            version = new_version
    closed_after = store.closed_session_count(ACCOUNT)
    app.close()
    store.db.close()
    out = {"closed_sessions": closed_before, "closed_after": closed_after, "batches": batches,
           "ingest_ms_per_batch": round(1e3 * ingest / batches, 3),
           "refresh_ms_per_batch": round(1e3 * refresh / batches, 3),
           "refresh_ms_per_batch_without_folds": round(1e3 * (refresh - fold) / max(1, batches - folds), 3),
           "folds": folds, "ms_per_fold": round(1e3 * fold / folds, 1) if folds else None}
    if fold_only:
        # the first fold after the history's fit builds the drift detector; the others
        # are the steady state of a household between refits
        out.update({"first_fold_ms": round(fold_ms[0], 1) if fold_ms else None,
                    "first_fold_drift_ms": round(drift_ms[0], 1) if drift_ms else None,
                    "fold_ms_median": round(statistics.median(fold_ms[1:]), 1) if len(fold_ms) > 1 else None,
                    "fold_drift_ms_median": round(statistics.median(drift_ms[1:]), 1) if len(drift_ms) > 1 else None,
                    "fold_ms": [round(v, 1) for v in fold_ms], "fold_drift_ms": [round(v, 1) for v in drift_ms]})
    return out


def _child(tree: Path, days: str, args: argparse.Namespace) -> dict:
    """One measurement of every history length in a child process run from ``tree``."""
    cmd = [sys.executable, "-m", "bench.refresh_cpu", "--days", days, "--stream-days", str(args.stream_days),
           "--batch", str(args.batch)] + (["--fold"] if args.fold else []) \
        + (["--build", "--build-repeats", str(args.build_repeats)] if args.build else [])
    done = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    """This tree against commit ``args.baseline``'s, alternating child runs."""
    from bench.assign_cpu import ROOT, extract

    keys = ("fold_ms_median", "fold_drift_ms_median", "first_fold_ms", "first_fold_drift_ms",
            "ms_per_fold", "refresh_ms_per_batch", "refresh_ms_per_batch_without_folds",
            "build_ms_median", "build_mmd_ms_median", "build_peak_mb", "snapshot_ms_median")
    with tempfile.TemporaryDirectory() as work:
        base_tree = extract(args.baseline, Path(work) / "baseline")
        shutil.copy(Path(__file__), base_tree / "bench" / "refresh_cpu.py")
        runs: dict[str, list[dict]] = {"baseline": [], "candidate": []}
        for r in range(args.repeats):
            order = [("baseline", base_tree), ("candidate", ROOT)]
            for side, tree in order if r % 2 == 0 else order[::-1]:
                runs[side].append(_child(tree, args.days, args))
                print(f"# {side} run {r + 1}: {json.dumps(runs[side][-1])}", file=sys.stderr)
    out: dict = {"baseline_ref": args.baseline, "repeats": args.repeats, "fold": args.fold, "build": args.build,
                 "stream_days": args.stream_days, "batch": args.batch}
    for d in args.days.split(","):
        name = f"days_{d}"
        row: dict = {"closed_sessions": runs["candidate"][0][name]["closed_sessions"],
                     "folds": runs["candidate"][0][name]["folds"]}
        for side in ("baseline", "candidate"):
            vals = {k: [run[name][k] for run in runs[side] if run[name].get(k) is not None] for k in keys}
            row[side] = {k: round(statistics.median(v), 2) for k, v in vals.items() if v}
        row["ratio"] = {k: round(row["candidate"][k] / row["baseline"][k], 3) for k in keys
                        if row["baseline"].get(k) and k in row["candidate"]}
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", default="100,400,1200", help="history lengths in days, comma-separated")
    p.add_argument("--stream-days", type=int, default=30, help="the last days of viewing, streamed")
    p.add_argument("--batch", type=int, default=2, help="events a batch")
    p.add_argument("--fold", action="store_true", help="refresh only when a fold is due: every refresh timed folds")
    p.add_argument("--build", action="store_true",
                   help="time the drift detector's build on the fitted history (the first fold after a refit)")
    p.add_argument("--build-repeats", type=int, default=5, help="with --build: builds timed per history length")
    p.add_argument("--baseline", default="", help="git commit measured beside this tree (child processes)")
    p.add_argument("--repeats", type=int, default=3, help="with --baseline: runs of each side, alternating")
    p.add_argument("--out", default="", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.baseline:
        out = compare(args)
    else:
        with tempfile.TemporaryDirectory() as root:
            if args.build:
                out = {f"days_{d}": measure_build(int(d), args.stream_days, Path(root), args.build_repeats)
                       for d in args.days.split(",")}
            else:
                out = {f"days_{d}": measure(int(d), args.stream_days, args.batch, Path(root), args.fold)
                       for d in args.days.split(",")}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
