"""`make test`: the whole suite as two long-lived pytest processes pulling test files from
one work queue, longest first.

Run one after the other, the suite kept one of a 2-core machine's cores idle most of the
time (the e2e, integration and security tests wait on meshes, PostgreSQL and their own
deadlines; docs/benchmarks.md "Session 24"), so it runs as two pytest processes side by
side. Sessions 24-27 split it into two fixed halves (a CPU-bound one: unit, contract,
deploy, security and three integration files; one that waits on processes: e2e and the
rest) plus tests/e2e/test_verify_quick.py after whichever ended first. No fixed split is
balanced at every load: the CPU-bound half stretches with its share of the cores, the
waiting one much less (idle 7:44 / 11:02, beside another suite 11:10 / 13:51 in the CI of
43a5077), and every new e2e test lengthened the longer half. Here the split is made as the
run goes ("Session 28"):

- Each pytest process (a *worker*, ``WORKERS``) collects the suite as usual and tells this
  runner which files it collected (tests/helpers/queue_worker.py, loaded with ``-p``).
  pytest's collection is the list: every file it collects, present or added later, is
  handed out exactly once, and the two workers' lists must be equal (else nothing runs).
- Files that use the same package-scoped fixture are one *group*, handed out whole and run
  one after the other (tests/e2e's ``mesh``, tests/security's ``security_mesh``: split,
  each would be started once per worker). Every other file is a group of its own.
- Groups are handed out longest first by the seconds recorded in ``tests/durations.json``
  (per file; a file with no record counts as the longest recorded one, so a new file runs
  early, where it cannot make a long tail). A missing or stale record costs balance, never
  a file: whichever worker is free takes the next group, so the two end within about the
  last groups' length of each other at any load.
- Each worker has its own PostgreSQL cluster, redis-server and bytecode directory
  (tests/conftest.py, session fixtures), started once and kept for all its files.

A worker that dies (a crash; a test hung past pytest-timeout's limit, which the worker's
backstop ends with every thread's traceback: tests/helpers/queue_worker.py) fails the run
with a line naming the test it was running and the files it left; the other goes on.
A stop (SIGTERM: a CI timeout; Ctrl-C) hands out nothing more: the workers are stopped and
no other file starts; a worker that stops of itself (``-x``, ``--maxfail``) stops the
queue too. Each worker dies with this process (PR_SET_PDEATHSIG) and its servers and meshes
with it. While it runs, one line is printed per group handed out (which worker, when);
each worker's whole pytest output is printed when all have ended, then one line with their
summaries, when each ended and the wall time. The exit status is the first non-zero of the
workers' (pytest's own codes), or 2/3 if a stop or a failure to collect left files not run.
Arguments are passed to each pytest (``make test ARGS="-x"``; a path narrows the run to it).
``--write-durations`` (this script's own, not pytest's) writes the run's per-file seconds
into tests/durations.json (a narrowed run writes its files' and keeps the others'); a test
file with no record there fails tests/deploy/test_run_tests.py (it would be handed out as
the longest).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DURATIONS = ROOT / "tests" / "durations.json"
WORKERS = 2
PLUGIN = "tests.helpers.queue_worker"
QUEUE_ENV = "HEARTH_TEST_QUEUE"   # tests/helpers/queue_worker.py QUEUE_ENV
PR_SET_PDEATHSIG = 1   # linux/prctl.h


# ---- the schedule (pure) ----

def group_files(collected: dict[str, list[str]]) -> list[list[str]]:
    """Files (in collection order, each with the package-scoped fixtures it uses) as groups:
    files sharing a fixture, directly or through another file, are one group, in
    collection order; groups are ordered by their first file."""
    owner: dict[str, str] = {}   # a fixture -> the first file that used it
    parent = {name: name for name in collected}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name, fixtures in collected.items():
        for fixture in fixtures:
            if fixture in owner:
                a, b = root(owner[fixture]), root(name)
                if a != b:
                    parent[b] = a
            else:
                owner[fixture] = name
    groups: dict[str, list[str]] = {}
    for name in collected:
        groups.setdefault(root(name), []).append(name)
    position = {name: i for i, name in enumerate(collected)}
    return sorted(groups.values(), key=lambda g: position[g[0]])


def order_groups(groups: list[list[str]], seconds: dict[str, float]) -> list[list[str]]:
    """Longest first by the recorded seconds of their files; a file with no record counts
    as the longest recorded file (1 s if there is no record); ties keep their order."""
    unknown = max(seconds.values(), default=1.0)
    return sorted(groups, key=lambda g: -sum(seconds.get(name, unknown) for name in g))


def load_durations(path: Path) -> dict[str, float]:
    """tests/durations.json's per-file seconds; {} when it is missing or unreadable."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["seconds"]
        return {str(k): float(v) for k, v in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class WorkQueue:
    """The groups left, handed out one at a time to whichever worker asks first. Built from
    the first worker's collection; every other worker's must be the same files."""

    def __init__(self, seconds: dict[str, float]):
        self._seconds = seconds
        self._lock = threading.Lock()
        self._collected: dict[str, list[str]] | None = None
        self._left: list[list[str]] = []
        self.handed: list[tuple[int, list[str]]] = []   # (worker, group) in the order handed out
        self.stopped: str | None = None

    def collected(self, worker: int, files: dict[str, list[str]]) -> None:
        with self._lock:
            if self._collected is None:
                self._collected = dict(files)
                self._left = order_groups(group_files(files), self._seconds)
                unrecorded = sorted(name for name in files if name not in self._seconds)
                if self._seconds and unrecorded:   # each is handed out as the longest recorded file
                    print(f"make test: no recorded seconds for {len(unrecorded)} files (handed out as the longest; "
                          f"`scripts/run_tests.py --write-durations FILE...` records them): "
                          f"{', '.join(unrecorded[:5])}{' ...' if len(unrecorded) > 5 else ''}", flush=True)
            elif set(files) != set(self._collected):
                differ = sorted(set(files) ^ set(self._collected))
                self._stop(f"worker {worker} collected other files than the first ({len(differ)}: "
                           f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''})")

    def take(self, worker: int, on_take=None) -> list[str]:
        """The next group for ``worker``; [] once the queue is empty or stopped. ``on_take(group)``
        is called before another worker can take one (the lines printed keep the order)."""
        with self._lock:
            if self.stopped or not self._left:
                return []
            group = self._left.pop(0)
            self.handed.append((worker, group))
            if on_take:
                on_take(group)
            return group

    def stop(self, reason: str) -> None:
        with self._lock:
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        self.stopped = self.stopped or reason

    def not_run(self) -> list[str]:
        """Files collected and never handed out (a stop, or no worker collected)."""
        with self._lock:
            return [name for group in self._left for name in group]

    @property
    def files(self) -> list[str]:
        return list(self._collected or ())


def summary(text: str) -> str:
    """pytest's last line ("2 failed, 510 passed, 1 warning in 61.20s (0:01:01)"), or what ended
    it. A worker handed no file that warned at collection ends on "1 warning in 5.85s": its
    summary too (it read "(no summary: ...)" until newcomer34)."""
    for line in reversed(text.strip().splitlines()):
        if re.search(r"\b(passed|failed|errors?|warnings?|no tests ran)\b.* in [0-9.]+s", line):
            return line.strip("= ")
    return "(no summary: " + (text.strip().splitlines() or ["no output"])[-1][:200] + ")"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


# ---- the processes ----

def _child_setup() -> None:
    """In each pytest process before it starts: SIGINT back to its default (an ignored one
    would be inherited through exec), and SIGKILL when this process dies (PR_SET_PDEATHSIG,
    as services/common/child_process.py ties the meshes to pytest): a killed `make test`
    leaves no pytest behind, and each pytest's own servers and meshes die with it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def command(args: list[str]) -> list[str]:
    """One worker's pytest: the queue plugin, progress as a count (a worker runs part of what
    it collected: "[ 812/2846]" is its 812th test of the suite's 2,846; a percentage would
    stop near half), then the caller's arguments."""
    return [sys.executable, "-m", "pytest", "-q", "-p", PLUGIN, "-o", "console_output_style=count", *args]


class _Worker:
    def __init__(self, number: int, cmd: list[str], root: Path, log, queue: WorkQueue, began: float):
        self.number, self.queue, self.began, self.log = number, queue, began, log
        self.durations: dict[str, float] = {}
        self.files = 0
        self.ended_s: float | None = None
        self.group: list[str] = []        # the group it was handed last
        self.running: str | None = None   # the test it started last
        self.reported_end = False         # pytest ended its session itself (not a crash, a kill)
        to_worker, from_runner = os.pipe()
        from_worker, to_runner = os.pipe()
        env = {**os.environ, QUEUE_ENV: f"{to_worker},{to_runner}"}
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, pass_fds=(to_worker, to_runner), preexec_fn=_child_setup)
        os.close(to_worker)
        os.close(to_runner)
        self._to = os.fdopen(from_runner, "w", encoding="utf-8")
        self._from = os.fdopen(from_worker, "r", encoding="utf-8")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _handed(self, group: list[str]) -> None:
        self.files += len(group)
        self.group = list(group)
        shared = f" (+{len(group) - 1} files sharing its package fixture)" if len(group) > 1 else ""
        print(f"make test [{_clock(time.monotonic() - self.began)}] worker {self.number}: {group[0]}{shared}",
              flush=True)

    def _serve(self) -> None:
        """Answer the worker until it closes its end (it ended, or died)."""
        with self._from, self._to:
            for line in self._from:
                message = json.loads(line)
                if "collected" in message:
                    self.queue.collected(self.number, message["collected"])
                elif "next" in message:
                    group = self.queue.take(self.number, self._handed)
                    try:
                        self._to.write(json.dumps({"files": group}) + "\n")
                        self._to.flush()
                    except (BrokenPipeError, ValueError):
                        return
                elif "stopped" in message:
                    self.queue.stop(f"worker {self.number} stopped: {message['stopped']}")
                elif "running" in message:
                    self.running = message["running"]
                elif "durations" in message:
                    self.durations.update(message["durations"])
                elif "ended" in message:
                    self.reported_end = True

    def died(self) -> str | None:
        """What ended the worker, when pytest did not end its run itself (a crash, the
        backstop of a hung test, a kill): "<how>, running <test>"; None otherwise."""
        if self.reported_end or self.proc.returncode is None:
            return None
        code = self.proc.returncode
        if code == 0 and self.running is None:   # pytest answered without a session (--version, --help)
            return None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code} without pytest's summary"
        return f"{how}, running {self.running or 'no test yet (collecting)'}"

    def lost_files(self) -> list[str]:
        """The files of its last group it never finished (from the one it died in)."""
        if self.running is None or self.died() is None:
            return []
        where = self.running.split("::", 1)[0]
        return self.group[self.group.index(where):] if where in self.group else []


def run(args: list[str], *, root: Path = ROOT, workers: int = WORKERS, durations: Path = DURATIONS,
        write_durations: bool = False) -> int:
    began = time.monotonic()
    queue = WorkQueue(load_durations(durations))
    stopped_by: list[int] = []
    running: list[_Worker] = []

    def interrupted(signum, _frame):   # Ctrl-C reaches every worker (they are in this process group)
        stopped_by.append(signum)
        queue.stop("interrupted")

    def forward(signum, _frame):   # e.g. a CI timeout: stop them all, and their processes with them
        stopped_by.append(signum)
        queue.stop(f"stopped by {signal.Signals(signum).name}")
        for worker in running:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, forward)
    print(f"make test: {workers} pytest processes, each taking the next test file (or the files sharing a "
          f"package fixture) as it is free, longest first ({durations.name if durations.exists() else 'no record'}):",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="hearth-test-workers-") as logs:
        for number in range(1, workers + 1):
            log = open(Path(logs) / f"worker-{number}.log", "w+", encoding="utf-8")
            running.append(_Worker(number, command(args), root, log, queue, began))
            if stopped_by:   # a signal while the workers were being started
                forward(stopped_by[0], None)
        while any(w.ended_s is None for w in running):
            time.sleep(0.2)
            for worker in running:
                if worker.ended_s is None and worker.proc.poll() is not None:
                    worker.ended_s = time.monotonic() - began
                    print(f"make test [{_clock(worker.ended_s)}] worker {worker.number} ended "
                          f"(exit {worker.proc.returncode}, {worker.files} files)", flush=True)
                    worker.thread.join(timeout=30)   # its last messages read: died() can tell
                    if worker.died():
                        print(f"make test [{_clock(worker.ended_s)}] worker {worker.number} DIED "
                              f"({worker.died()}): its output, printed below, ends with the "
                              f"traceback", flush=True)
        outputs = []
        for worker in running:
            worker.thread.join(timeout=30)
            worker.log.seek(0)
            outputs.append(worker.log.read())
            worker.log.close()
    for worker, out in zip(running, outputs):
        print(f"\n---- worker {worker.number}: {worker.files} files ----", flush=True)
        sys.stdout.write(out)
    not_run = queue.not_run()
    if not_run:
        # Not stopped: every worker ended (died) before taking them (it said "(None)" until review34).
        why = queue.stopped or "no worker left to take them"
        not_run_note = f"; NOT RUN ({why}): {len(not_run)} files, e.g. {', '.join(not_run[:3])}"
    else:
        not_run_note = ""
    for worker in running:
        if worker.died():
            lost = worker.lost_files()
            not_run_note += (f"; worker {worker.number} DIED ({worker.died()}): {len(lost)} files not finished, "
                             f"e.g. {', '.join(lost[:3])}")
    parts = [f"worker {w.number}: {summary(out)}, ended at {_clock(w.ended_s)}" for w, out in zip(running, outputs)]
    wall = time.monotonic() - began
    print(f"\nmake test: {'; '.join(parts)}{not_run_note}; wall {_clock(wall)}", flush=True)
    if write_durations and queue.files:
        _write_durations(durations, queue.files, [w.durations for w in running], wall, root)
    failed = next((w.proc.returncode for w in running if w.proc.returncode != 0), 0)
    if failed < 0:   # a worker killed by a signal: a status a shell shows as such
        failed = 128 - failed
    if failed == 0 and not_run:
        failed = 2 if stopped_by else 3
    if failed == 0 and any(w.died() for w in running):
        # A worker that died with status 0 (a test or the code under test calling os._exit(0))
        # left the rest of its file unrun: the run fails as for files never handed out
        # (review34: it exited 0, the DIED line the only word of it).
        failed = 3
    return failed


def _write_durations(path: Path, files: list[str], measured: list[dict[str, float]], wall: float,
                     root: Path = ROOT) -> None:
    """This run's seconds per file; a file this run did not measure keeps its old record
    while it exists (a run narrowed to a few files — ``--write-durations tests/e2e/test_x.py``,
    how a new file gets its record — dropped every other file's until session 36); the
    record of a file that is gone is dropped."""
    seconds = load_durations(path)
    for one in measured:
        seconds.update(one)
    files = sorted(set(files) | {name for name in seconds if (root / name).is_file()})
    load = os.getloadavg()[1]
    ran = len({name for one in measured for name in one})
    kept = f"; {ran} of {len(files)} files measured by this run, the others' records kept" if ran < len(files) else ""
    record = {"about": "seconds per test file (setup + call + teardown) as `make test` ran them, for the "
                       "order scripts/run_tests.py hands them out in; written by `scripts/run_tests.py "
                       f"--write-durations` at {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                       f"wall {_clock(wall)}, 5-minute load {load:.1f}{kept}",
              "seconds": {name: round(seconds[name], 1) for name in sorted(files) if name in seconds}}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"make test: wrote {len(record['seconds'])} files' seconds to {path}", flush=True)


# Options with which pytest runs no test: one process prints the answer once.
RUNS_NO_TESTS = ("--collect-only", "--co", "--version", "-V", "-h", "--help", "--fixtures", "--markers")


def main(argv: list[str]) -> int:
    write = "--write-durations" in argv
    args = [a for a in argv if a != "--write-durations"]
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return run(args, workers=1 if set(args) & set(RUNS_NO_TESTS) else WORKERS, write_durations=write)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
