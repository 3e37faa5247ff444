"""Real backing servers for the tests: a throwaway PostgreSQL cluster and redis-server,
started once per test session on free ports. A missing binary FAILS the tests that need
it (never skips): CI must not pass while a backend goes untested."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from services.common.child_process import spawn_tied, stop_group
from services.common.identity import Principal, Role

ADMIN = Principal("test-admin", Role.ADMIN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def _postgres_user() -> dict:
    # initdb and postgres refuse to run as root; CI runs as root (scripts/provision.sh
    # creates the user).
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


@pytest.fixture(scope="session")
def postgres_dsn():
    initdb, postgres = _find_pg_bin("initdb"), _find_pg_bin("postgres")
    if not initdb or not postgres:
        pytest.fail("PostgreSQL binaries (initdb, postgres) not found: install postgresql "
                    "(scripts/provision.sh does) — the PostgreSQL storage tests cannot be skipped")
    base = Path(tempfile.mkdtemp(prefix="hearth-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    as_user = _postgres_user()
    subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "hearth", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True, cwd=base, **as_user)
    port = _free_port()
    # Tied to this process: the kernel kills the postmaster if pytest dies (its backends
    # then exit on postmaster death), so a crashed run leaves no server behind.
    proc = spawn_tied(
        [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(base),
         "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=base, **as_user)
    dsn = f"postgresql://hearth@127.0.0.1:{port}/postgres"
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=1).close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.1)
    yield dsn
    stop_group(proc, sig=signal.SIGINT)  # PostgreSQL's fast shutdown
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server not found: install it (apt-get install redis-server; scripts/provision.sh does) "
                    "— the Redis tests cannot be skipped")
    port = _free_port()
    proc = spawn_tied([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    stop_group(proc)


_schema_counter = 0


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """A fresh Database per test on each SQL backend (PostgreSQL: a fresh schema)."""
    from services.common.storage.sql import PostgresDatabase, SqliteDatabase

    global _schema_counter
    if request.param == "sqlite":
        db = SqliteDatabase(tmp_path / "test.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        _schema_counter += 1
        db = PostgresDatabase(dsn, f"t{os.getpid()}_{_schema_counter}", max_size=4)
    yield db
    db.close()


@pytest.fixture(params=["memory", "redis"])
def cache(request):
    from services.common.storage.cache import MemoryCache, RedisCache

    if request.param == "memory":
        yield MemoryCache(f"test{os.getpid()}")
    else:
        c = RedisCache(request.getfixturevalue("redis_url"), f"test{time.monotonic_ns()}")
        yield c
        c.delete_prefix("")


# In-process servers on port 0 built by the same code path as production (build_server
# + each service's build()), for contract and integration tests.


@pytest.fixture
def start_service(tmp_path):
    started = []

    def start(name: str, **overrides):
        from services.common import config
        from services.common.server import build_server

        settings = config.load(service_name=name, data_dir=tmp_path / name, **overrides)
        module = importlib.import_module(f"services.{name}.__main__")
        servicers, closers = module.build(settings)

        def register(server):
            for add, servicer, _ in servicers:
                add(servicer, server)
            return [full for _, _, full in servicers]

        running = build_server(name, register, port=overrides.get("grpc_port") or 0)
        running.on_stop.extend(closers)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, channel

    yield start
    for running, channel in started:
        channel.close()
        running.stop(0)
