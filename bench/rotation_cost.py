"""What a batch data key rotation costs on PostgreSQL: ``python -m bench.rotation_cost``.

A rotation's Rekey purges the old ciphertexts physically (docs/privacy.md §10, §11): on
PostgreSQL ``VACUUM (FULL, ANALYZE)`` of the store's personal tables — every household's
rows, not the rotated one's. Until session 28 a batch job (``POST
/v1/keys/rotate-households``) purged per household; since, it re-encrypts every household
of a pass with the purge deferred and purges each store once (keys/rotation.py
``purge_deferred``). This runs both, alternated in the same run, over the real stores:

* clustering's and attribution's stores (``ClusteringStore``, ``AttributionStore``, their
  migrations) and privacy's key store, each on its own schema of one PostgreSQL with
  production defaults (fsync on, full-page writes) plus ``wal_recycle = off`` (so purges
  complete; ``--wal-recycle on``: PostgreSQL's default, every purge incomplete);
* a background of ``--background`` households (20 events, 4 sessions each, encrypted
  columns at their stored length: bench.pg_purge's fill) that no rotation touches but
  every purge rewrites, and ``--households`` real households (events ingested and sealed
  through the store, a model, 2 touchpoints) that each repetition rotates;
* per repetition, one batch job over those households (``BatchRotations``, settle 0):
  ``before`` — each household re-encrypted and purged on its own (the session 27 order:
  ``reencrypt`` and ``purge_deferred`` turned off, so ``finish`` Rekeys with the purge) —
  and ``after`` (this code), alternated.

``--privacy-purge`` compares instead privacy's own purge of its key tables (``data_keys``,
``digest_keys``: ``VACUUM FULL``, a WAL switch and a ``CHECKPOINT`` on PostgreSQL) at the
retirement of each household (``before``: as until session 29) against once per batch pass
(``after``: ``BatchRotations._purge_key_tables``), the stores' purges deferred in both;
``--key-background N`` households hold keys in privacy only (their rows are what
privacy's purge rewrites). Each row also counts privacy's purges and the seconds they took.

``--job-record N`` measures instead what storing one household's outcome costs in a job of
N households (privacy's SQLite, its migrations): ``before`` the whole job rewritten per step
(``DeletionJobStore`` with the whole-job codec, as until session 28), ``after`` the job's
header and that household's row (``RotationJobStore``), ``--steps`` steps each, alternated.

``--sqlite-rekey N`` measures instead a household of N events re-encrypted on SQLite
(clustering's store, ``ClusteringStore.rekey``) while another household's one-event ingests
run beside it (one every 0.1 s after the previous answered): ``before`` the household in one transaction (pages of 10^9
rows: as until session 28), ``after`` pages of ``rekey_pages.PAGE_ROWS`` (500), each its
own transaction with a pause between; alternated, the rekey's time (its re-encryption,
the purge deferred and run after) and the ingests' latency meanwhile.

Progress to stderr; the last stdout line is one JSON object (medians of ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--background", type=int, default=5000, help="households only the purges rewrite")
    parser.add_argument("--households", type=int, default=8, help="households each batch rotates")
    parser.add_argument("--events", type=int, default=20, help="events per rotated household")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--wal-recycle", choices=("on", "off"), default="off")
    parser.add_argument("--job-record", type=int, default=0, help="households of a job: measure its record")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sqlite-rekey", type=int, default=0, help="events of a household: its rekey on SQLite")
    parser.add_argument("--privacy-purge", action="store_true",
                        help="compare privacy's key-table purge per household (before) and per batch pass (after)")
    parser.add_argument("--key-background", type=int, default=0, help="households with keys in privacy only")
    args = parser.parse_args()
    if args.job_record:
        job_record(args.job_record, args.steps, args.reps)
        return
    if args.sqlite_rekey:
        sqlite_rekey(args.sqlite_rekey, args.reps)
        return

    import psycopg

    from bench.pg_purge import fill
    from services.attribution.domain.records import Touchpoint
    from services.attribution.store import AttributionStore
    from services.clustering.domain.events import ViewingEvent
    from services.clustering.store import ClusteringStore
    from services.common.field_crypto import FieldCipher
    from services.common.identity import Principal, Role
    from services.common.storage.cache import MemoryCache
    from services.common.storage.sql import PostgresDatabase, migrate
    from services.privacy.keys.app import KeyService
    from services.privacy.keys.batch import BatchRotations, rotation_job_store
    from services.privacy.keys.domain import generate_kek
    from services.privacy.keys.rotation import DataKeyRotation, Rekeyed
    from services.privacy.keys.store import DataKeyStore
    from services.privacy.migrations import MIGRATIONS
    from services.testing.servers import PostgresServer

    class PerHouseholdPurge(DataKeyRotation):
        """The session 27 batch: no deferred pass, so ``finish`` Rekeys each household
        with its own purge."""

        def reencrypt(self, account_id: str, target: int) -> None:
            return None

        def purge_deferred(self, households) -> None:
            return None

    class PerHouseholdKeyPurge(DataKeyRotation):
        """Privacy's key tables purged at each household's retirement (until session 29)."""

        def finish(self, account_id, target, resumed, created_at, purge_keys: bool = True):
            return super().finish(account_id, target, resumed, created_at, purge_keys=True)

    officer = Principal("bench-officer", Role.PRIVACY_OFFICER)
    kek = generate_kek("k1")
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-rotation-") as tmp:
        Path(tmp).chmod(0o755)
        pg = PostgresServer(Path(tmp) / "pg").init().start()
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET wal_recycle = {args.wal_recycle}")
                conn.execute("SELECT pg_reload_conf()")
            dbs = {n: PostgresDatabase(pg.dsn, f"bench_{n}", max_size=4)
                   for n in ("privacy", "clustering", "attribution")}
            migrate(dbs["privacy"], MIGRATIONS)
            keys = KeyService(DataKeyStore(dbs["privacy"]), [kek], "k1")

            def cipher() -> FieldCipher:
                def digest_key(account: str) -> bytes:
                    keys.data_key(account)
                    return keys.digest_key(account)
                return FieldCipher(lambda account, version: keys.data_key(account, version),
                                   fetch_digest_key=digest_key)

            clustering = ClusteringStore(dbs["clustering"], MemoryCache("clustering"), gap_s=1800,
                                         lateness_tolerance_s=6 * 3600, cipher=cipher())
            attribution = AttributionStore(dbs["attribution"], cipher=cipher())
            clustering.migrate()
            attribution.migrate()
            started = time.perf_counter()
            fill(dbs["clustering"], args.background)
            accounts = [f"rot-{i:04d}" for i in range(args.households)]
            t0 = time.time() - 5 * 86400
            for account in accounts:
                clustering.ingest([ViewingEvent(
                    event_id=f"{account}-e{i}", account_id=account, device_id="tv" if i % 2 else "tablet",
                    device_type="tv", ts=t0 + i * 4000, kind="play_start", title_id=f"title-{i}",
                    series_id=f"series-{i}", genres=("drama",), duration_s=600.0, country="FR",
                    profile_hint=f"hint-{i}") for i in range(args.events)])
                clustering.save_model(account, 0, "gmm", b"PK-model-" + account.encode() * 64)
                attribution.record_touchpoints([Touchpoint(f"{account}-t{i}", account, "tv", t0 + i, "email",
                                                           f"campaign-{i}") for i in range(2)])
            with dbs["clustering"].transaction() as tx:
                size_mb = sum(tx.query("SELECT pg_total_relation_size(?::regclass)", (f'"bench_clustering"."{t}"',))[0][0]
                              for t in ("events", "sessions", "household_models")) / 1e6
            for first in range(0, args.key_background, 1000):
                keys.data_keys([f"keybg-{i:06d}" for i in range(first, min(args.key_background, first + 1000))])
            log(f"filled {args.background} background + {args.households} rotated households, "
                f"clustering tables {size_mb:.0f} MB, in {time.perf_counter() - started:.0f} s")

            purges: list[str] = []
            for service, store in (("clustering", clustering), ("attribution", attribution)):
                real = store.db.purge_erased

                def counted(tables=(), _real=real, _service=service):
                    out = _real(tables)
                    if "VACUUM" in out["action"]:
                        purges.append(_service)
                    return out
                store.db.purge_erased = counted
            privacy_purges: list[float] = []
            real_privacy_purge = dbs["privacy"].purge_erased

            def timed_privacy_purge(tables=()):
                started = time.perf_counter()
                out = real_privacy_purge(tables)
                if "VACUUM" in out["action"]:
                    privacy_purges.append(time.perf_counter() - started)
                return out
            dbs["privacy"].purge_erased = timed_privacy_purge

            def rekey(service: str, account: str, version: int, defer_purge: bool = False) -> Rekeyed:
                store = clustering if service == "clustering" else attribution
                return Rekeyed(*store.rekey(account, version, *([True] if defer_purge else [])))

            for rep in range(args.reps):
                for mode in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                    with dbs["privacy"].transaction() as tx:   # every rotated household due again
                        tx.executemany("UPDATE data_keys SET created_at = '2001-01-01T00:00:00+00:00' "
                                       "WHERE account_id = ?", [(a,) for a in accounts])
                    service = KeyService(keys.store, [kek], "k1")
                    if args.privacy_purge:
                        kind = PerHouseholdKeyPurge if mode == "before" else DataKeyRotation
                    else:
                        kind = PerHouseholdPurge if mode == "before" else DataKeyRotation
                    rotation = kind(service, rekey, ("clustering", "attribution"), settle_s=0.0,
                                    sleep=lambda _s: None)
                    batches = BatchRotations(rotation_job_store(dbs["privacy"]), rotation)
                    job_id = batches.request(3650, args.households, principal=officer).job.job_id
                    purges.clear()
                    privacy_purges.clear()
                    started = time.perf_counter()
                    batches.run_due()
                    elapsed = time.perf_counter() - started
                    job = batches.get(job_id).job
                    counts = job.counts()
                    incomplete = sum(bool(h.incomplete_purges) for h in job.households.values())
                    row = {"mode": mode, "rep": rep, "s": round(elapsed, 2), "completed": counts["completed"],
                           "vacuum_full_purges": {s: purges.count(s) for s in ("clustering", "attribution")},
                           "households_with_incomplete_purges": incomplete,
                           "privacy_purges": len(privacy_purges), "privacy_purge_s": round(sum(privacy_purges), 2),
                           "load1": round(os.getloadavg()[0], 1)}
                    log(f"rotation_cost {row}")
                    results[mode].append(row)
                    rotation.close()
                    batches.close()
            for db in dbs.values():
                db.close()
        finally:
            pg.stop()
    med = {m: statistics.median(r["s"] for r in rows) for m, rows in results.items()}
    print(json.dumps({
        "bench": "rotation_cost", "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"), "cpu": cpu_model(),
        "background_households": args.background, "households": args.households, "events": args.events,
        "clustering_tables_mb": round(size_mb, 1), "wal_recycle": args.wal_recycle, "reps": args.reps,
        "compared": "privacy_key_purge" if args.privacy_purge else "store_purges", "key_background": args.key_background,
        "before_s_median": round(med["before"], 2), "after_s_median": round(med["after"], 2),
        "ratio_before_over_after": round(med["before"] / med["after"], 2) if med["after"] else None,
        "runs": results["before"] + results["after"]}))


def job_record(households: int, steps: int, reps: int) -> None:
    from dataclasses import replace

    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.deletion.store import DeletionJobStore
    from services.privacy.keys.batch import (
        TABLE, BatchScope, HouseholdRotation, Outcome, RotationBatch, batch_from_dict, batch_to_dict,
        rotation_job_store)
    from services.privacy.migrations import MIGRATIONS

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-jobrecord-") as tmp:
        db = SqliteDatabase(Path(tmp) / "privacy.db")
        migrate(db, MIGRATIONS)
        stores = {"before": DeletionJobStore(db, TABLE, (batch_to_dict, batch_from_dict)),
                  "after": rotation_job_store(db)}
        accounts = [f"acc-{i:05d}" for i in range(households)]
        done = HouseholdRotation(Outcome.COMPLETED, 3, 1.7e9, False, 0, None, "", {"clustering": 120,
                                 "attribution": 4, "feedback": 0}, (2,), ())
        for rep in range(reps):
            for mode in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                store = stores[mode]
                job = RotationBatch(f"rot-{mode}-{rep}", BatchScope(365.0, households), "officer", "privacy_officer",
                                    1.7e9, {a: HouseholdRotation(Outcome.BEGUN, 3, 1.7e9) for a in accounts})
                stored = store.create(job, f"req-{mode}-{rep}", "data key rotation", None)
                times = []
                for account in accounts[:steps]:
                    job = replace(job, households={**job.households, account: done})
                    started = time.perf_counter()
                    stored = store.save(stored, job, None)
                    times.append((time.perf_counter() - started) * 1e3)
                with db.transaction() as tx:
                    size = len(tx.query(f"SELECT job_json FROM {TABLE} WHERE job_id = ?", (job.job_id,))[0][0])
                row = {"mode": mode, "rep": rep, "save_ms_median": round(statistics.median(times), 2),
                       "job_json_bytes": size, "load1": round(os.getloadavg()[0], 1)}
                log(f"job_record {row}")
                runs[mode].append(row)
        db.close()
    med = {m: statistics.median(r["save_ms_median"] for r in rows) for m, rows in runs.items()}
    print(json.dumps({"bench": "rotation_cost.job_record", "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
                      "cpu": cpu_model(), "households": households, "steps": steps, "reps": reps,
                      "before_save_ms_median": round(med["before"], 2), "after_save_ms_median": round(med["after"], 2),
                      "ratio_before_over_after": round(med["before"] / med["after"], 1),
                      "runs": runs["before"] + runs["after"]}))


def sqlite_rekey(events: int, reps: int) -> None:
    import threading

    from services.clustering.domain.events import ViewingEvent
    from services.clustering.store import ClusteringStore
    from services.common import rekey_pages
    from services.common.field_crypto import FieldCipher
    from services.common.storage.cache import MemoryCache
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.keys.app import KeyService
    from services.privacy.keys.domain import generate_kek
    from services.privacy.keys.store import DataKeyStore
    from services.privacy.migrations import MIGRATIONS

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    paged = rekey_pages.PAGE_ROWS
    with tempfile.TemporaryDirectory(prefix="hearth-bench-sqlite-rekey-") as tmp:
        privacy = SqliteDatabase(Path(tmp) / "privacy.db")
        migrate(privacy, MIGRATIONS)
        keys = KeyService(DataKeyStore(privacy), [generate_kek("k1")], "k1")

        def digest_key(account: str) -> bytes:
            keys.data_key(account)
            return keys.digest_key(account)
        store = ClusteringStore(SqliteDatabase(Path(tmp) / "clustering.db"), MemoryCache("clustering"), gap_s=1800,
                                lateness_tolerance_s=6 * 3600,
                                cipher=FieldCipher(lambda a, v: keys.data_key(a, v), fetch_digest_key=digest_key))
        store.migrate()
        t0 = time.time() - 20 * 86400
        started = time.perf_counter()
        for chunk in range(0, events, 1000):
            store.ingest([ViewingEvent(
                event_id=f"big-e{i}", account_id="big", device_id=f"dev-{i % 4}", device_type="tv",
                ts=t0 + i * 60, kind="play_start", title_id=f"title-{i}", series_id=f"series-{i % 50}",
                genres=("drama",), duration_s=600.0, country="FR", profile_hint=f"hint-{i % 3}")
                for i in range(chunk, min(events, chunk + 1000))])
        log(f"filled a household of {events} events in {time.perf_counter() - started:.0f} s")
        keys.data_key("other")
        counter = iter(range(10**9))
        for rep in range(reps):
            for mode in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                target, _, _ = keys.begin_rotation("big")
                rekey_pages.PAGE_ROWS = 10**9 if mode == "before" else paged
                latencies: list[float] = []
                done = threading.Event()

                def writer() -> None:
                    while not done.is_set():
                        n = next(counter)
                        began = time.perf_counter()
                        store.ingest([ViewingEvent(
                            event_id=f"other-e{n}", account_id="other", device_id="tv", device_type="tv",
                            ts=time.time() - 3600 + n * 0.001, kind="play_start", title_id="t", series_id=None,
                            genres=("drama",), duration_s=60.0, country="FR", profile_hint=None)])
                        latencies.append(time.perf_counter() - began)
                        done.wait(0.1)   # ~10 small writes a second, as a household's devices send them
                thread = threading.Thread(target=writer)
                thread.start()
                time.sleep(0.5)
                began = time.perf_counter()
                # The re-encryption alone (its purge deferred): the part that holds the write
                # lock; the purge (a WAL checkpoint) runs after the writer stopped, untimed.
                changed, _ = store.rekey("big", target, True)
                rekey_s = time.perf_counter() - began
                done.set()
                thread.join()
                store.rekey("big", target)
                keys.finish_rotation("big", target)
                row = {"mode": mode, "rep": rep, "rekey_s": round(rekey_s, 2), "reencrypted": changed,
                       "ingests": len(latencies), "ingest_ms_median": round(statistics.median(latencies) * 1e3, 1),
                       "ingest_ms_max": round(max(latencies) * 1e3, 1), "load1": round(os.getloadavg()[0], 1)}
                log(f"sqlite_rekey {row}")
                runs[mode].append(row)
    med = {m: {k: statistics.median(r[k] for r in rows) for k in ("rekey_s", "ingest_ms_max", "ingest_ms_median")}
           for m, rows in runs.items()}
    print(json.dumps({"bench": "rotation_cost.sqlite_rekey", "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
                      "cpu": cpu_model(), "events": events, "page_rows": paged, "pause_s": rekey_pages.PAUSE_S,
                      "reps": reps, "medians": med, "runs": runs["before"] + runs["after"]}))


if __name__ == "__main__":
    main()
