"""Real backing servers for the tests: a throwaway PostgreSQL cluster and redis-server,
started once per test session on free ports (tests/helpers/servers.py). A missing binary
FAILS the tests that need it (never skips): CI must not pass while a backend goes untested."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

import grpc
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from services.common import config
from services.common.identity import Principal, Role
from services.testing.inprocess import serve_service
from tests.helpers.queue_worker import WORKER_PLUGIN, Backstop
from tests.helpers.servers import bundled_postgres16, running_postgres, running_redis
from tests.helpers.waiting import cpu_slowdown

ADMIN = Principal("test-admin", Role.ADMIN)

# Hypothesis's own defaults made every @given without ``deadline=None`` a timed test: an
# example slower than 200 ms failed it (DeadlineExceeded, or Flaky when the replay was
# fast), which on this project's machines (2 cores at load 10-25) is a measure of the load,
# not of the code — one failed that way under load in session 35. The run's profile, loaded
# for every run of the suite (this file is the root conftest): no deadline (speed is shown by
# bench/, never by a test: rule 2); the one health check that also measures time
# (too_slow: generating the examples took over a second) off, the others kept; and a
# failure prints its ``@reproduce_failure`` blob, so a CI failure can be replayed exactly.
# Example counts stay as each test sets them (max_examples is not touched).
# tests/unit/test_hypothesis_profile.py fails if this profile is not the one in force.
hypothesis_settings.register_profile("hearth-tests", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                                     print_blob=True)
hypothesis_settings.load_profile("hearth-tests")

# Test data carries fixed past dates (2026-01-01 ...). The privacy service's scheduled retention
# purge (90 days; requested at start-up and at every hour boundary) erases them from a running
# mesh: at start-up it races a test's first writes, and a test that crosses the hour loses its
# data half-way (seen as rare failures of feedback and rollout tests). Meshes and in-process
# servers started by tests therefore run without the schedule; retention itself is tested in
# tests/integration/test_deletion_service.py. A test that wants the schedule sets the variable.
os.environ.setdefault("HEARTH_RETENTION_CHECK_S", "0")

# Every process of a test mesh starts at once, and the slowest (clustering: scikit-learn)
# is up seconds after the rest. Their channels to it back off 1 s x1.6 up to 5 s between
# reconnect attempts, and peers are re-checked every 2 s, so a mesh used to be healthy 3-6 s
# after its last process listened (measured 4.4 s of an 18 s start; about 30 meshes per
# run, and every restart a test makes). The same settings, shorter: retried every 0.25 s at
# most, checked every 0.5 s. What the tests assert does not depend on either period.
os.environ.setdefault("HEARTH_GRPC_RECONNECT_MAX_S", "0.25")
os.environ.setdefault("HEARTH_HEALTH_CHECK_INTERVAL_S", "0.5")
# A consent answer is reused for HEARTH_CONSENT_CACHE_S (5 s in production): the tests that
# withdraw or give consent back and wait until every service enforces it (the bound they
# assert is this setting) waited up to 5 s each; here 1 s.
os.environ.setdefault("HEARTH_CONSENT_CACHE_S", "1")
# Every clustering Erase waits HEARTH_ERASURE_FENCE_S (3 s in production) after its deletion
# and refit before it answers, so that no other replica still answers with the erased model
# (docs/security.md, "Other replicas after an erasure"); each replica reads the fence every
# quarter of it. Every mesh a test starts paid 3 s per Erase: the real processes' (7 Erases
# in the e2e package mesh's run, more in the security mesh and the meshes of their own) and
# the in-process ones' (services/testing/inprocess.py loads the settings from this
# environment: each of test_deletion_service.py's deletions took ~3 s; session 31). Here
# 0.5 s, as the deletion and remnants meshes already ran. What the tests assert does not depend on the
# length: the fence's own tests set theirs (tests/integration/test_erasure_fence.py; the
# replica test in tests/e2e/test_deletion_e2e.py runs at 0.5 s). An older commit's tree
# started by a test does not get it (services/testing/mesh.py ``Mesh.env``).
os.environ.setdefault("HEARTH_ERASURE_FENCE_S", "0.5")
# Every process allocates its audit reserve file when it starts (4 MiB in production,
# HEARTH_AUDIT_RESERVE_MB): about 30 meshes of 5 processes a run, in pytest's directories
# on tmpfs (memory), kept for three runs, would hold ~1.8 GB of it. The tests' processes
# get 256 KiB (~600 records); the tests of the file pass their own size.
os.environ.setdefault("HEARTH_AUDIT_RESERVE_MB", "0.25")

# The processes a run starts (five a mesh, every restart, the CLI runs) import the project's
# modules from source. Where PYTHONDONTWRITEBYTECODE is set (so nothing is written into the
# checkout) no .pyc is ever kept, and each of them compiled its ~70-130 modules again: about
# 0.06-0.08 CPU-s of a service's 0.35-0.55 s of imports, 0.3-0.5 CPU-s a mesh
# (docs/benchmarks.md, "Session 23"). They keep their bytecode in a directory of this run
# instead (PYTHONPYCACHEPREFIX: still nothing in the checkout), removed when the run ends.
# The test process itself is unchanged (it imports each module once).
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _BYTECODE_DIR = tempfile.mkdtemp(prefix="hearth-test-bytecode-")
    os.environ["PYTHONPYCACHEPREFIX"] = _BYTECODE_DIR
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    atexit.register(shutil.rmtree, _BYTECODE_DIR, True)


def _tmpfs(path: str, free_bytes: int) -> bool:
    """Whether ``path`` is a mount point of a tmpfs we may write with ``free_bytes`` free."""
    try:
        mounts = [line.split() for line in open("/proc/mounts", encoding="utf-8")]
        stat = os.statvfs(path)
    except OSError:
        return False
    return (any(m[1] == path and m[2] == "tmpfs" for m in mounts if len(m) > 2) and os.access(path, os.W_OK)
            and stat.f_bavail * stat.f_frsize >= free_bytes)


# pytest's tmp_path directories (every SQLite database of the in-process servers, every
# mesh's data directory, logs and outboxes) on tmpfs where the machine has one: the services
# commit SQLite with synchronous=FULL, an fsync per commit, 1.7 ms each on this machine's
# disk (ext4 mounted with discard) and ~0.01 ms on tmpfs; thousands of commits a run
# (docs/benchmarks.md, "Session 23"). Nothing a test asserts depends on the disk: no test can
# cut the power, and a killed process loses no acknowledged write on either. pytest keeps the
# directories of its last three runs (tmp_path_retention_count), a few tens of MB each. The
# PostgreSQL clusters go there too, named after the run's pid: a run killed before its
# teardown leaves its cluster behind, and the next run removes it (tests/helpers/servers.py
# cluster_base; session 24). PYTEST_DEBUG_TEMPROOT or --basetemp set by the caller win.
TMP_PATH_ON_TMPFS = "PYTEST_DEBUG_TEMPROOT" not in os.environ and _tmpfs("/dev/shm", 2 * 1024**3)
if TMP_PATH_ON_TMPFS:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = "/dev/shm"


def pytest_configure(config):
    # An exception in a test's thread fails it, as pyproject.toml makes an unraisable one do:
    # the one seen (session 26's CI: psycopg "connection socket closed" in a timer thread of
    # test_postgres_deadlines.py) was a race in the test, printed as a warning and passed.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning")


_backstop: Backstop | None = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test hung where pytest-timeout's SIGALRM cannot end it (a call in C that never
    returns) ends the process past that limit with every thread's traceback
    (tests/helpers/queue_worker.py ``Backstop``) instead of holding the run for ever. `make
    test`'s workers arm it themselves (their runner then names the test); here every other
    run of the suite (`pytest -q tests/unit`; docs28 saw tests/unit stall at load ~24 when
    `make test-unit` was such a run)."""
    global _backstop
    if item.config.pluginmanager.has_plugin(WORKER_PLUGIN):
        return (yield)
    if _backstop is None:
        _backstop = Backstop(item.config)
    with _backstop.armed(item):
        return (yield)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's limit (300 s, or a test's own mark) is the time a test may take on
    an idle machine; each test gets it times the machine's slowdown measured as it starts
    (``cpu_slowdown``: the load average over the cores, 1-8). Returning None leaves the
    plugin's own timer as it is."""
    import pytest_timeout

    slowdown = cpu_slowdown()
    if not settings.timeout or slowdown <= 1.0:
        return None
    return pytest_timeout.pytest_timeout_set_timer(item, settings._replace(timeout=settings.timeout * slowdown))


# The umask this run started with. A test that runs `hearth backup`/`restore` or a bootstrap in
# process (``cli.main``) calls ``config.keep_files_private()``, which leaves the process's umask
# at 077 for every later test of that worker: review30 saw the bundled PostgreSQL 16's copy made
# unreadable to the postgres user by it, in a fresh clone only (R21). Each test starts with it.
RUN_UMASK = os.umask(0o022)
os.umask(RUN_UMASK)


@pytest.fixture(autouse=True)
def _the_runs_umask():
    """Every test starts with the run's umask, whatever an earlier test of this worker set."""
    os.umask(RUN_UMASK)
    yield


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL cluster (``.dsn``, ``.data_dir``), tied to this process:
    the kernel kills the postmaster if pytest dies, so a crashed run leaves no server."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server):
    return postgres_server.dsn


@pytest.fixture(scope="session")
def postgres16_dsn():
    """A second cluster, PostgreSQL 16 (``bundled_postgres16``: the pinned wheel's binaries;
    the machine's is 15), started only by the tests that ask for it; it must say 16."""
    import psycopg

    with running_postgres(bin_dir=bundled_postgres16()) as pg:
        with psycopg.connect(pg.dsn) as conn:
            version = conn.info.server_version
        if not 160000 <= version < 170000:
            pytest.fail(f"the bundled PostgreSQL 16 server says version {version}")
        yield pg.dsn


@pytest.fixture(params=["machine", "16"])
def each_postgres_dsn(request):
    """The machine's PostgreSQL (15 here) and the bundled 16, one test run on each: for
    what the two majors do differently (role memberships: one grant per grantor from 16)."""
    return request.getfixturevalue("postgres_dsn" if request.param == "machine" else "postgres16_dsn")


@pytest.fixture(scope="session")
def redis_url():
    with running_redis() as server:
        yield server.url


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
        settings = config.load(config.service_settings_class(name), service_name=name, data_dir=tmp_path / name,
                               **overrides)
        running, servicers = serve_service(name, settings, overrides.get("grpc_port") or 0)
        running.servicers = [servicer for _, servicer, _ in servicers]   # for tests that reach in
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, channel

    yield start
    for running, channel in started:
        channel.close()
        running.stop(0)
