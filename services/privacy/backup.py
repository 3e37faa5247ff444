"""`hearth backup` and `hearth restore`: snapshots of every service's database
(services/common/backup.py) and a restore that keeps erased data erased.

Restoring a snapshot taken before a deletion would bring the deleted household back. So
``restore`` reads the deletion ledger from the current privacy database *before* it is
replaced (every deletion job and every shredded data key), restores the snapshot, and
then, in the restored privacy database:

* overwrites with tombstones every data key that was shredded in the ledger (the
  household's encrypted data is unreadable again before any service starts);
* re-queues every ledger job the snapshot does not know as completed, as a new job
  (request id ``restore:<old job id>``), so the deletion worker erases the household in
  every service again when the mesh starts (Erase is idempotent).

    hearth backup --out DIR [--keep N]            snapshot now (online), prune old ones
    hearth restore SNAPSHOT_DIR                   services stopped; then start them
Configuration comes from the usual HEARTH_STORAGE / HEARTH_DATA_DIR / HEARTH_POSTGRES_DSN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from services.common import backup as snapshots
from services.common import config
from services.common.storage.sql import Database, migrate, open_database
from services.privacy.deletion.domain import JobState, job_from_dict, new_job
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.keys.store import DataKeyStore
from services.privacy.migrations import MIGRATIONS

RESTORE_PRINCIPAL = "svc:privacy"


@dataclasses.dataclass
class Ledger:
    jobs: dict[str, dict]            # job_id -> job_to_dict JSON (every job not FAILED)
    shredded_accounts: set[str]


def read_ledger(db: Database) -> Ledger:
    with db.transaction() as tx:
        rows = tx.query("SELECT job_id, job_json, state FROM deletion_jobs")
        shredded = tx.query("SELECT DISTINCT account_id FROM data_keys WHERE destroyed_at IS NOT NULL")
    jobs = {r[0]: json.loads(r[1]) for r in rows if r[2] != JobState.FAILED.value}
    return Ledger(jobs, {r[0] for r in shredded})


def reapply_ledger(db: Database, ledger: Ledger, now: datetime | None = None) -> dict:
    """Make the restored privacy database honour every deletion of ``ledger``."""
    now = now or datetime.now(UTC)
    jobs = DeletionJobStore(db)
    keys = DataKeyStore(db)
    with db.transaction() as tx:
        known = {r[0]: r[1] for r in tx.query("SELECT job_id, state FROM deletion_jobs")}
    requeued = []
    shred = set(ledger.shredded_accounts)
    for job_id, data in sorted(ledger.jobs.items()):
        old = job_from_dict(data)
        if old.scope.kind.value == "household" and old.state is JobState.COMPLETED:
            shred.add(old.scope.account_id)
        if known.get(job_id) in (JobState.COMPLETED.value, JobState.PENDING.value, JobState.RUNNING.value):
            continue   # the snapshot already has it done, or its worker will finish it
        job = new_job(f"job-{uuid.uuid4().hex}", old.scope, RESTORE_PRINCIPAL, "service", now)
        jobs.create(job, f"restore:{job_id}", f"restore re-applies {job_id}", next_due=now)
        requeued.append({"job_id": job.job_id, "replaces": job_id, "scope": old.scope.kind.value})
    tombstoned = 0
    for account in sorted(shred):
        live = [r for r in keys.load(account) if r.destroyed_at is None]
        tombstoned += keys.overwrite([dataclasses.replace(r, wrapped=b"", destroyed_at=now) for r in live])
    return {"requeued_jobs": requeued, "keys_tombstoned": tombstoned, "shredded_accounts": len(shred)}


def _settings(args: argparse.Namespace):
    overrides = {"service_name": "privacy"}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return config.load(**overrides)


def _privacy_db(settings) -> Database:
    db = open_database(settings, "privacy")
    migrate(db, MIGRATIONS)
    return db


def run_backup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out = Path(args.out)
    if settings.storage == "postgres":
        snap = snapshots.backup_postgres(settings.postgres_dsn, out)
    else:
        snap = snapshots.backup_sqlite(Path(settings.data_dir), out)
    pruned = snapshots.prune(out, args.keep) if args.keep else []
    print(json.dumps({"snapshot": str(snap.path), "backend": snap.backend, "taken_at": snap.taken_at,
                      "services": sorted(snap.files), "pruned": [str(p) for p in pruned]}))
    return 0


def run_restore(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = _settings(args)
    snap = snapshots.Snapshot.load(Path(args.snapshot))
    if snap.backend != settings.storage:
        raise ValueError(f"snapshot is {snap.backend}, HEARTH_STORAGE is {settings.storage}")
    snap.verify()
    # The ledger of the database being replaced: read it before anything is overwritten.
    ledger = Ledger({}, set())
    current_exists = settings.storage == "postgres" or (Path(settings.data_dir) / "privacy.db").exists()
    if current_exists:
        db = _privacy_db(settings)
        try:
            ledger = read_ledger(db)
        finally:
            db.close()
    if snap.backend == "postgres":
        restored = snapshots.restore_postgres(snap, settings.postgres_dsn)
    else:
        restored = snapshots.restore_sqlite(snap, Path(settings.data_dir))
    db = _privacy_db(settings)
    try:
        report = reapply_ledger(db, ledger)
    finally:
        db.close()
    print(json.dumps({"restored": restored, "snapshot_taken_at": snap.taken_at,
                      "snapshot_age_s": round(time.time() - snap.taken_at, 3),
                      "ledger_jobs": len(ledger.jobs), **report,
                      "restore_s": round(time.monotonic() - started, 3)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    backup = subparsers.add_parser("backup", help="snapshot every service's database (online)")
    backup.add_argument("--out", required=True, help="directory that receives hearth-<timestamp>/")
    backup.add_argument("--keep", type=int, default=0, help="keep only the N newest snapshots (0: all)")
    backup.add_argument("--data-dir", help="SQLite data directory (default HEARTH_DATA_DIR)")
    backup.set_defaults(func=run_backup)
    restore = subparsers.add_parser("restore", help="restore a snapshot (services stopped), "
                                                    "re-applying every deletion since")
    restore.add_argument("snapshot", help="a hearth-<timestamp>/ directory written by `hearth backup`")
    restore.add_argument("--data-dir", help="SQLite data directory (default HEARTH_DATA_DIR)")
    restore.set_defaults(func=run_restore)
