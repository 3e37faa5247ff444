"""Snapshots of every service's database, and their restore (no domain logic here: the
privacy service re-applies its deletion ledger after a restore, services/privacy/backup.py).

* SQLite: the online backup API (``sqlite3.Connection.backup``) copies a consistent image
  of each ``<service>.db`` while the services keep running (readers and writers are not
  blocked for longer than a page batch); WAL contents are included.
* PostgreSQL: ``pg_dump --format=custom`` of each service's schema ``hearth_<service>``
  (a consistent MVCC snapshot per schema), restored with ``pg_restore --clean``.

A snapshot is a directory ``<out>/hearth-<UTC timestamp>/`` with one file per service
and ``manifest.json`` (backend, time taken, SHA-256 of each file). Restore verifies the
checksums before touching anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.common import strict_json

SERVICES = ("clustering", "attribution", "privacy", "feedback")
MANIFEST = "manifest.json"
FORMAT = "hearth-backup/v1"


class BackupError(ValueError):
    """A snapshot that cannot be taken or restored (named file, checksum, tool)."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    backend: str
    taken_at: float
    files: dict[str, dict]     # service -> {"file": name, "sha256": hex, "bytes": n}
    # PostgreSQL: the version of the pg_dump that made it ("" before session 31): a
    # pg_restore of an older major cannot read its files.
    pg_dump: str = ""

    @classmethod
    def load(cls, path: Path) -> "Snapshot":
        """The snapshot at ``path``, its manifest checked before anything uses it: the
        manifest's service names become paths under the data directory and its file names
        paths under ``path``, and its checksums prove only that each file is the one the
        manifest names, not who wrote either. Until attack31 a manifest naming service
        ``/../../<dir>/x`` made `hearth restore` write ``<dir>/x.db`` and answer "restored"."""
        where = path / MANIFEST
        try:
            manifest = strict_json.loads_unambiguous((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise BackupError(f"{path}: not a Hearth snapshot ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackupError(f"{where}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
        if manifest.get("backend") not in ("sqlite", "postgres"):
            raise BackupError(f"{where}: backend must be sqlite or postgres, got {manifest.get('backend')!r}")
        taken_at = manifest.get("taken_at")
        if isinstance(taken_at, bool) or not isinstance(taken_at, (int, float)):
            raise BackupError(f"{where}: taken_at must be a number (seconds since the epoch)")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise BackupError(f"{where}: files must be an object (service -> its file)")
        for service, entry in files.items():
            if service not in SERVICES:
                raise BackupError(f"{where}: files names {service[:100]!r}, not one of {', '.join(SERVICES)}")
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("file"), str)):
                raise BackupError(f"{where}: files.{service} must be an object with file and sha256")
            name = entry["file"]
            if name in ("", ".", "..") or name != os.path.basename(name) or "\0" in name:
                raise BackupError(f"{where}: files.{service}.file must name a file in the snapshot's own "
                                  f"directory, got {name[:100]!r}")
        pg_dump = manifest.get("pg_dump", "")
        if not (isinstance(pg_dump, str) and (pg_dump == "" or re.fullmatch(r"\d{1,3}(\.\d{1,4})?", pg_dump))):
            raise BackupError(f"{where}: pg_dump must be a PostgreSQL version such as 16.2, got {str(pg_dump)[:100]!r}")
        return cls(path, manifest["backend"], float(taken_at), files, pg_dump)

    def verify(self) -> None:
        for service, entry in self.files.items():
            file = self.path / entry["file"]
            if file.is_symlink():   # its checksum would be the target's, wherever that is
                raise BackupError(f"{file}: a symbolic link, not a snapshot's file ({service})")
            if not file.is_file() or _sha256(file) != entry["sha256"]:
                raise BackupError(f"{file}: missing or corrupt (checksum of {service} does not match)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _private_dir(path: Path) -> Path:
    """``path`` made for its owner only (its files are personal data while they are
    written, before each is made 0600), whatever the caller's umask."""
    path.mkdir(parents=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _write_manifest(path: Path, backend: str, taken_at: float, files: dict[str, dict],
                    pg_dump: str = "") -> Snapshot:
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "backend": backend, "taken_at": taken_at,
                                             "taken_at_utc": _stamp(taken_at), "files": files,
                                             **({"pg_dump": pg_dump} if pg_dump else {})},
                                            indent=2, sort_keys=True))
    return Snapshot(path, backend, taken_at, files, pg_dump)


def backup_sqlite(data_dir: Path, out_dir: Path, services=SERVICES) -> Snapshot:
    """Online copy of every ``<service>.db`` under ``data_dir`` that exists."""
    taken_at = time.time()
    target = _private_dir(out_dir / f"hearth-{_stamp(taken_at)}")
    files: dict[str, dict] = {}
    for service in services:
        source = data_dir / f"{service}.db"
        if not source.exists():
            continue
        dest = target / f"{service}.db"
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst, pages=1024)
        finally:
            dst.close()
            src.close()
        os.chmod(dest, 0o600)   # personal data: readable by the owner only
        files[service] = {"file": dest.name, "sha256": _sha256(dest), "bytes": dest.stat().st_size}
    if not files:
        shutil.rmtree(target)
        raise BackupError(f"{data_dir}: no service database found (<service>.db)")
    return _write_manifest(target, "sqlite", taken_at, files)


# SQLite's unix VFS: every connection to a WAL database holds a read lock on this byte of
# its -shm file (the "dead man switch", UNIX_SHM_DMS in os_unix.c) for as long as it is open,
# whichever process it is in.
_SHM_DMS_BYTE = 128


def sqlite_databases_in_use(data_dir: Path, services=SERVICES) -> list[str]:
    """The services whose ``<service>.db`` under ``data_dir`` some process has open now."""
    busy = []
    for service in services:
        try:
            fd = os.open(data_dir / f"{service}.db-shm", os.O_RDWR)
        except FileNotFoundError:   # removed by the last connection's close: nobody has it open
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE)
        except OSError:
            busy.append(service)
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_BYTE)
        finally:
            os.close(fd)
    return busy


def restore_sqlite(snapshot: Snapshot, data_dir: Path) -> list[str]:
    """Replace each service's database by the snapshot's copy (the services must be
    stopped). The old file's -wal/-shm are removed with it, or SQLite would replay them.

    Refused while a process has one of them open (attack26): a running service keeps
    reading and writing the file it opened, now unlinked, and its -wal is removed under
    it, so everything it acknowledged after the restore — and the restore's re-applied
    deletions, until it restarts — was lost at its next start, while the restore
    answered 0."""
    snapshot.verify()
    busy = sqlite_databases_in_use(data_dir, sorted(snapshot.files))
    if busy:
        raise BackupError(f"{', '.join(busy)}: the database under {data_dir} is open (a service is running "
                          "on it): stop every service first; a running service would go on with the replaced "
                          "file and lose what it writes when it restarts")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    restored = []
    for service, entry in sorted(snapshot.files.items()):
        dest = data_dir / f"{service}.db"
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{dest}{suffix}").unlink(missing_ok=True)
        tmp = data_dir / f".{service}.db.restoring"
        # Created anew, never through what is there: copyfile follows a link, and one
        # planted at this name made the restore overwrite its target (attack31).
        tmp.unlink(missing_ok=True)
        with open(snapshot.path / entry["file"], "rb") as src, \
                open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)   # atomic: a crash leaves the old or the new file, never half
        restored.append(service)
    return restored


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise BackupError(f"{name} is required for PostgreSQL backups (package postgresql-client)")
    return found


def _libpq_call(dsn: str, variable: str = "HEARTH_POSTGRES_DSN") -> tuple[str, dict[str, str]]:
    """``dsn`` without its password, and an environment carrying it (PGPASSWORD) for the
    client tool: a process's arguments are readable by every user of the machine (``ps``,
    /proc/<pid>/cmdline) while it runs, its environment by its owner only. Until review28
    pg_dump and pg_restore got the whole DSN as an argument, password included."""
    from psycopg.conninfo import make_conninfo

    from services.common.storage.dsn import parse_dsn

    try:
        parts = parse_dsn(dsn, variable)
    except ValueError as exc:
        raise BackupError(str(exc)) from None
    password = parts.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **parts), env


# What a newer server needs: the image's client is Debian bookworm's 15 (deploy/Dockerfile).
NEWER_CLIENT_HINT = ("the image (deploy/Dockerfile) carries Debian bookworm's PostgreSQL 15 client: build it on a "
                     "base whose client is at least the server's major, or run this where such a one is first on "
                     "PATH (docs/operations.md \"Backups and restore\")")


def _tool_version(tool: str) -> tuple[int, str]:
    """A PostgreSQL client tool's major and version (``pg_dump (PostgreSQL) 15.18 (Debian…)``)."""
    done = subprocess.run([tool, "--version"], capture_output=True, text=True)
    found = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", done.stdout)
    if done.returncode != 0 or not found:
        raise BackupError(f"{tool} --version answered {(done.stdout or done.stderr).strip()[:200]!r}: not a "
                          "PostgreSQL client tool")
    return int(found.group(1)), found.group(1) + (found.group(2) or "")


def _dump_can_read_servers(tool: str, dsns: Mapping[str, str]) -> str:
    """``tool``'s (pg_dump's) version, once every server of ``dsns`` (variable -> DSN) is
    checked to be of its major or older: pg_dump refuses a newer server's ("aborting
    because of server version mismatch") — after the snapshot's directory was made and
    the dumps before it written, which stayed behind, never pruned (no manifest)."""
    import psycopg

    major, version = _tool_version(tool)
    for variable, dsn in dsns.items():
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                server = conn.info.server_version
        except psycopg.Error as exc:   # its message names host and port, never the password
            raise BackupError(f"{variable}: {str(exc).strip()}") from None
        if server // 10000 > major:
            raise BackupError(f"{variable}'s server is PostgreSQL {server // 10000}.{server % 10000}, newer than "
                              f"pg_dump {version} ({tool}), which refuses to dump it: {NEWER_CLIENT_HINT}; nothing "
                              "was written")
    return version


def backup_postgres(dsn: str, out_dir: Path, services=SERVICES, dsns: Mapping[str, str] | None = None) -> Snapshot:
    """``dsns``: a service's own DSN, which dumps its schema as the schema's owner (a
    login per service, `hearth db provision-roles`); ``dsn`` for the others. A dump that
    fails leaves no snapshot directory behind (its dumps of other schemas with it)."""
    taken_at = time.time()
    tool = _pg_tool("pg_dump")
    calls = {service: (dsns[service], f"HEARTH_POSTGRES_DSN_{service.upper()}") if service in (dsns or {})
             else (dsn, "HEARTH_POSTGRES_DSN") for service in services}
    version = _dump_can_read_servers(tool, {variable: own for own, variable in calls.values()})
    target = _private_dir(out_dir / f"hearth-{_stamp(taken_at)}")
    files: dict[str, dict] = {}
    try:
        for service in services:
            dest = target / f"{service}.pgdump"
            conninfo, env = _libpq_call(*calls[service])
            done = subprocess.run([tool, "--format=custom", f"--schema=hearth_{service}",
                                   "--no-owner", f"--file={dest}", conninfo],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise BackupError(f"pg_dump of hearth_{service} failed (nothing was kept): "
                                  f"{done.stderr.strip()[:500]}")
            os.chmod(dest, 0o600)
            files[service] = {"file": dest.name, "sha256": _sha256(dest), "bytes": dest.stat().st_size}
        return _write_manifest(target, "postgres", taken_at, files, pg_dump=version)
    except BaseException:
        # Without a manifest `--keep` never prunes it: personal data that no erasure's
        # "leaves the backups within N periods" would ever reach.
        shutil.rmtree(target, ignore_errors=True)
        raise


def postgres_sessions_in_use(dsn: str, logins: list[str]) -> list[str]:
    """Who is connected to ``dsn``'s database now under one of ``logins`` (the services'),
    this check's own session aside: one "<login> (<n> session(s) from <addresses>)" each."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT usename, count(*), string_agg(DISTINCT coalesce(host(client_addr), 'local'), ', ') "
                "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND usename = ANY(%s) GROUP BY usename ORDER BY usename", (list(logins),)).fetchall()
    except psycopg.Error as exc:   # its message names host and port, never the password
        raise BackupError(f"HEARTH_POSTGRES_DSN: {str(exc).strip()}") from None
    return [f"{login} ({n} session{'s' if n != 1 else ''} from {hosts})" for login, n, hosts in rows]


def restore_postgres(snapshot: Snapshot, dsn: str, dsns: Mapping[str, str] | None = None) -> list[str]:
    """Each schema of ``snapshot`` back. ``dsns``: a service's own DSN (a login per
    service, `hearth db provision-roles`, which must have run: the roles exist), whose
    schema is restored over that login (``_restore_as_owner``); ``dsn`` for the others."""
    snapshot.verify()
    restore_tools_can_read(snapshot)
    restored = []
    conninfo, env = _libpq_call(dsn)
    for service, entry in sorted(snapshot.files.items()):
        file = snapshot.path / entry["file"]
        if service in (dsns or {}):
            _restore_as_owner(file, service, dsn, dsns[service])
            restored.append(service)
            continue
        done = subprocess.run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner",
                               "--single-transaction", f"--dbname={conninfo}", str(file)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise BackupError(f"pg_restore of hearth_{service} failed: {done.stderr.strip()[:500]}")
        restored.append(service)
    return restored


def restore_tools_can_read(snapshot: Snapshot) -> None:
    """pg_restore reads no archive of a newer pg_dump ("unsupported version … in file
    header"): refused before anything is changed, naming both."""
    if not snapshot.pg_dump:      # taken before session 31: not recorded
        return
    tool = _pg_tool("pg_restore")
    major, version = _tool_version(tool)
    if int(snapshot.pg_dump.split(".")[0]) > major:
        raise BackupError(f"{snapshot.path} was made by pg_dump {snapshot.pg_dump}, which pg_restore {version} "
                          f"({tool}) cannot read: {NEWER_CLIENT_HINT}; nothing was changed")


def _restore_as_owner(file: Path, service: str, admin_dsn: str, own_dsn: str) -> None:
    """``file`` (a dump of ``hearth_<service>``) restored over the service's own login.

    A snapshot holds what the service's login wrote into its schema, functions included
    (a CHECK constraint's, a trigger's, an index expression's); run by the admin, a
    superuser, those ran with its rights — a compromised service's login made itself a
    superuser at the next restore (attack29). So the admin only sets the schema aside
    (renamed ``<schema>_before_restore``) and creates it empty, owned by the service's
    role; everything in the dump runs as that role, which may do nothing there it could
    not do before. Two logins, so not one transaction: if pg_restore fails, the admin
    drops what it restored and puts the schema back as it was (until review29 it was left
    empty: privacy's lost the deletion ledger the re-run needs); once it succeeds, the
    old schema is dropped. A restore killed in between leaves the schema set aside, which
    the next restore puts back before it reads anything (``put_back_set_aside``)."""
    import psycopg
    from psycopg import sql

    from services.common.storage.dsn import parse_dsn

    variable = f"HEARTH_POSTGRES_DSN_{service.upper()}"
    try:
        role = parse_dsn(own_dsn, variable).get("user")
    except ValueError as exc:
        raise BackupError(str(exc)) from None
    if not role:
        raise BackupError(f"{variable}: names no user (the service's own role)")
    schema = f"hearth_{service}"
    tool = _pg_tool("pg_restore")
    listing = subprocess.run([tool, "--list", str(file)], capture_output=True, text=True)
    if listing.returncode != 0:
        raise BackupError(f"pg_restore --list of {file.name} failed: {listing.stderr.strip()[:500]}")
    # Every entry but the schema's own (the role may not create schemas; it exists already).
    entries = [line for line in listing.stdout.splitlines()
               if not re.match(rf"^\d+; \d+ \d+ SCHEMA - {re.escape(schema)} ", line)]
    with tempfile.NamedTemporaryFile("w", prefix=f".{schema}-", suffix=".list") as chosen:
        chosen.write("\n".join(entries) + "\n")
        chosen.flush()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            aside = _set_aside(schema)
            with conn.transaction():
                if _schema_exists(conn, aside):   # put_back_set_aside runs first: another restore at once
                    raise BackupError(f"schema {aside} exists: another restore is running, or one was "
                                      "interrupted — run `hearth restore` again once none runs (it puts it back)")
                existed = _schema_exists(conn, schema)
                if existed:
                    conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(schema),
                                                                               sql.Identifier(aside)))
                conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema),
                                                                              sql.Identifier(role)))
            try:
                conninfo, env = _libpq_call(own_dsn, variable)
                done = subprocess.run([tool, "--no-owner", "--no-privileges", "--single-transaction",
                                       f"--use-list={chosen.name}", f"--dbname={conninfo}", str(file)],
                                      capture_output=True, text=True, env=env)
                failure = "" if done.returncode == 0 else done.stderr.strip()[:500]
            except BackupError as exc:
                failure = str(exc)
            with conn.transaction():
                if failure:   # put back as it was
                    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
                    if existed:
                        conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(aside),
                                                                                   sql.Identifier(schema)))
                elif existed:
                    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(aside)))
    if failure:
        raise BackupError(f"pg_restore of {schema} as {role} failed ({schema} is left as it was; the snapshot is "
                          f"unchanged: run the restore again): {failure}")


def _set_aside(schema: str) -> str:
    return f"{schema}_before_restore"


def _schema_exists(conn, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def put_back_set_aside(admin_dsn: str, services=SERVICES) -> list[str]:
    """Schemas a restore killed mid-way left set aside (``_restore_as_owner``), put back
    as they were before it — what it restored meanwhile dropped — so that a restore run
    again reads the deletion ledger of the database it replaces, not of a half-restored
    one. Returns the schemas put back."""
    import psycopg
    from psycopg import sql

    put_back = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn, conn.transaction():
        for service in services:
            schema = f"hearth_{service}"
            if _schema_exists(conn, _set_aside(schema)):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
                conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(_set_aside(schema)),
                                                                           sql.Identifier(schema)))
                put_back.append(schema)
    return put_back


def prune(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest snapshots under ``out_dir`` (a deleted
    household's data also leaves the backups once they expire)."""
    # A link named like a snapshot is not one `hearth backup` wrote: until attack31 it was
    # counted, and shutil.rmtree refused it with a traceback after the new snapshot was
    # taken, so the job failed and no older snapshot was ever pruned again.
    snapshots = sorted(p for p in out_dir.glob("hearth-*") if not p.is_symlink() and (p / MANIFEST).is_file())
    removed = snapshots[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed
