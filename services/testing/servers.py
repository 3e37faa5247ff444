"""Throwaway PostgreSQL clusters and redis-server processes for the tests and `make verify`.

One implementation for every harness that needs a real backend it can start, stop, kill
and restart on the same port and data (the test fixtures, the outage tests, the
failure-recovery runs of `bench.verify`). Each server is started with ``spawn_tied``:
the kernel kills it when the process that started it dies (PR_SET_PDEATHSIG), so a
killed test run or verify run leaves no server behind. PostgreSQL refuses to run as
root; as root the server is started as the ``postgres`` user (scripts/provision.sh
creates it) by Popen's own change of user, after which the death signal is set (a
``runuser`` wrapper would clear it: the kernel drops it on a change of credentials).

A missing binary raises ``MissingServer``; the test fixtures turn it into a failure
(never a skip), verify into an exit with the message.

Each server's port is drawn (``free_port``), and another process on the machine (a second
test suite) can bind it first: the first ``start`` then reads the server's own log
(``server.log`` beside its data), sees the bind failure and starts it again on a port drawn
anew (services/testing/ports.py). A server counts as started only once it listens on its
port itself: a second suite's PostgreSQL or Redis on that port would answer too. A restart
keeps its port (its clients hold the address).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from services.common.child_process import spawn_tied, stop_group
from services.testing.ports import check_exit, free_port, listened_by, start_on_free_ports


class MissingServer(RuntimeError):
    """The server's binary is not installed."""


def pg_binary(name: str, bin_dir: Path | None = None) -> str | None:
    """A PostgreSQL binary in ``bin_dir`` if given (another major's, e.g. the bundled 16 of
    tests/helpers/servers.py), else on PATH or in Debian's versioned directory (newest first)."""
    if bin_dir is not None:
        candidate = Path(bin_dir) / name
        return str(candidate) if os.access(candidate, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def postgres_user() -> dict:
    """Popen keywords that run PostgreSQL's binaries as ``postgres`` when we are root."""
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


class PostgresServer:
    """A PostgreSQL cluster in ``base`` (a fresh temporary directory by default).

    ``durable=False`` is for test fixtures (no fsync, no full-page writes: a crash loses
    the cluster, which a test discards anyway); ``make verify`` keeps the production
    defaults, since it measures what a deployment would see. ``bin_dir``: the directory of
    the ``initdb`` and ``postgres`` to run (default: the machine's, ``pg_binary``)."""

    def __init__(self, base: Path | None = None, *, durable: bool = True, max_connections: int = 200,
                 settings: Mapping[str, str] | None = None, bin_dir: Path | None = None) -> None:
        self.initdb, self.postgres = pg_binary("initdb", bin_dir), pg_binary("postgres", bin_dir)
        if not self.initdb or not self.postgres:
            raise MissingServer(f"PostgreSQL binaries (initdb, postgres) not found in {bin_dir}" if bin_dir else
                                "PostgreSQL binaries (initdb, postgres) not found: install postgresql "
                                "(scripts/provision.sh does)")
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="hearth-pg-"))
        self.data_dir = self.base / "data"
        self.durable = durable
        self.settings = {"max_connections": str(max_connections),
                         **({} if durable else {"fsync": "off", "full_page_writes": "off"}), **(settings or {})}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.started = False   # once: the port is final (a restart keeps it)

    @property
    def dsn(self) -> str:
        return f"postgresql://hearth@127.0.0.1:{self.port}/postgres"

    def init(self) -> "PostgresServer":
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        run = subprocess.run([self.initdb, "-D", str(self.data_dir), "-A", "trust", "-U", "hearth", "-E", "UTF8",
                              *([] if self.durable else ["--no-sync"])],
                             capture_output=True, text=True, cwd=self.base, **postgres_user())
        if run.returncode != 0:   # e.g. as root: a parent directory the postgres user cannot enter
            raise RuntimeError(f"initdb failed in {self.data_dir}: {run.stderr.strip()[-1000:]}")
        return self

    def start(self, timeout_s: float = 90.0) -> "PostgresServer":
        """Start on the same port and data; returns once it accepts connections (the
        deadline is generous: start-up on a loaded machine takes many seconds). The first
        start moves to a new port if another process took the drawn one (module doc)."""
        return _start_moving_if_taken(self, timeout_s, f"PostgreSQL in {self.data_dir}")

    def _start(self, timeout_s: float) -> "PostgresServer":
        import psycopg

        options = [arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")]
        with open(self.base / "server.log", "ab") as log:
            offset = log.tell()
            self.proc = spawn_tied([self.postgres, "-D", str(self.data_dir), "-p", str(self.port), "-h", "127.0.0.1",
                                    "-k", str(self.base), *options],
                                   stdout=log, stderr=log, cwd=self.base, **postgres_user())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                if listened_by(self.proc.pid, [self.port]):
                    return self
            except psycopg.OperationalError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                check_exit("PostgreSQL", _read_from(self.base / "server.log", offset), [self.port])
                raise RuntimeError(f"PostgreSQL did not start in {timeout_s:g} s (data: {self.data_dir})")
            time.sleep(0.1)

    def stop(self, fast: bool = True) -> None:
        """Fast shutdown (SIGINT, what `pg_ctl restart -m fast` does to clients: they are
        disconnected), else smart (SIGTERM); SIGKILL of the group if it does not end."""
        if self.proc is not None:
            stop_group(self.proc, 30.0, signal.SIGINT if fast else signal.SIGTERM)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class RedisServer:
    """redis-server on a free port, without persistence (a cache: restarted empty); with
    ``snapshot_dir`` it writes ``dump.rdb`` there on ``SAVE``, uncompressed (so a raw scan
    of the file sees every string it holds). ``settings`` are ``--name value`` over these
    defaults (e.g. ``appendonly="yes", save="3600 1"``: a Redis that persists; a tuple
    value is several arguments)."""

    def __init__(self, snapshot_dir: Path | None = None,
                 settings: Mapping[str, str | tuple[str, ...]] | None = None) -> None:
        self.dir = snapshot_dir
        self.settings = dict(settings or {})
        self.binary = shutil.which("redis-server")
        if not self.binary:
            raise MissingServer("redis-server not found: install it (apt-get install redis-server; "
                                "scripts/provision.sh does)")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.started = False   # once: the port is final (a restart keeps it)
        # Its output (start-up, warnings), in a directory of its own (not snapshot_dir, whose
        # files tests scan), removed by ``stop``.
        self.log_path = Path(tempfile.gettempdir()) / f"hearth-redis-{os.getpid()}-{id(self):x}" / "redis-server.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> "RedisServer":
        """Start (again) on its port; the first start moves to a new port if another
        process took the drawn one (module doc)."""
        return _start_moving_if_taken(self, timeout_s, "redis-server")

    def _start(self, timeout_s: float) -> "RedisServer":
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.dir is not None:
            args += ["--dir", str(self.dir), "--dbfilename", "dump.rdb", "--rdbcompression", "no"]
        args += [arg for name, value in self.settings.items()
                 for arg in (f"--{name}", *((value,) if isinstance(value, str) else value))]
        self.log_path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = spawn_tied(args, stdout=log, stderr=log)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                if listened_by(self.proc.pid, [self.port]):
                    client.close()
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = _read_from(self.log_path, offset)
                client.close()
                self.kill()
                check_exit("redis-server", output, [self.port])
                raise RuntimeError(f"redis-server did not start in {timeout_s:g} s")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 10.0)
        self.proc = None
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


def _read_from(path: Path, offset: int) -> str:
    """What a server wrote to its log since ``offset`` (this start's)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _start_moving_if_taken(server, timeout_s: float, what: str):
    """``server._start`` on its port; its first start on a port drawn anew (``.port``)
    while another process took it (``start_on_free_ports``). Returns ``server``."""
    if server.started:
        return server._start(timeout_s)

    def attempt(number: int):
        if number > 1:
            server.port = free_port()
        return server._start(timeout_s)

    start_on_free_ports(attempt, what)
    server.started = True
    return server
