"""Throwaway PostgreSQL clusters and redis-servers for the tests (the session fixtures
``postgres_dsn``/``redis_url``, and the raw-byte remnant tests, which need their own data
directory and settings).

The servers are services/testing/servers.py's (shared with the outage tests and
bench.verify): tied to the test process, so the kernel kills the postmaster if pytest dies
(its backends then exit on postmaster death), as it kills redis-server, and a crashed run
leaves no server behind. A missing binary FAILS (never skips): CI must not pass while a
backend goes untested."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.testing.servers import MissingServer, PostgresServer, RedisServer

# What the erasure path needs to remove WAL segments physically (docs/privacy.md §11),
# with full-page writes on as in production, so page images in the WAL are scanned too.
PURGEABLE_WAL = {"wal_recycle": "off", "full_page_writes": "on", "wal_keep_size": "0"}

TMPFS_TEMPROOT = "/dev/shm"      # tests/conftest.py: pytest's tmp_path root when it is a tmpfs
CLUSTER_PREFIX = "hearth-pg-"


def cluster_base() -> Path | None:
    """Where a test cluster goes: beside pytest's ``tmp_path`` directories when those are
    on tmpfs (tests/conftest.py sets PYTEST_DEBUG_TEMPROOT=/dev/shm), else tempfile's
    directory (None). On this machine's disk (ext4 mounted with ``discard``) removing the
    session's cluster (~23,500 files after a run) took 8-20 s at the end of every run, and
    initdb + start 6-7 s (docs/benchmarks.md, sessions 22 and 24). A run killed before its
    teardown leaves its cluster behind (its postmaster dies with it), and on tmpfs that
    would hold its RAM: the directory is named after the run's pid, and clusters of runs
    that no longer exist are removed here first."""
    root = os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if root != TMPFS_TEMPROOT:
        return None
    for stale in Path(root).glob(f"{CLUSTER_PREFIX}*-*"):
        pid = stale.name[len(CLUSTER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{CLUSTER_PREFIX}{os.getpid()}-", dir=root))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bundled_postgres16() -> Path:
    """The directory of a PostgreSQL 16 server's binaries: the ones in the ``pgserver``
    wheel (a pinned dev dependency, pyproject.toml; PostgreSQL 16.2, PostgreSQL licence,
    the wheel's own code Apache-2.0), inside the virtualenv, so ``make test`` reads nothing
    outside the repository. The machine's PostgreSQL is Debian bookworm's 15, and from 16 a
    role membership is one grant per grantor (``REVOKE … GRANTED BY``): that path of
    ``hearth db provision-roles`` runs on this one. Missing, the tests FAIL (never skip).
    Found without importing the package (its Python layer is not used)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        pytest.fail("pgserver (the PostgreSQL 16 test server, pyproject.toml's dev dependencies) is not "
                    "installed: `make venv` installs it, on CPython 3.11/3.12 and x86_64 Linux (its wheels'; "
                    "elsewhere give the tests another PostgreSQL 16) — the PostgreSQL 16 tests cannot be skipped")
    return runnable_by_postgres(Path(locations[0]) / "pginstall" / "bin")


_COPIES: dict[Path, Path] = {}


def runnable_by_postgres(bin_dir: Path) -> Path:
    """``bin_dir``, or a copy the ``postgres`` user can run. As root the servers run as that
    user (services/testing/servers.py), which must reach the binaries: inside a checkout
    under a directory only root may enter (a fresh clone's in a ``mktemp -d`` folder) it
    cannot, and initdb would fail. The wheel's package directory and its bundled libraries
    (``<package>.libs``, found through the binaries' RPATH ``$ORIGIN/../../../``) are then
    copied once per run into a temporary directory anyone may enter, removed at exit."""
    import atexit
    import subprocess

    from services.testing.servers import postgres_user

    if os.geteuid() != 0:
        return bin_dir
    if bin_dir in _COPIES:
        return _COPIES[bin_dir]
    try:
        ran = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                             **postgres_user()).returncode == 0
    except PermissionError:
        ran = False
    if ran:
        _COPIES[bin_dir] = bin_dir
        return bin_dir
    package = bin_dir.parent.parent                       # site-packages/pgserver
    copy_root = Path(tempfile.mkdtemp(prefix="hearth-pg-bin-"))
    copy_root.chmod(0o755)
    atexit.register(shutil.rmtree, copy_root, True)
    # Made here and opened up: under the umask 077 that `hearth backup`/`restore` run in this
    # process leave (config.keep_files_private), copytree would make it 0700 (review30).
    (copy_root / package.name).mkdir()
    (copy_root / package.name).chmod(0o755)
    shutil.copytree(package / bin_dir.parent.name, copy_root / package.name / bin_dir.parent.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy_root / libs.name, symlinks=True)
    _COPIES[bin_dir] = copy_root / package.name / bin_dir.parent.name / bin_dir.name
    return _COPIES[bin_dir]


@contextlib.contextmanager
def running_postgres(pg_hba: str | None = None, bin_dir: Path | None = None,
                     **settings: str) -> Iterator[PostgresServer]:
    """initdb + postgres on a free port (``.dsn``, ``.data_dir``); ``settings`` are
    ``-c name=value`` over the fast test defaults (fsync off, no full-page writes).
    ``pg_hba``: the cluster's pg_hba.conf instead of initdb's (which trusts every local
    login); it must keep trusting ``hearth`` on 127.0.0.1, the fixtures' superuser, which
    connects without a password (``.dsn``). ``bin_dir``: another server's binaries
    (``bundled_postgres16()``) than the machine's."""
    try:
        server = PostgresServer(cluster_base(), durable=False, settings=settings, bin_dir=bin_dir)
    except MissingServer as exc:
        pytest.fail(f"{exc} — the PostgreSQL storage tests cannot be skipped")
    try:
        server.init()
        if pg_hba is not None:
            # Rewritten in place: the file stays the postgres user's (we may run as root).
            with open(server.data_dir / "pg_hba.conf", "w") as hba:
                hba.write(pg_hba)
        yield server.start()
    finally:
        server.remove()   # PostgreSQL's fast shutdown, then the directory


def fresh_database(dsn: str, prefix: str = "mesh") -> str:
    """A new empty database in the cluster ``dsn`` points at, and a DSN naming it. A mesh
    keeps every service's schema (``hearth_<service>``) in one database, so two meshes on
    one database share them, and since session 25 privacy refuses to start beside data keys
    its KEK does not open (a second mesh's new development KEK opens none of the first's)."""
    import uuid

    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(dsn, dbname=name)


def inprocess_mesh_on(backend: str, request, tmp_path_factory, tag: str):
    """An in-process mesh (services/testing/inprocess.py) on ``backend``, "sqlite" or
    "postgres" (a fresh database of the session's server), for a module's parametrized
    mesh fixture; the caller stops it."""
    from services.testing import inprocess

    data = tmp_path_factory.mktemp(f"{tag}-{backend}")
    if backend == "sqlite":
        return inprocess.start(data)
    return inprocess.start(data, storage="postgres",
                           postgres_dsn=fresh_database(request.getfixturevalue("postgres_dsn"), tag))


def service_logins(database_dsn: str, tag: str) -> dict[str, str]:
    """A PostgreSQL login per service on the database ``database_dsn`` names (``hearth db
    provision-roles``, as deployed: docs/operations.md "Database roles"), and each
    service's DSN. Roles belong to the cluster, so their names carry ``tag`` (a few
    letters unique per caller and run). The fixtures' own login is a superuser, for which
    every privilege check passes: a mesh started with these DSNs runs each service with
    only what production grants it."""
    from psycopg.conninfo import make_conninfo

    from services.common.storage.roles import SERVICES, provision_roles

    dsns = {s: make_conninfo(database_dsn, user=f"{tag}_{s}", password=f"pw-{tag}-{s}") for s in SERVICES}
    provision_roles(database_dsn, dsns)
    return dsns


def data_dir_files(pg: PostgresServer, *, walks: int = 5) -> dict[str, bytes]:
    """Every regular file of the data directory (heap, indexes, TOAST, catalogs incl.
    ``pg_statistic``, ``pg_wal``), by path relative to it, as one consistent picture.

    A checkpoint that runs while we walk (a purge's, the services' background work) can
    flush a page into ``base/`` after we read that file and remove the WAL segment that
    held the row before we reach ``pg_wal/`` (sorted after ``base/``): a value would then
    be in neither. Such a walk is seen by a listed file that vanished, and is taken again
    (session 27: the remnants test's "the scan sees every one of them now" missed one
    sealed value on PostgreSQL, all the others in one WAL segment)."""
    for _ in range(walks):
        out, vanished = {}, False
        for path in sorted(pg.data_dir.rglob("*")):
            if path.is_file():
                try:
                    out[str(path.relative_to(pg.data_dir))] = path.read_bytes()
                except FileNotFoundError:
                    vanished = True
            elif not path.exists():       # listed, gone before we looked at it
                vanished = True
        if not vanished:
            return out
    return out


def relation_names(dsn: str) -> dict[str, str]:
    """``base/<db oid>/<filenode>`` -> ``schema.relation`` for the database of ``dsn``
    (forks and segments, ``_fsm``, ``.1``, map to the same name), so a raw hit can be
    attributed to the service that owns the table. TOAST tables and indexes are named by
    the table they belong to."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT 'base/' || d.oid || '/' || pg_relation_filenode(c.oid), n.nspname || '.' || "
            "COALESCE(owner.relname, t.relname, c.relname) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_database d ON d.datname = current_database() "
            "LEFT JOIN pg_index i ON i.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = i.indrelid "
            "LEFT JOIN pg_class owner ON owner.reltoastrelid = COALESCE(t.oid, c.oid) "
            "WHERE pg_relation_filenode(c.oid) IS NOT NULL").fetchall()
    return dict(rows)


@contextlib.contextmanager
def running_redis(snapshot_dir: Path | None = None, **settings: str | tuple[str, ...]) -> Iterator[RedisServer]:
    """redis-server on a free port (``.url``), no persistence; with ``snapshot_dir`` it
    writes an uncompressed ``dump.rdb`` there on ``SAVE`` (``.dir``); ``settings`` are
    ``--name value`` over those defaults (``appendonly="yes"``: an AOF there too)."""
    try:
        server = RedisServer(snapshot_dir, settings)
    except MissingServer as exc:
        pytest.fail(f"{exc} — the Redis tests cannot be skipped")
    try:
        yield server.start()
    finally:
        server.stop()
