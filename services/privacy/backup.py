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

The ledger normally comes from the privacy database being replaced. When that database
itself is lost, the off-site copy written by ``hearth ledger export`` (the chart runs it
every few minutes next to the snapshots) takes its place: ``restore --ledger FILE``
merges it in, and a restore without any ledger is refused unless explicitly accepted
(``--accept-no-ledger``), so a lost privacy database never silently resurrects
households deleted after the snapshot.

    hearth backup --out DIR [--keep N]            snapshot now (online), prune old ones
    hearth ledger export --out FILE               the deletion ledger, for off-site copies
    hearth restore SNAPSHOT_DIR [--ledger FILE]   services stopped; then start them
Configuration comes from the usual HEARTH_STORAGE / HEARTH_DATA_DIR / HEARTH_POSTGRES_DSN.
With a PostgreSQL login per service (`hearth db provision-roles`) the backup dumps each
schema with its service's DSN (HEARTH_POSTGRES_DSN_<SERVICE>), and the restore runs as the
admin (HEARTH_POSTGRES_DSN) and then hands each schema back to its service's role.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from services.common import strict_json
from services.common import backup as snapshots
from services.common import config
from services.common.ids import check_id
from services.common.storage import roles
from services.common.storage.sql import Database, migrate, open_database
from services.privacy.deletion.domain import JobState, job_from_dict, new_job
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.keys.store import KEY_TABLES, DataKeyStore
from services.privacy.migrations import MIGRATIONS

RESTORE_PRINCIPAL = "svc:privacy"


@dataclasses.dataclass
class Ledger:
    jobs: dict[str, dict]            # job_id -> job_to_dict JSON (every job not FAILED)
    shredded_accounts: set[str]


def read_ledger(db: Database) -> Ledger:
    with db.transaction() as tx:
        rows = tx.query("SELECT job_id, job_json, state FROM deletion_jobs")
        # Shredded: every version destroyed. A live household has destroyed versions too once
        # its data key was rotated (keys/rotation.py destroys the older versions; it kept
        # version 1 until session 27): taken for shredded until review26 (a household rotated
        # twice), a restore tombstoned its live keys. The digest key (digest_keys) is not
        # counted: a household has its data keys in data_keys only.
        shredded = tx.query("SELECT account_id FROM data_keys GROUP BY account_id "
                            "HAVING COUNT(*) = COUNT(destroyed_at)")
    jobs = {r[0]: json.loads(r[1]) for r in rows if r[2] != JobState.FAILED.value}
    return Ledger(jobs, {r[0] for r in shredded})


LEDGER_FORMAT = "hearth-deletion-ledger/1"


def _ledger_body(ledger: Ledger) -> dict:
    return {"jobs": ledger.jobs, "shredded_accounts": sorted(ledger.shredded_accounts)}


def _digest(body: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_ledger_file(ledger: Ledger, path: Path, exported_at: float | None = None) -> dict:
    """Write ``ledger`` as an off-site export: JSON with a format tag and the SHA-256 of
    its content, written to a temporary file, fsynced and renamed (a reader never sees
    half a ledger), mode 0600 (it names the deleted households: a suppression list)."""
    import os

    body = _ledger_body(ledger)
    document = {"format": LEDGER_FORMAT, "exported_at": exported_at if exported_at is not None else time.time(),
                **body, "sha256": _digest(body)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return {"ledger": str(path), "jobs": len(ledger.jobs), "shredded_accounts": len(ledger.shredded_accounts),
            "exported_at": document["exported_at"], "sha256": document["sha256"]}


def read_ledger_file(path: Path) -> Ledger:
    """An off-site ledger export; ValueError naming the file when it is not one or its
    checksum does not match (a truncated or edited copy must not be trusted silently)."""
    try:
        document = strict_json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--ledger {path}: not readable as a ledger export ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        raise ValueError(f"--ledger {path}: not a {LEDGER_FORMAT} file")
    body = {"jobs": document.get("jobs"), "shredded_accounts": document.get("shredded_accounts")}
    if not isinstance(body["jobs"], dict) or not isinstance(body["shredded_accounts"], list):
        raise ValueError(f"--ledger {path}: jobs / shredded_accounts missing")
    if _digest(body) != document.get("sha256"):
        raise ValueError(f"--ledger {path}: checksum mismatch (truncated or modified copy)")
    # Every entry read now, before `hearth restore` replaces anything: the checksum proves a
    # copy intact, not well formed (anyone may recompute it). Until attack31 an entry that
    # was not a job failed the restore while it re-applied the ledger, after every
    # database had been replaced: none of the ledger's deletions was re-applied.
    for job_id, data in body["jobs"].items():
        try:
            if not isinstance(data, dict):
                raise ValueError("not an object")
            job_from_dict(data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"--ledger {path}: jobs.{job_id[:100]}: not a deletion job ({exc})") from None
    for i, account in enumerate(body["shredded_accounts"]):
        try:
            check_id(account, f"shredded_accounts[{i}]")
        except ValueError as exc:
            raise ValueError(f"--ledger {path}: {exc}") from None
    return Ledger(body["jobs"], set(body["shredded_accounts"]))


def merge_ledgers(*ledgers: Ledger) -> Ledger:
    """Union: a deletion any copy knows is re-applied (a job id in several copies keeps
    the most advanced state: completed over running over pending)."""
    rank = {JobState.COMPLETED.value: 3, JobState.RUNNING.value: 2, JobState.PENDING.value: 1}
    jobs: dict[str, dict] = {}
    shredded: set[str] = set()
    for ledger in ledgers:
        shredded |= ledger.shredded_accounts
        for job_id, data in ledger.jobs.items():
            if rank.get(data.get("state"), 0) >= rank.get(jobs.get(job_id, {}).get("state"), 0):
                jobs[job_id] = data
    return Ledger(jobs, shredded)


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
        records = keys.load(account)
        if not records:
            # Erased before it had a key, or keyed only after the snapshot: a tombstone, as
            # the erasure writes (attack30), so no key is made for it before (or without)
            # the re-queued job.
            tombstoned += keys.tombstone_unkeyed(account, "", now.isoformat())
            continue
        live = [r for r in records if r.destroyed_at is None]
        tombstoned += keys.overwrite([dataclasses.replace(r, wrapped=b"", destroyed_at=now) for r in live])
    return {"requeued_jobs": requeued, "keys_tombstoned": tombstoned, "shredded_accounts": len(shred)}


def _settings(args: argparse.Namespace):
    # Snapshots, restored databases and ledgers hold every household's data (or the
    # erased ones' ids): the owner's only from their first byte, whatever the operator's
    # umask — pg_dump and SQLite create their files under it, and until attack29 a copy
    # was 0644 while being written (another local user could open it then and read it
    # through that file afterwards) in a 0755 snapshot directory.
    config.keep_files_private()
    overrides = {"service_name": "privacy"}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return config.load(**overrides)


def _privacy_db(settings) -> Database:
    db = open_database(settings, "privacy")
    migrate(db, MIGRATIONS, personal_tables=KEY_TABLES)   # as the service (ConsentStore.migrate)
    return db


def _privacy_db_exists(settings) -> bool:
    """Whether there is a privacy database to read the ledger from (PostgreSQL: its
    schema has the deletion_jobs table; SQLite: the file exists)."""
    if settings.storage != "postgres":
        return (Path(settings.data_dir) / "privacy.db").exists()
    import psycopg

    with psycopg.connect(settings.postgres_dsn) as conn:
        row = conn.execute("SELECT to_regclass('hearth_privacy.deletion_jobs')").fetchone()
    return row is not None and row[0] is not None


def run_ledger_export(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not _privacy_db_exists(settings):
        raise ValueError("no privacy database to export the deletion ledger from "
                         "(HEARTH_STORAGE / HEARTH_DATA_DIR / HEARTH_POSTGRES_DSN)")
    db = _privacy_db(settings)
    try:
        ledger = read_ledger(db)
    finally:
        db.close()
    print(json.dumps(write_ledger_file(ledger, Path(args.out))))
    return 0


def run_backup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out = Path(args.out)
    if settings.storage == "postgres":
        snap = snapshots.backup_postgres(settings.postgres_dsn, out, dsns=roles.service_dsns())
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
    if snap.backend == "postgres":
        snapshots.restore_tools_can_read(snap)   # before anything is read or changed
    # With a login per service, the admin (HEARTH_POSTGRES_DSN) only drops and creates
    # each schema; its dump is restored over the service's own login (attack29), and the
    # roles are provisioned again after (idempotent).
    dsns = roles.service_dsns() if snap.backend == "postgres" else {}
    if dsns and len(dsns) < len(roles.SERVICES):
        raise ValueError("set every HEARTH_POSTGRES_DSN_<SERVICE> (each schema goes back to its role after the "
                         f"restore) or none: missing {', '.join(roles.service_dsn_variable(s) for s in roles.SERVICES if s not in dsns)}")
    if dsns:
        # The admin drops and recreates every schema on its own server: privacy's database
        # on another server (docs/operations.md "Database roles") cannot be restored so.
        admin_server = roles.server_of(settings.postgres_dsn, "HEARTH_POSTGRES_DSN")
        for service, dsn in sorted(dsns.items()):
            variable = roles.service_dsn_variable(service)
            if (server := roles.server_of(dsn, variable)) != admin_server:
                raise ValueError(f"{variable}: names server {server}, HEARTH_POSTGRES_DSN {admin_server}: `hearth "
                                 "restore` restores the schemas of one server, and a deployment with a service's "
                                 "database on another server cannot be restored by it (docs/operations.md, "
                                 "\"Privacy on another server\"); nothing was changed")
    if snap.backend == "postgres":
        # As SQLite's (restore_sqlite): nothing is changed under running services. A service
        # still connected would write beside the restore (or hold the DROP SCHEMA's lock
        # for good) and go on with what it cached of the replaced data; until session 29
        # nothing checked this on PostgreSQL.
        logins = ([roles.login_of(d, roles.service_dsn_variable(s)) for s, d in sorted(dsns.items())] if dsns
                  else [roles.login_of(settings.postgres_dsn, "HEARTH_POSTGRES_DSN")])
        busy = snapshots.postgres_sessions_in_use(settings.postgres_dsn, logins)
        if busy:
            raise snapshots.BackupError(
                f"the services' logins are connected to the database now: {'; '.join(busy)}. Stop every service "
                "first (kubectl scale --replicas=0; the backup and ledger CronJobs too, or wait for them): a running "
                "service would write beside the restore and go on with what it cached; nothing was changed")
    # With a login per service, privacy's schema is read and written over privacy's
    # login, never the admin's: a trigger or view privacy's login put there would run with
    # the admin's rights (attack29). Provisioned first, so on a new database the roles and
    # their empty schemas exist for the dump to be restored into as each service.
    privacy = settings
    put_back: list[str] = []
    if dsns:
        # A restore killed between setting a schema aside and dropping it: put back first,
        # so the ledger below is the replaced database's (review29).
        put_back = snapshots.put_back_set_aside(settings.postgres_dsn)
        # Both times as provisioned: each role's connection limit (the chart's) and members
        # stay; until session 29 the restore re-ran provisioning's defaults and reset the limit.
        roles.provision_roles(settings.postgres_dsn, dsns, as_provisioned=True)
        privacy = settings.model_copy(update={"postgres_dsn": dsns["privacy"]})
    # The ledger of the database being replaced: read it before anything is overwritten;
    # merged with the off-site exports given (all of them: a deletion any copy knows).
    offsite = [read_ledger_file(Path(p)) for p in args.ledger or ()]
    ledger = Ledger({}, set())
    current_exists = _privacy_db_exists(privacy)
    if current_exists:
        db = _privacy_db(privacy)
        try:
            ledger = read_ledger(db)
        finally:
            db.close()
    elif not offsite and not args.accept_no_ledger:
        raise ValueError("the privacy database to be replaced is gone, so the deletions made since the snapshot "
                         "are unknown: pass --ledger FILE (the off-site `hearth ledger export`), or "
                         "--accept-no-ledger to restore anyway")
    ledger = merge_ledgers(ledger, *offsite)
    if snap.backend == "postgres":
        restored = snapshots.restore_postgres(snap, settings.postgres_dsn, dsns=dsns)
    else:
        restored = snapshots.restore_sqlite(snap, Path(settings.data_dir))
    db = _privacy_db(privacy)
    try:
        report = reapply_ledger(db, ledger)
    finally:
        db.close()
    if dsns:
        handed = roles.provision_roles(settings.postgres_dsn, dsns, as_provisioned=True)
        report = {**report, "roles": {service: done["role"] for service, done in handed.items()}}
    if put_back:   # schemas an interrupted restore had set aside, put back before this one
        report = {**report, "put_back_before_restore": put_back}
    caches, cache_error = _clear_caches(settings)
    if caches or cache_error:
        report = {**report, "redis_keys_cleared": caches, **({"redis_error": cache_error} if cache_error else {})}
    print(json.dumps({"restored": restored, "snapshot_taken_at": snap.taken_at,
                      "snapshot_age_s": round(time.time() - snap.taken_at, 3),
                      "ledger_jobs": len(ledger.jobs), "ledger_sources": (["database"] if current_exists else [])
                      + [str(p) for p in args.ledger or ()], **report,
                      "restore_s": round(time.monotonic() - started, 3)}))
    return 1 if cache_error else 0


# The services whose Redis namespaces (``hearth:<service>:``) hold copies of their data.
CACHED_SERVICES = ("clustering", "attribution", "privacy", "feedback")


def _clear_caches(settings) -> tuple[dict[str, int], str]:
    """With Redis configured, delete every service's cached copies: they are of the data
    as it was before the restore (a household model fitted on sessions the snapshot does
    not have, cached for up to an hour), and a service reads its cache before SQL. Found
    in session 18: nothing cleared them, so the restored mesh served models newer than
    its database. Returns (keys removed per service, why Redis could not be cleared)."""
    if not settings.redis_url:
        return {}, ""
    from services.common.errors import Unavailable
    from services.common.storage.cache import RedisCache

    try:
        return {service: RedisCache(settings.redis_url, service).delete_prefix("", strict=True)
                for service in CACHED_SERVICES}, ""
    except Unavailable as exc:
        return {}, (f"{exc}: delete the keys hearth:<service>:* (or restart a Redis without persistence) "
                    "before starting the services")


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
    restore.add_argument("--ledger", action="append", metavar="FILE",
                         help="an off-site deletion ledger (`hearth ledger export`); repeatable, merged")
    restore.add_argument("--accept-no-ledger", action="store_true",
                         help="restore even though neither the privacy database nor --ledger says what was "
                              "deleted since the snapshot")
    restore.set_defaults(func=run_restore)
    ledger = subparsers.add_parser("ledger", help="the deletion ledger (for restores after losing the privacy db)")
    commands = ledger.add_subparsers(dest="ledger_command", required=True)
    export = commands.add_parser("export", help="write every deletion job and shredded key to FILE (atomic)")
    export.add_argument("--out", required=True, help="the file to (over)write, e.g. on the off-site volume")
    export.add_argument("--data-dir", help="SQLite data directory (default HEARTH_DATA_DIR)")
    export.set_defaults(func=run_ledger_export)
