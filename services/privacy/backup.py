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
    hearth ledger export --out FILE               the deletion ledger, signed, for off-site copies
    hearth ledger public-key                      its signing key's public half (PEM), for --ledger-public-key
    hearth restore SNAPSHOT_DIR [--ledger FILE [--ledger-public-key PEM] [--accept-stale-ledger]]
                                                  services stopped; then start them
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
from services.common.ids import MAX_FUTURE_SKEW_S, check_id
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
    # An off-site export's signed export time (Unix s) and the key that verified it (what
    # the restore prints, and what its staleness check reads); None / "" otherwise.
    exported_at: float | None = None
    signed_with: str = ""


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


# The off-site ledger file. /1 (until session 32): the jobs and shredded accounts with an
# unkeyed SHA-256, which anyone who can write the off-site copy recomputes — so they could
# add deletions, or drop some where it is the only ledger (the privacy database lost). /2:
# every entry signed with Ed25519 — by the receipt signing key in session 32, by the
# ledger's own key (HEARTH_LEDGER_SIGNING_KEY, below) since session 33 —, each signature binding the
# entry to its export, its position and the entry before it, and a signed head binding the
# count, the last entry and the export time: a forged, altered, reordered, removed or
# truncated entry is refused naming it. docs/privacy.md "The off-site deletion ledger".
LEDGER_FORMAT_UNSIGNED = "hearth-deletion-ledger/1"
LEDGER_FORMAT = "hearth-deletion-ledger/2"
ENTRY_TYPE = "hearth-deletion-ledger-entry"
HEAD_TYPE = "hearth-deletion-ledger-head"
_GENESIS = "00" * 32


def _ledger_body(ledger: Ledger) -> dict:
    return {"jobs": ledger.jobs, "shredded_accounts": sorted(ledger.shredded_accounts)}


def _digest(body: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _entry_payload(export_id: str, kid: str, n: int, kind: str, entry_id: str, data: dict | None,
                   prev: str) -> bytes:
    """What an entry's signature covers: the entry, its export, its position and the hash
    of the entry before it (so it cannot be moved, dropped or copied into another export)."""
    body = {"type": ENTRY_TYPE, "v": 2, "export_id": export_id, "key_id": kid, "n": n, "kind": kind,
            "id": entry_id, "prev": prev}
    if data is not None:
        body["data"] = data
    return _canonical(body)


def _head_payload(export_id: str, kid: str, exported_at: float, count: int, last: str) -> bytes:
    return _canonical({"type": HEAD_TYPE, "v": 2, "export_id": export_id, "key_id": kid,
                       "exported_at": exported_at, "entries": count, "last": last})


def _sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def sign_ledger(ledger: Ledger, signing_key, exported_at: float, export_id: str | None = None) -> dict:
    """The /2 document of ``ledger``: jobs (by id) then shredded accounts (sorted), each
    entry signed, and a signed head."""
    from services.privacy.keys.signing import key_id

    export_id = export_id or uuid.uuid4().hex
    kid = key_id(signing_key)
    entries, prev = [], _GENESIS
    items = [("job", job_id, ledger.jobs[job_id]) for job_id in sorted(ledger.jobs)]
    items += [("shredded", account, None) for account in sorted(ledger.shredded_accounts)]
    for n, (kind, entry_id, data) in enumerate(items):
        payload = _entry_payload(export_id, kid, n, kind, entry_id, data, prev)
        entry = {"n": n, "kind": kind, "id": entry_id, "sig": signing_key.sign(payload).hex()}
        if data is not None:
            entry["data"] = data
        entries.append(entry)
        prev = _sha256_hex(payload)
    head = {"entries": len(entries), "last": prev,
            "sig": signing_key.sign(_head_payload(export_id, kid, exported_at, len(entries), prev)).hex()}
    return {"format": LEDGER_FORMAT, "export_id": export_id, "exported_at": exported_at, "key_id": kid,
            "entries": entries, "head": head}


def write_ledger_file(ledger: Ledger, path: Path, signing_key, exported_at: float | None = None) -> dict:
    """Write ``ledger`` as an off-site export, signed with ``signing_key`` (the ledger
    signing key), written to a temporary file, fsynced and renamed (a reader never sees
    half a ledger), mode 0600 (it names the deleted households: a suppression list)."""
    import os

    document = sign_ledger(ledger, signing_key, exported_at if exported_at is not None else time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return {"ledger": str(path), "jobs": len(ledger.jobs), "shredded_accounts": len(ledger.shredded_accounts),
            "exported_at": document["exported_at"], "export_id": document["export_id"],
            "key_id": document["key_id"], "entries": document["head"]["entries"]}


def _checked_entries(path: Path, jobs: dict, shredded: list) -> Ledger:
    """Every entry read now, before `hearth restore` replaces anything: a checksum or a
    signature proves a copy intact, not well formed. Until attack31 an entry that was not
    a job failed the restore while it re-applied the ledger, after every database had
    been replaced: none of the ledger's deletions was re-applied."""
    for job_id, data in jobs.items():
        try:
            if not isinstance(data, dict):
                raise ValueError("not an object")
            job_from_dict(data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"--ledger {path}: jobs.{job_id[:100]}: not a deletion job ({exc})") from None
    for i, account in enumerate(shredded):
        try:
            check_id(account, f"shredded_accounts[{i}]")
        except ValueError as exc:
            raise ValueError(f"--ledger {path}: {exc}") from None
    return Ledger(jobs, set(shredded))


def read_ledger_file(path: Path, public_keys=(), accept_unsigned: bool = False,
                     key_labels: dict[str, str] | None = None,
                     receipt_keys: dict[str, str] | None = None) -> Ledger:
    """An off-site ledger export, its signatures checked with one of ``public_keys``;
    ValueError naming the file — and the entry — when it is not a ledger, not signed by
    one of them, or any entry is forged, altered, out of place, missing or beyond the
    signed count. An unsigned (/1) file only with ``accept_unsigned``. ``key_labels``
    (key id -> what the key is) names the key that verified it in the Ledger returned;
    ``receipt_keys`` (key id -> what the key is) are the receipt signing key's, recognised
    but not trusted for ledgers since session 35: a file one of them signed is refused
    saying which key it was and what to do."""
    try:
        document = strict_json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--ledger {path}: not readable as a ledger export ({exc})") from None
    if isinstance(document, dict) and document.get("format") == LEDGER_FORMAT_UNSIGNED:
        return _read_unsigned(path, document, accept_unsigned)
    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        raise ValueError(f"--ledger {path}: not a {LEDGER_FORMAT} file")
    return _read_signed(path, document, public_keys, key_labels or {}, receipt_keys or {})


def _read_unsigned(path: Path, document: dict, accept_unsigned: bool) -> Ledger:
    if not accept_unsigned:
        raise ValueError(f"--ledger {path}: unsigned ({LEDGER_FORMAT_UNSIGNED}, exported before session 32): "
                         "whoever can write the off-site copy can add or drop deletions in it unseen. Use a "
                         "signed export (`hearth ledger export` signs since then; the CronJob writes one every "
                         "few minutes), or pass --accept-unsigned-ledger if this copy is all there is and its "
                         "storage is trusted")
    body = {"jobs": document.get("jobs"), "shredded_accounts": document.get("shredded_accounts")}
    if not isinstance(body["jobs"], dict) or not isinstance(body["shredded_accounts"], list):
        raise ValueError(f"--ledger {path}: jobs / shredded_accounts missing")
    if _digest(body) != document.get("sha256"):
        raise ValueError(f"--ledger {path}: checksum mismatch (truncated or modified copy)")
    exported_at = document.get("exported_at")
    return dataclasses.replace(_checked_entries(path, body["jobs"], body["shredded_accounts"]),
                               exported_at=exported_at if type(exported_at) in (int, float) else None,
                               signed_with="unsigned (--accept-unsigned-ledger)")


def _read_signed(path: Path, document: dict, public_keys, key_labels: dict[str, str],
                 receipt_keys: dict[str, str]) -> Ledger:
    from services.privacy.keys.signing import key_id, verify_signature

    unexpected = sorted(set(document) - {"format", "export_id", "exported_at", "key_id", "entries", "head"})
    if unexpected:   # nothing outside the signatures may say anything
        raise ValueError(f"--ledger {path}: unexpected field {unexpected[0][:100]!r} (not what `hearth ledger "
                         "export` writes)")
    export_id, kid, exported_at = document.get("export_id"), document.get("key_id"), document.get("exported_at")
    entries, head = document.get("entries"), document.get("head")
    if (not isinstance(export_id, str) or not isinstance(kid, str) or type(exported_at) not in (int, float)
            or not isinstance(entries, list) or not isinstance(head, dict)):
        raise ValueError(f"--ledger {path}: export_id / key_id / exported_at / entries / head missing")
    keys = {key_id(k): k for k in public_keys}
    signer = keys.get(kid)
    if signer is None and kid in receipt_keys:
        raise ValueError(f"--ledger {path}: signed by key {kid[:16]}, the {receipt_keys[kid]}: an export of before "
                         "session 33, and since session 35 a restore no longer trusts the receipt signing key for "
                         "ledgers by itself (whoever holds it, the privacy pods, could sign one). If this copy is "
                         f"the newest you have, give that key's public half: --ledger-public-key FILE "
                         f"({RECEIPT_PUBLIC_KEY_WHERE}); docs/operations.md \"Upgrading to session 35\"")
    if signer is None:
        raise ValueError(f"--ledger {path}: signed by key {kid[:16]}, which is not one of the keys given "
                         f"({', '.join(sorted(keys)) or 'none'}: HEARTH_LEDGER_SIGNING_KEY's public half and each "
                         "--ledger-public-key); a ledger exported before the ledger signing key was rotated needs "
                         "the old public key, and one exported before session 33 (signed with the receipt signing "
                         f"key) the receipt key's ({RECEIPT_PUBLIC_KEY_WHERE}): --ledger-public-key FILE")

    def signed(sig: object, payload: bytes) -> bool:
        try:
            return isinstance(sig, str) and verify_signature(signer, bytes.fromhex(sig), payload)
        except ValueError:
            return False

    count = head.get("entries")
    if type(count) is not int or not isinstance(head.get("last"), str):
        raise ValueError(f"--ledger {path}: head: entries / last missing")
    if not signed(head.get("sig"), _head_payload(export_id, kid, exported_at, count, head["last"])):
        raise ValueError(f"--ledger {path}: head: signature does not verify (forged or modified head)")
    jobs: dict[str, dict] = {}
    shredded: list[str] = []
    prev = _GENESIS
    for position, entry in enumerate(entries):
        where = f"--ledger {path}: entry {position}"
        if position >= count:
            raise ValueError(f"{where}: beyond the {count} entries the head signs (entries added)")
        if not isinstance(entry, dict) or entry.get("kind") not in ("job", "shredded") \
                or not isinstance(entry.get("id"), str) or type(entry.get("n")) is not int:
            raise ValueError(f"{where}: not a ledger entry")
        label = f"{'jobs' if entry['kind'] == 'job' else 'shredded_accounts'}.{entry['id'][:100]}"
        if set(entry) != ({"n", "kind", "id", "sig", "data"} if entry["kind"] == "job" else {"n", "kind", "id", "sig"}):
            raise ValueError(f"{where} ({label}): unexpected or missing fields (not what `hearth ledger export` "
                             "writes)")
        if entry["n"] != position:
            raise ValueError(f"{where} ({label}): signed as entry {entry['n']}: the ledger was reordered "
                             "or an entry before it removed")
        data = entry.get("data") if entry["kind"] == "job" else None
        payload = _entry_payload(export_id, kid, position, entry["kind"], entry["id"], data, prev)
        if not signed(entry.get("sig"), payload):
            raise ValueError(f"{where} ({label}): signature does not verify (forged or modified entry, "
                             "or one from another export)")
        prev = _sha256_hex(payload)
        if entry["kind"] == "job":
            if entry["id"] in jobs:
                raise ValueError(f"{where} ({label}): the job appears twice")
            jobs[entry["id"]] = data
        else:
            shredded.append(entry["id"])
    if len(entries) < count:
        raise ValueError(f"--ledger {path}: truncated: the head signs {count} entries, the file ends after "
                         f"{len(entries)} (entry {len(entries)} missing)")
    if prev != head["last"]:
        raise ValueError(f"--ledger {path}: head: its last entry is not the file's (entries replaced)")
    return dataclasses.replace(_checked_entries(path, jobs, shredded), exported_at=exported_at,
                               signed_with=key_labels.get(kid, f"key {kid}"))


# A stale genuine ledger (review32 R19). A signature shows a copy is one the export wrote,
# not that it is the newest: restoring a snapshot with an older export (an off-site
# bucket's older version, a copy that stopped syncing, a CronJob failing for hours)
# re-applies only the deletions up to that export — the households erased after it come
# back, silently. Nothing the restore holds can prove a copy is the newest (the database
# that knew is the one lost), so the restore asks for what it can check, from the
# signed export time: (1) the newest copy given was exported after the snapshot was taken
# — else it knows none of the deletions since the snapshot; (2) it is at most
# --ledger-max-age-s old (default 1 h: the CronJob exports every 5 minutes, so an older
# newest copy means the exports stopped or the copy is not the latest, unless the
# database was lost that long ago); (3) no copy's export time is more than the clock-skew
# tolerance ahead of this machine's clock (its age could not be told). Each failing is
# refused, naming the file, what it covers and the way on: a newer copy, or
# --accept-stale-ledger from an operator who knows it is the last export there was. A sequence number in the head would add
# nothing: the export only reads privacy's tables (a counter would need it to write
# them), and what a later export had counted is lost with the database either way; the
# signed export time is already ordered against the snapshot's. Only when the privacy
# database being replaced is gone: otherwise its own ledger, complete, is merged in.
STALE_LEDGER_MAX_AGE_S = 3600.0


def _utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):   # an unsigned /1 file's exported_at may be anything
        return repr(ts)


def ledger_coverage(source: str, ledger: Ledger, now: float) -> dict:
    """What one off-site ledger covers, as the restore prints it."""
    requested = [j.get("requested_at") for j in ledger.jobs.values() if isinstance(j.get("requested_at"), str)]
    return {"source": str(source), "exported_at": _utc(ledger.exported_at),
            "age_s": None if ledger.exported_at is None else round(now - ledger.exported_at, 1),
            "jobs": len(ledger.jobs), "shredded_accounts": len(ledger.shredded_accounts),
            "newest_request_at": max(requested, default=None), "signed_with": ledger.signed_with}


def stale_ledger_reason(ledgers: list[tuple[str, Ledger]], snapshot_taken_at: float, now: float,
                        max_age_s: float) -> str:
    """Why the newest of the off-site ``ledgers`` (source, ledger) is not shown to cover the
    deletions made since the snapshot; "" when it is."""
    dated = [(ledger.exported_at, str(source), ledger) for source, ledger in ledgers if ledger.exported_at is not None]
    if not dated:
        return (f"--ledger {ledgers[0][0]}: no export time, so nothing shows it covers the deletions since the "
                "snapshot; pass --accept-stale-ledger if it is the newest export there is. Nothing was changed")
    # An export time ahead of this machine's clock cannot show how old the file is (the
    # exporting machine's clock ran ahead, or a /1 file says anything): beyond the clock-skew
    # tolerance ingest allows (MAX_FUTURE_SKEW_S) it would pass the age check however old it is.
    for ahead_at, ahead_source, _ in sorted(dated, key=lambda d: d[0]):
        if ahead_at - now > MAX_FUTURE_SKEW_S:
            return (f"--ledger {ahead_source}: exported at {_utc(ahead_at)}, {ahead_at - now:.0f} s in the future "
                    f"of this machine's clock (more than the {MAX_FUTURE_SKEW_S:g} s tolerance): its age, so whether "
                    "it covers the deletions since the snapshot, cannot be told; check this machine's clock and "
                    "the exporting one's, use another export, or pass --accept-stale-ledger if it is the newest "
                    "export there is. Nothing was changed")
    exported_at, source, ledger = max(dated, key=lambda d: d[0])
    covers = ledger_coverage(source, ledger, now)
    what = (f"it covers {covers['jobs']} deletion job(s) (the newest requested at {covers['newest_request_at']}) and "
            f"{covers['shredded_accounts']} shredded household(s); signed with: {ledger.signed_with}")
    way_on = ("Use a newer export (the CronJob writes one every few minutes); if the privacy database was lost longer "
              "ago than that, give --ledger-max-age-s the seconds since the loss plus one export period; pass "
              "--accept-stale-ledger only if this is the last export there was. Nothing was changed")
    if exported_at < snapshot_taken_at:
        return (f"--ledger {source}: stale: exported at {_utc(exported_at)}, before the snapshot was taken "
                f"({_utc(snapshot_taken_at)}): it knows none of the deletions made after the snapshot, and restoring "
                f"with it would bring back every household erased since; {what}. {way_on}")
    if now - exported_at > max_age_s:
        return (f"--ledger {source}: stale: exported at {_utc(exported_at)}, {now - exported_at:.0f} s ago, more "
                f"than --ledger-max-age-s ({max_age_s:g} s): the deletions made between its export and the loss of "
                f"the privacy database are in no ledger given, and would be undone; {what}. {way_on}")
    return ""


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


# Where an operator finds the receipt signing key's public half, which a ledger exported
# before session 33 needs (--ledger-public-key) since session 35.
RECEIPT_PUBLIC_KEY_WHERE = ("the receipt public key you publish for verifying receipts; in development "
                            "$HEARTH_DATA_DIR/privacy-receipt-signing.pub")


def _receipt_key_text(settings) -> tuple[str, str]:
    """(the receipt signing key's text, where it came from): HEARTH_RECEIPT_SIGNING_KEY, else
    the privacy service's development key under HEARTH_DATA_DIR; ("", "") when neither."""
    from services.privacy.keys.app import SIGNING_KEY_FILE
    from services.privacy.settings import privacy_settings

    configured = privacy_settings(settings).receipt_signing_key
    if configured:
        return configured, "HEARTH_RECEIPT_SIGNING_KEY"
    dev = Path(settings.data_dir) / SIGNING_KEY_FILE
    return (dev.read_text(), str(dev)) if dev.exists() else ("", "")


# The ledger's own signing key (session 33). Until then the ledger was signed with the
# receipt signing key, so the CronJob that exports it every 5 minutes held a key that
# signs "this household was erased": whoever took that pod could forge deletion receipts.
# Now the export holds HEARTH_LEDGER_SIGNING_KEY only (the chart's Secret
# backup.ledgerSigningKey) and the privacy pods never hold it. In development (SQLite)
# the export generates it once under HEARTH_DATA_DIR, as the privacy service does the
# receipt key, and publishes its public half beside it for the restore; on PostgreSQL it
# must be configured (a key made up in a CronJob's pod would be gone with the pod, and
# nothing could verify what it signed).
LEDGER_SIGNING_KEY_FILE = "privacy-ledger-signing.key"
RECEIPT_KEY_LABEL = "receipt signing key"   # how a restore names the receipt key it recognises
LEDGER_SIGNING_PUBLIC_FILE = "privacy-ledger-signing.pub"


def _ledger_key_text(settings) -> tuple[str, str]:
    """(the ledger signing key's text, where it came from): HEARTH_LEDGER_SIGNING_KEY, else
    the development key under HEARTH_DATA_DIR; ("", "") when neither."""
    import os

    # Read by this tooling only (services/common/config.py OTHER_VARIABLES): the privacy
    # service never reads it, so its pods need not (and in the chart do not) hold it.
    configured = os.environ.get("HEARTH_LEDGER_SIGNING_KEY", "")
    if configured.strip():
        return configured, "HEARTH_LEDGER_SIGNING_KEY"
    dev = Path(settings.data_dir) / LEDGER_SIGNING_KEY_FILE
    return (dev.read_text(), str(dev)) if dev.exists() else ("", "")


def _ledger_signing_key(settings):
    """The key `hearth ledger export` signs with: HEARTH_LEDGER_SIGNING_KEY, else (SQLite,
    development) the generated one under HEARTH_DATA_DIR — never the receipt key."""
    import sys

    from services.privacy.keys.app import _write_secret
    from services.privacy.keys.signing import (
        generate_private_key, load_private_key, private_key_to_pem, publish_public_key)

    text, source = _ledger_key_text(settings)
    if not text:
        if settings.storage == "postgres":
            raise ValueError("HEARTH_LEDGER_SIGNING_KEY: not set: the off-site ledger is signed with a key of its "
                             "own since session 33 (no longer the receipt signing key), which a restore verifies; "
                             "configure it (the chart: backup.ledgerSigningKey; docs/operations.md \"Off-site "
                             "deletion ledger\")")
        path = Path(settings.data_dir) / LEDGER_SIGNING_KEY_FILE
        print(f"warning: HEARTH_LEDGER_SIGNING_KEY is not set: generated a development ledger signing key in "
              f"{path} (configure a managed key in production)", file=sys.stderr)
        try:   # as the privacy service writes its development keys: 0600, never over one
            _write_secret(path, private_key_to_pem(generate_private_key()))
        except FileExistsError:
            pass   # another export of this data dir made it first
        text, source = path.read_text(), str(path)
    key = load_private_key(text, argument=source)
    if source != "HEARTH_LEDGER_SIGNING_KEY":
        publish_public_key(Path(settings.data_dir) / LEDGER_SIGNING_PUBLIC_FILE, key.public_key())
    return key


def _refuse_receipt_key_as_ledger_key(ledger_kid: str, ledger_source: str, receipt_kid: str,
                                      receipt_source: str) -> None:
    """ValueError naming both when the ledger key is the receipt signing key: a ledger
    signed with it could be signed by whoever holds the receipt key (every privacy pod), the
    very trust session 35 removed, and the CronJob holding it could sign receipts (what
    session 33's own ledger key removed). review35 R1: through session 35's first change a
    restore trusted such a key silently, as the ledger key."""
    if ledger_kid == receipt_kid:
        raise ValueError(f"{ledger_source}: is the receipt signing key ({receipt_source}; key {ledger_kid[:16]}): "
                         "the off-site ledger must have a key of its own — whoever holds the receipt key (every "
                         "privacy pod) could sign a ledger a restore accepts. Configure a separate ledger key "
                         "(docs/operations.md \"Off-site deletion ledger\"); a copy this key signed restores only "
                         "with its public half given explicitly: without HEARTH_LEDGER_SIGNING_KEY, "
                         "--ledger-public-key FILE")


def _ledger_public_keys(settings, files) -> tuple[list, dict[str, str], dict[str, str]]:
    """The keys an off-site ledger may be signed with, what each is (by key id), and the
    keys recognised but not trusted (by key id: what each is). Trusted: the ledger signing
    key's public half (HEARTH_LEDGER_SIGNING_KEY's, or the development key's or its
    published .pub) and each --ledger-public-key file. The receipt signing key's public half
    (HEARTH_RECEIPT_SIGNING_KEY's, or the development one's) is only recognised: through
    session 34 a restore trusted it for ledgers exported before session 33; since session 35
    a ledger it signed is refused naming it, unless the operator gives its public half by
    --ledger-public-key (then named as such). docs/privacy.md "The off-site deletion ledger"."""
    from services.privacy.keys.app import SIGNING_PUBLIC_FILE
    from services.privacy.keys.signing import key_id, load_private_key, load_public_key, load_public_keys

    named: list[tuple[str, object]] = []
    text, ledger_source = _ledger_key_text(settings)
    if text:
        named.append((f"ledger key ({ledger_source})", load_private_key(text, argument=ledger_source).public_key()))
    elif (published := Path(settings.data_dir) / LEDGER_SIGNING_PUBLIC_FILE).exists():
        ledger_source = str(published)
        named.append((f"ledger key ({published})", load_public_key(published.read_text(), argument=str(published))))
    ledger_named = bool(named)   # named[0] is the ledger key, before the files given
    for name in files or ():
        try:
            text = Path(name).read_text()
        except OSError as exc:
            raise ValueError(f"--ledger-public-key {name}: not readable ({exc})") from None
        named += [(f"--ledger-public-key {name}", k)
                  for k in load_public_keys(text, argument=f"--ledger-public-key {name}")]
    receipt: dict[str, str] = {}
    text, source = _receipt_key_text(settings)
    if text:
        receipt[key_id(load_private_key(text, argument=source).public_key())] = f"{RECEIPT_KEY_LABEL} ({source})"
    elif (published := Path(settings.data_dir) / SIGNING_PUBLIC_FILE).exists():
        source = str(published)
        receipt[key_id(load_public_key(published.read_text(), argument=str(published)))] = (
            f"{RECEIPT_KEY_LABEL} ({published})")
    if ledger_named:   # the ledger key is never the receipt key (review35 R1)
        for receipt_kid in receipt:
            _refuse_receipt_key_as_ledger_key(key_id(named[0][1]), ledger_source, receipt_kid, source)
    labels: dict[str, str] = {}
    for label, key in named:
        kid = key_id(key)
        if kid in receipt and kid not in labels:   # the operator's explicit word: trusted, and said so
            label = f"{label}: the {receipt[kid]}"
        labels.setdefault(kid, label)   # the first name of a key given twice
    return [key for _, key in named], labels, {kid: what for kid, what in receipt.items() if kid not in labels}


def run_ledger_export(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not _privacy_db_exists(settings):
        raise ValueError("no privacy database to export the deletion ledger from "
                         "(HEARTH_STORAGE / HEARTH_DATA_DIR / HEARTH_POSTGRES_DSN)")
    signing_key = _ledger_signing_key(settings)   # before reading: no key, nothing done
    receipt_text, receipt_source = _receipt_key_text(settings)
    if receipt_text:   # where the export can see the receipt key (not the chart's CronJob): never sign with it
        from services.privacy.keys.signing import key_id, load_private_key

        _refuse_receipt_key_as_ledger_key(key_id(signing_key.public_key()), _ledger_key_text(settings)[1],
                                          key_id(load_private_key(receipt_text, argument=receipt_source)
                                                 .public_key()), receipt_source)
    db = _privacy_db(settings)
    try:
        ledger = read_ledger(db)
        written = write_ledger_file(ledger, Path(args.out), signing_key)
        # Noted in privacy's database once the file is in place: every privacy replica
        # exports hearth_ledger_last_export_timestamp_seconds from it (HearthLedgerExportStale
        # fires when exports stop; the Job itself is not scraped). A file written but not
        # noted fails the run, naming what stays behind, rather than pass silently. Only the
        # off-site copy (--off-site: the chart's CronJob) is noted — a copy made by hand
        # elsewhere would reset the alert's clock while the off-site file went stale (review34).
        if args.off_site:
            try:
                DeletionJobStore(db).record_ledger_export(written["exported_at"], written["export_id"],
                                                          written["entries"])
            except Exception as exc:  # noqa: BLE001 - the message names the consequence
                raise ValueError(f"--out {args.out}: the ledger was written, but its export could not be recorded "
                                 f"in the privacy database ({exc.__class__.__name__}: {exc}): "
                                 "hearth_ledger_last_export_timestamp_seconds does not advance") from None
    finally:
        db.close()
    print(json.dumps(written))
    return 0


def run_ledger_public_key(args: argparse.Namespace) -> int:
    """Print the ledger signing key's public half (PEM): what `hearth restore --ledger`
    needs (--ledger-public-key FILE) on a machine that should not hold the private key, and
    what to keep with the off-site copies before rotating the key."""
    from services.privacy.keys.signing import load_private_key, public_key_to_pem

    settings = _settings(args)
    text, source = _ledger_key_text(settings)
    if not text:
        raise ValueError("HEARTH_LEDGER_SIGNING_KEY: not set, and no development ledger key in HEARTH_DATA_DIR: "
                         "no ledger signing key to print the public half of")
    print(public_key_to_pem(load_private_key(text, argument=source).public_key()), end="")
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
    public_keys, key_labels, receipt_keys = (_ledger_public_keys(settings, args.ledger_public_key) if args.ledger
                                             else ([], {}, {}))
    offsite = [read_ledger_file(Path(p), public_keys, accept_unsigned=args.accept_unsigned_ledger,
                                key_labels=key_labels, receipt_keys=receipt_keys)
               for p in args.ledger or ()]
    ledger = Ledger({}, set())
    current_exists = _privacy_db_exists(privacy)
    now = time.time()
    coverage = [ledger_coverage(p, o, now) for p, o in zip(args.ledger or (), offsite, strict=True)]
    if offsite and not current_exists and not args.accept_stale_ledger:
        # Only the off-site copies say what was deleted since the snapshot: one that is not
        # shown to be recent enough is refused before anything is replaced (review32 R19).
        stale = stale_ledger_reason(list(zip(args.ledger, offsite, strict=True)), snap.taken_at, now,
                                    args.ledger_max_age_s)
        if stale:
            raise ValueError(stale)
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
                      + [str(p) for p in args.ledger or ()], **({"ledger_coverage": coverage} if coverage else {}),
                      **report,
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


def _non_negative_seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


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
    restore.add_argument("--ledger-public-key", action="append", metavar="FILE",
                         help="a public key (PEM) the --ledger files may be signed with, besides "
                              "HEARTH_LEDGER_SIGNING_KEY's: the ledger key's from before a rotation, or the receipt "
                              "signing key's for a ledger exported before session 33 (no longer trusted without "
                              "it since session 35); repeatable")
    restore.add_argument("--accept-unsigned-ledger", action="store_true",
                         help="accept a --ledger exported before session 32 (unsigned: anyone who could write "
                              "the copy could have added or dropped deletions)")
    restore.add_argument("--accept-stale-ledger", action="store_true",
                         help="restore with --ledger files even though the newest was exported before the snapshot "
                              "or longer ago than --ledger-max-age-s, or more than 10 min ahead of this machine's "
                              "clock (the deletions after its export are undone)")
    restore.add_argument("--ledger-max-age-s", type=_non_negative_seconds, default=STALE_LEDGER_MAX_AGE_S,
                         metavar="S", help="without the privacy database, the newest --ledger must be at most this "
                                           f"old (default {STALE_LEDGER_MAX_AGE_S:g}; the CronJob exports every 5 min)")
    restore.add_argument("--accept-no-ledger", action="store_true",
                         help="restore even though neither the privacy database nor --ledger says what was "
                              "deleted since the snapshot")
    restore.set_defaults(func=run_restore)
    ledger = subparsers.add_parser("ledger", help="the deletion ledger (for restores after losing the privacy db)")
    commands = ledger.add_subparsers(dest="ledger_command", required=True)
    export = commands.add_parser("export", help="write every deletion job and shredded key to FILE (atomic)")
    export.add_argument("--out", required=True, help="the file to (over)write, e.g. on the off-site volume")
    export.add_argument("--data-dir", help="SQLite data directory (default HEARTH_DATA_DIR)")
    export.add_argument("--off-site", action="store_true",
                        help="this is the off-site copy (the chart's CronJob): note its time in the privacy "
                             "database (hearth_ledger_last_export_timestamp_seconds, HearthLedgerExportStale); "
                             "a copy made by hand, without it, does not count as the off-site export")
    export.set_defaults(func=run_ledger_export)
    public = commands.add_parser("public-key", help="print the ledger signing key's public half (PEM), for "
                                                    "`hearth restore --ledger-public-key`")
    public.add_argument("--data-dir", help="SQLite data directory (default HEARTH_DATA_DIR)")
    public.set_defaults(func=run_ledger_public_key)
