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
once, ``{"next": {}}`` for each group, ``{"stopped": reason}`` when it stops of itself (-x,
--maxfail, Ctrl-C) so the runner hands out nothing more, and ``{"durations": {file: s}}``
(setup + call + teardown of its tests, by file) before it ends; the runner answers each
``next`` with ``{"files": [...]}`` (``[]``: no more).
"""

from __future__ import annotations

import json
import os

import pytest

QUEUE_ENV = "HEARTH_TEST_QUEUE"


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


class QueueWorker:
    def __init__(self, runner: _Runner):
        self.runner = runner
        self.durations: dict[str, float] = {}

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
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail or session.shouldstop:
            self.runner.send({"stopped": str(session.shouldfail or session.shouldstop)})
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            raise session.Interrupted(session.shouldstop)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = item_file(report.nodeid)
        self.durations[name] = self.durations.get(name, 0.0) + report.duration


def pytest_configure(config: pytest.Config) -> None:
    # Popped: a pytest this one starts (a test of the runner) must not read these pipes.
    spec = os.environ.pop(QUEUE_ENV, None)
    if spec:
        config.pluginmanager.register(QueueWorker(_Runner(spec)), "hearth-queue-worker")
