"""What the forwarder's age check costs: ``python -m bench.forward_expiry``.

Clustering's prediction forwarder drops the predictions about sessions older than the
retention window before it sends a batch (``PredictionLog._expired``, fence32's 4c2b8d3:
``hearth_predictions_expired_total``); it runs while the retention purge is on. This times
one forward (``PredictionLog.forward_once``: the claim, the body decoded, the check, the
send — an in-process stand-in that keeps the request — and the delete) of an outbox holding
one chunk of ``--predictions`` (default 1,000: the forward batch and the largest chunk),
in three modes, alternating their order each round, each from a fresh outbox:

* ``off``: retention off (``retention_s`` None: no check);
* ``on``: retention on, no prediction expired (the usual case: the check runs, drops nothing);
* ``on_expired``: retention on, ``--expired-share`` of the predictions about sessions
  older than the window (dropped, the request rebuilt without them).

And ``_expired`` alone on the same 1,000-prediction request (median of ``--calls``).
What was sent is compared: ``off`` and ``on`` send the same bytes; ``on_expired`` sends
exactly the others. SQLite by default (the forwarder's read, send, delete), ``--backend
postgres`` on a throwaway server (one transaction over the send).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.forward_expiry --rounds 7 --out /tmp/forward-expiry.json

JSON (printed last, and written to ``--out``): per mode each round's forward wall and CPU
seconds and their medians, the on/off ratios of the medians, the check alone (ms), its
share of a forward's CPU, what was sent, the load average, the UTC start and end."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import emit, run_window

DAY = 86400.0
RETENTION_S = 30 * DAY
MODES = ("off", "on", "on_expired")


def _records(n: int, now: float, expired_share: float) -> list:
    from services.common.predictions import PredictionRecord

    old = int(n * expired_share)
    out = []
    for i in range(n):
        start = now - (RETENTION_S + 2 * DAY if i < old else (i % 1000) * 60 + 3600)
        out.append(PredictionRecord(f"pr-{i:08d}", f"hh-{i % 500}", f"se-{i}", "p1", {"p1": 0.7, "p2": 0.3},
                                    "gmm", 3, now, False, 2, "tv", start, start + 1800, 40, ""))
    return out


def one_forward(db_of, mode: str, n: int, expired_share: float, rnd: int, now: float) -> dict:
    """A fresh outbox of one chunk of ``n`` predictions, then one timed forward."""
    from services.clustering.prediction_log import PredictionLog

    sent: list = []
    db = db_of(f"{mode}_{rnd}")
    log = PredictionLog(db, sent.append, forward_interval_s=3600.0, batch=n,
                        retention_s=None if mode == "off" else RETENTION_S)
    try:
        log.record(_records(n, now, expired_share if mode == "on_expired" else 0.0))
        t0, c0 = time.perf_counter(), time.thread_time()
        delivered = log.forward_once()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        # the check alone on what was queued (the same request the forward decoded)
        from hearth.feedback.v1 import feedback_pb2 as fpb
        from services.clustering.prediction_log import to_request
        request = to_request(_records(n, now, expired_share if mode == "on_expired" else 0.0))
        checker = PredictionLog(db, None, batch=n, retention_s=RETENTION_S)
        checker.close()
        assert isinstance(request, fpb.RecordPredictionRequest)
        return {"wall_s": wall, "cpu_s": cpu, "delivered": delivered, "request": request, "checker": checker,
                "sent": sent[0].SerializeToString() if sent else b""}
    finally:
        log._stop.set()
        log._committer.close()
        db.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictions", type=int, default=1000)
    p.add_argument("--expired-share", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=50, help="calls of the check alone, per round")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]

    from services.clustering.store import ClusteringStore
    from services.common.storage.sql import PostgresDatabase, SqliteDatabase

    pg = None
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    check_ms: dict[str, list[float]] = {m: [] for m in MODES[1:]}
    sent: dict[str, set[bytes]] = {m: set() for m in MODES}
    with tempfile.TemporaryDirectory(prefix="hearth-forward-expiry-") as tmp:
        try:
            if args.backend == "postgres":
                from services.testing.servers import PostgresServer
                pg = PostgresServer(durable=False).init().start()

            def db_of(name: str):
                db = PostgresDatabase(pg.dsn, f"f_{name}", max_size=2) if pg is not None \
                    else SqliteDatabase(Path(tmp) / f"{name}.db")
                ClusteringStore(db).migrate()
                return db

            now = time.time()   # every round's predictions alike: what is sent compares
            for rnd in range(args.rounds):
                order = MODES if rnd % 2 == 0 else MODES[::-1]
                for mode in order:
                    r = one_forward(db_of, mode, args.predictions, args.expired_share, rnd, now)
                    runs[mode].append({"wall_s": round(r["wall_s"], 5), "cpu_s": round(r["cpu_s"], 5),
                                       "delivered": r["delivered"]})
                    sent[mode].add(r["sent"])
                    if mode != "off":
                        times = []
                        for _ in range(args.calls):
                            t0 = time.thread_time()
                            r["checker"]._expired(r["request"])
                            times.append(time.thread_time() - t0)
                        check_ms[mode].append(round(1000 * statistics.median(times), 4))
        finally:
            if pg is not None:
                pg.remove()
    result: dict = {"backend": args.backend, "predictions": args.predictions, "expired_share": args.expired_share,
                    "rounds": args.rounds, "modes": {}}
    for mode in MODES:
        rs = runs[mode]
        result["modes"][mode] = {"runs": rs, "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                                 "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
                                 "delivered": sorted({r["delivered"] for r in rs})}
        if mode in check_ms:
            result["modes"][mode]["check_ms"] = check_ms[mode]
            result["modes"][mode]["median_check_ms"] = statistics.median(check_ms[mode])
            result["modes"][mode]["check_share_of_forward_cpu"] = round(
                result["modes"][mode]["median_check_ms"] / 1000 / result["modes"][mode]["median_cpu_s"], 4)
    off = result["modes"]["off"]
    result["over_off"] = {mode: {k: round(result["modes"][mode][f"median_{k}"] / off[f"median_{k}"], 3)
                                 for k in ("wall_s", "cpu_s")} for mode in MODES[1:]}
    # No answer changed: with nothing expired the same bytes are sent, each round the same.
    result["same_sent_off_and_on"] = len(sent["off"] | sent["on"]) == 1
    result["expired_dropped"] = result["modes"]["on_expired"]["delivered"] == [
        args.predictions - int(args.predictions * args.expired_share)]
    result.update(run_window(started, load0))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
