"""The pytest side of `make test`'s work queue (scripts/run_tests.py): loaded with
``-p tests.helpers.queue_worker`` into each of the runner's long-lived pytest processes.

The process collects the whole suite as usual, tells the runner which files it collected
(and the package-scoped fixtures each file uses, which keep files together), then runs
only the files the runner hands it, one group at a time, until the runner answers with
none. Each test still runs through pytest's own protocol (fixtures, reports, --durations,
-x); only the loop over ``session.items`` is replaced. The runner speaks through two pipes
whose descriptors are in ``HEARTH_TEST_QUEUE`` ("read,write"); without it the plugin does
nothing.

Messages are JSON lines. The process sends ``{"collected": {file: [package fixture, ...]}}``
once, ``{"next": {}}`` for each group, ``{"running": nodeid}`` as each test starts (the
runner names the test a worker died in), ``{"stopped": reason}`` when it stops of itself
(-x, --maxfail, Ctrl-C) so the runner hands out nothing more, ``{"durations": {file: s}}``
(setup + call + teardown of its tests, by file) and ``{"ended": exit status}`` when pytest
ends its session (a worker that died sends no ``ended``); the runner answers each
``next`` with ``{"files": [...]}`` (``[]``: no more).

A test that hangs where pytest-timeout's SIGALRM cannot stop it (a call in C that does not
return to the interpreter, a signal blocked) would hold its worker, and `make test`, until
CI's own limit killed the run without a word of where. Each test is therefore also given a
backstop (``backstop_s``): faulthandler's watchdog thread, which needs neither the signal
nor the GIL, prints every thread's traceback into the worker's output and ends the process
(exit status 1) past pytest-timeout's limit; the runner then names the test and fails.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os

import pytest

from tests.helpers.waiting import cpu_slowdown

QUEUE_ENV = "HEARTH_TEST_QUEUE"
WORKER_PLUGIN = "hearth-queue-worker"
# Seconds past pytest-timeout's limit before the backstop ends a hung worker (a test of the
# runner sets a few).
BACKSTOP_MARGIN_ENV = "HEARTH_TEST_BACKSTOP_MARGIN_S"
BACKSTOP_MARGIN_S = 120.0


def backstop_s(timeout_s: float, slowdown: float, margin_s: float = BACKSTOP_MARGIN_S) -> float:
    """When a test still running is taken as hung: pytest-timeout's limit for it (its
    ``timeout`` times the machine's slowdown, tests/conftest.py) and a quarter more, plus
    ``margin_s``: pytest-timeout fails a slow test first whenever it can."""
    return 1.25 * timeout_s * slowdown + margin_s


def item_file(nodeid: str) -> str:
    """The test file of a node id ("tests/e2e/test_mesh.py::test_x[a::b]" -> "tests/e2e/test_mesh.py")."""
    return nodeid.split("::", 1)[0]


def package_fixtures(item: pytest.Item) -> set[str]:
    """The package-scoped fixtures ``item`` uses, as "where they are defined::name"
    (tests/e2e's ``mesh`` is "tests/e2e::mesh"): files that share one must run in one
    process, one after the other, or the fixture is set up twice."""
    info = getattr(item, "_fixtureinfo", None)
    used: set[str] = set()
    for name, defs in (getattr(info, "name2fixturedefs", None) or {}).items():
        if defs and defs[-1].scope == "package":
            used.add(f"{defs[-1].baseid}::{name}")
    return used


class _Runner:
    """The two pipes to scripts/run_tests.py."""

    def __init__(self, spec: str):
        read_fd, write_fd = (int(fd) for fd in spec.split(","))
        for fd in (read_fd, write_fd):
            # The meshes and servers a test starts must not hold the pipes open: the runner
            # reads this process's end from the pipe's end-of-file.
            os.set_inheritable(fd, False)
        self._in = os.fdopen(read_fd, "r", encoding="utf-8")
        self._out = os.fdopen(write_fd, "w", encoding="utf-8")

    def send(self, message: dict) -> None:
        try:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()
        except (BrokenPipeError, ValueError):   # the runner is gone: it cannot hand out more
            pass

    def next_files(self) -> list[str]:
        self.send({"next": {}})
        line = self._in.readline()
        return json.loads(line)["files"] if line else []


class _SessionOnly:
    """The ``nextitem`` of a group's last item: what comes next shares only the session."""

    def __init__(self, session: pytest.Session):
        self._chain = [session]

    def listchain(self) -> list:
        return self._chain


class Backstop:
    """The per-test backstop of a pytest process: ``with backstop.armed(item):`` around a
    test's protocol. Armed by each `make test` worker, and by tests/conftest.py in any other
    pytest run of the suite (`pytest -q tests/unit`, one process without the runner)."""

    def __init__(self, config: pytest.Config):
        # A copy of the process's stderr taken now: while a test runs, pytest's capture
        # points fd 2 at a temporary file that an exiting process never prints.
        self._stderr = os.fdopen(os.dup(2), "w")
        self._margin_s = float(os.environ.get(BACKSTOP_MARGIN_ENV, BACKSTOP_MARGIN_S))
        # pytest's own faulthandler_timeout uses the same (single) watchdog: it wins if set.
        self._on = not float(config.getini("faulthandler_timeout") or 0)

    @contextlib.contextmanager
    def armed(self, item: pytest.Item):
        timeout_s = _timeout_s(item) if self._on else 0.0
        if timeout_s:
            faulthandler.dump_traceback_later(backstop_s(timeout_s, cpu_slowdown(), self._margin_s),
                                              exit=True, file=self._stderr)
        try:
            yield
        finally:
            if timeout_s:
                faulthandler.cancel_dump_traceback_later()


class QueueWorker:
    def __init__(self, runner: _Runner, config: pytest.Config):
        self.runner = runner
        self.durations: dict[str, float] = {}
        self.backstop = Backstop(config)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session):
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            return None   # pytest's own loop reports the collection errors
        if session.config.option.collectonly:
            return None
        by_file: dict[str, list[pytest.Item]] = {}
        fixtures: dict[str, set[str]] = {}
        for item in session.items:
            name = item_file(item.nodeid)
            by_file.setdefault(name, []).append(item)
            fixtures.setdefault(name, set()).update(package_fixtures(item))
        self.runner.send({"collected": {name: sorted(fixtures[name]) for name in by_file}})
        try:
            self._loop(session, by_file)
        except KeyboardInterrupt:
            self.runner.send({"stopped": "interrupted"})
            raise
        finally:
            self.runner.send({"durations": {k: round(v, 2) for k, v in self.durations.items()}})
        return True

    def _loop(self, session: pytest.Session, by_file: dict[str, list[pytest.Item]]) -> None:
        # An item's teardown tears down what the next item does not share (pytest's
        # SetupState.teardown_exact). Within a group that is the next item; after a group's
        # last item, everything but the session (its PostgreSQL, redis-server): the group's
        # package fixtures have no other user. So the next group is asked for only once this
        # one is done, and a worker never holds a group another could be running.
        after_group = _SessionOnly(session)
        while files := self.runner.next_files():
            unknown = [f for f in files if f not in by_file]
            if unknown:
                raise RuntimeError(f"the runner handed out files this process did not collect: {unknown}")
            items = [item for name in files for item in by_file[name]]
            for item, nextitem in zip(items, [*items[1:], after_group]):
                self._run(session, item, nextitem)

    def _run(self, session: pytest.Session, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        self.runner.send({"running": item.nodeid})
        with self.backstop.armed(item):
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail or session.shouldstop:
            self.runner.send({"stopped": str(session.shouldfail or session.shouldstop)})
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            raise session.Interrupted(session.shouldstop)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # pytest ended its run itself (whatever the outcome): the runner tells this from a
        # worker that died (its process gone without this message).
        self.runner.send({"ended": int(exitstatus)})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = item_file(report.nodeid)
        self.durations[name] = self.durations.get(name, 0.0) + report.duration


def _timeout_s(item: pytest.Item) -> float:
    """pytest-timeout's ``timeout`` for ``item`` (its mark, else the ini's), 0 when none."""
    try:
        import pytest_timeout
    except ImportError:
        return 0.0
    return float(pytest_timeout._get_item_settings(item).timeout or 0)


def pytest_configure(config: pytest.Config) -> None:
    # Popped: a pytest this one starts (a test of the runner) must not read these pipes.
    spec = os.environ.pop(QUEUE_ENV, None)
    if spec:
        config.pluginmanager.register(QueueWorker(_Runner(spec), config), WORKER_PLUGIN)
