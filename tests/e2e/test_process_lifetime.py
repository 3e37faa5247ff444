"""Processes started by tests die with the test run, even when pytest is killed.

A real pytest run (a subprocess) starts the mesh (four services and the gateway as
processes), PostgreSQL and redis-server through the same fixtures the suite uses, records
every process it has started by then, and waits. We kill it with SIGKILL, so no finalizer,
atexit handler or signal handler of it runs, and then every one of those processes
(postmaster and its backends included) must be gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.processes import alive, descendants

ROOT = Path(__file__).resolve().parents[2]

INNER_TEST = '''
import json, os, time
from pathlib import Path

import psycopg
import redis

from services.testing.mesh import Mesh, write_api_key
from tests.helpers.processes import descendants


def test_start_everything_then_wait(tmp_path, postgres_dsn, redis_url):
    with psycopg.connect(postgres_dsn) as conn:   # a live backend process too
        conn.execute("SELECT 1")
        redis.Redis.from_url(redis_url).ping()
        mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
        write_api_key(mesh.data_dir / "gateway-keys.json", "lifetime-admin", "admin")
        mesh.start_healthy(180)
        Path(os.environ["PIDS_FILE"] + ".tmp").write_text(json.dumps({
            "mesh": [p.pid for p in mesh.processes.values()],
            "all": descendants(os.getpid()),
        }))
        os.rename(os.environ["PIDS_FILE"] + ".tmp", os.environ["PIDS_FILE"])
        time.sleep(600)
'''


def test_children_of_a_killed_pytest_die_with_it(tmp_path):
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST)
    pids_file = tmp_path / "pids.json"
    env = dict(os.environ, PIDS_FILE=str(pids_file), PYTHONPATH=str(ROOT))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-o", "timeout=0", str(inner)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not pids_file.exists():
            assert run.poll() is None, run.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the inner run did not start everything in time"
            time.sleep(0.2)
        pids = json.loads(pids_file.read_text())
        assert len(pids["mesh"]) == 5
        # The mesh, the postmaster with its backends and auxiliary processes, redis-server.
        assert set(pids["mesh"]) <= set(pids["all"]) and len(pids["all"]) >= 5 + 1 + 3 + 1
        assert all(alive(pid) for pid in pids["mesh"])

        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
        deadline = time.monotonic() + 30
        while (survivors := [pid for pid in pids["all"] if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not survivors, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in survivors}
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in json.loads(pids_file.read_text())["all"] if pids_file.exists() else []:
            if alive(pid):  # never leave anything behind, even when the assertion failed
                os.kill(pid, signal.SIGKILL)


VERIFY_OWNER = '''
import json, os, sys, time
from pathlib import Path

from bench.verify import PostgresServer, RedisServer

# As `make verify --backend postgres` starts them (production settings, fsync on).
pg = PostgresServer(Path(sys.argv[1]), max_connections=300).init().start()
rd = RedisServer().start()
Path(sys.argv[2] + ".tmp").write_text(json.dumps({"postmaster": pg.proc.pid, "redis": rd.proc.pid}))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(600)
'''


def test_the_postgresql_and_redis_of_a_killed_verify_run_die_with_it(tmp_path):
    """bench.verify used to start PostgreSQL through runuser, which clears the death
    signal: a killed verify run left the server running. It now uses the same tied
    servers as the tests (services/testing/servers.py)."""
    pids_file = tmp_path / "pids.json"
    base = Path(tempfile.mkdtemp(prefix="hearth-pg-verify-"))   # the postgres user can enter it
    owner = subprocess.Popen([sys.executable, "-c", VERIFY_OWNER, str(base), str(pids_file)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids: dict = {}
    try:
        deadline = time.monotonic() + 180
        while not pids_file.exists():
            assert owner.poll() is None, owner.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "PostgreSQL and Redis did not start in time"
            time.sleep(0.2)
        pids = json.loads(pids_file.read_text())
        servers = [pids["postmaster"], pids["redis"], *descendants(pids["postmaster"])]
        assert len(servers) >= 2 + 3 and all(alive(p) for p in servers)   # + checkpointer, walwriter, ...

        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 60
        while (survivors := [p for p in servers if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not survivors, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in survivors}
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in [pids.get("postmaster"), pids.get("redis")]:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
