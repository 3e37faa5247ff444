"""`make test`: the whole suite as two pytest processes side by side.

Run one after the other, the suite kept one of a 2-core machine's cores idle most of the
time: 2,512 tests took 11:42-11:50 on the idle machine but only ~620-660 CPU-s (user+sys
of pytest and every process it started, session 24, docs/benchmarks.md "Session 24"): the
e2e, integration and security tests wait on the meshes' processes, PostgreSQL and their
own deadlines much of the time. So tests/unit, tests/contract, tests/deploy, tests/security
and three of tests/integration's slowest files run in one
pytest process and tests/e2e and the rest of tests/integration in another, at the same
time (the e2e tests' waits do not shrink on an idle machine: balanced there, not by the
serial shares). Nothing is selected or left out: the second process runs ``tests`` with
the first one's paths ignored, so every test file, present or added later, is in exactly
one of them. Each process has its own PostgreSQL cluster,
redis-server and bytecode directory (tests/conftest.py); no test relies on what another
left in them. The tests' bounds already hold on a machine shared with other work (they
pass at load 10-25).

Which half is the longer depends on the load: the first is CPU-bound (model fits) and
stretches with its share of the cores, the second waits on processes (the fresh-clone CI
of 98239b4: 7:46 / 11:06 idle, 9:43 / 11:57 at load 4-5; session 26: 23:53 / 18:44 at load
4-11 beside another suite). So a few self-contained files (``LAST``: no shared mesh, each
its own processes) belong to neither: a third pytest process runs them as soon as either
half has ended, after whichever is the shorter on the machine as it is — not after a
stop (SIGTERM, Ctrl-C): the halves stop, and no last process is started.

The second process prints as it runs; the first one's and the last one's output is kept
in files and printed when all have ended, then one line with the summaries and the wall
time. The exit status is the first non-zero of the three (pytest's own codes).
Arguments are passed to each (``make test ARGS="-x"``).
"""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1   # linux/prctl.h
FIRST_HALF = ("tests/unit", "tests/contract", "tests/deploy", "tests/security",
              # three of tests/integration's slowest files: with tests/integration whole in the
              # second half, the first ended 3:37 before it at load ~2.6 (5:07 vs 8:44). The
              # first half is CPU-bound (model fits), the second waits on processes: with four
              # files here (session 24) it was 44 s shorter on the idle machine but 3:02 longer
              # at load 12-18 (22:42 vs 19:40), so test_storage.py (130 s at load ~18, 16.5
              # CPU-s) went back to the second half in session 26 (docs/benchmarks.md).
              "tests/integration/test_clustering_service.py",
              "tests/integration/test_prediction_outbox_erasure.py", "tests/integration/test_deletion_lease.py")
# Run after whichever half ends first (docs/benchmarks.md, "Session 27"): each starts its own
# processes and waits on them for a set length (test_verify_quick: the harness's load ladder,
# soak and faults; ~1:40 of the second half on a loaded machine).
LAST = ("tests/e2e/test_verify_quick.py",)


def commands(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(the first half, the rest, the last): the rest is ``tests`` minus the others' paths."""
    pytest = [sys.executable, "-m", "pytest", "-q", *args]
    return ([*pytest, *FIRST_HALF], [*pytest, *(f"--ignore={d}" for d in FIRST_HALF + LAST), "tests"],
            [*pytest, *LAST])


def summary(text: str) -> str:
    """pytest's last line ("2 failed, 510 passed in 61.20s (0:01:01)"), or what ended it."""
    for line in reversed(text.strip().splitlines()):
        if re.search(r"\b(passed|failed|errors?|no tests ran)\b.* in [0-9.]+s", line):
            return line.strip("= ")
    return "(no summary: " + (text.strip().splitlines() or ["no output"])[-1][:200] + ")"


def _child_setup() -> None:
    """In each pytest process before it starts: SIGINT back to its default (an ignored one
    would be inherited through exec), and SIGKILL when this process dies (PR_SET_PDEATHSIG,
    as services/common/child_process.py ties the meshes to pytest): a killed `make test`
    leaves no pytest behind, and each pytest's own servers and meshes die with it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return _run(*commands(argv))
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _pump(stream, into: list[str]) -> None:
    """Print a process's output as it comes, and keep it."""
    for line in stream:
        into.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()


def _run(first_cmd: list[str], second_cmd: list[str], last_cmd: list[str]) -> int:
    began = time.monotonic()
    stopped_by: list[int] = []   # the signal that stopped the run: no last process after it

    # Ctrl-C reaches every pytest process (they are in this process group); this one waits
    # for them to finish their teardown and report, and starts no last one (review27: it did,
    # out of the signal's reach, when the halves had ended).
    def interrupted(signum, _frame):
        stopped_by.append(signum)
    signal.signal(signal.SIGINT, interrupted)
    with tempfile.NamedTemporaryFile("w+", prefix="hearth-test-first-half-", suffix=".log") as log, \
            tempfile.NamedTemporaryFile("w+", prefix="hearth-test-last-", suffix=".log") as last_log:
        first = subprocess.Popen(first_cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
        second = subprocess.Popen(second_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, preexec_fn=_child_setup)
        running = [first, second]

        def forward(signum, _frame):   # e.g. a CI timeout: stop them all, and their processes with them
            stopped_by.append(signum)
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(signum)
        signal.signal(signal.SIGTERM, forward)

        print(f"make test: {' '.join(FIRST_HALF)} in one pytest process (printed when it ends), "
              f"the rest of tests/ but {' '.join(LAST)} in another beside it, and {' '.join(LAST)} "
              f"after whichever ends first:", flush=True)
        second_out: list[str] = []
        assert second.stdout is not None
        pump = threading.Thread(target=_pump, args=(second.stdout, second_out), daemon=True)
        pump.start()
        while first.poll() is None and second.poll() is None:
            time.sleep(0.2)
        after = "the first half" if first.poll() is not None else "the rest"
        if stopped_by:
            after, last_rc = "none: the run was stopped", 2   # pytest's "interrupted"
        else:
            last = subprocess.Popen(last_cmd, cwd=ROOT, stdout=last_log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
            running.append(last)
            if stopped_by and last.poll() is None:   # a signal between the test above and the append
                last.send_signal(stopped_by[0])
            last_rc = last.wait()
        second_rc = second.wait()
        pump.join()
        first_rc = first.wait()
        log.seek(0)
        first_out = log.read()
        last_log.seek(0)
        last_out = last_log.read()
    print(f"\n---- {' '.join(FIRST_HALF)} ----", flush=True)
    sys.stdout.write(first_out)
    print(f"\n---- {' '.join(LAST)} (after {after}) ----", flush=True)
    sys.stdout.write(last_out)
    wall = time.monotonic() - began
    print(f"\nmake test: {' '.join(FIRST_HALF)}: {summary(first_out)}; the rest: {summary(''.join(second_out))}; "
          f"{' '.join(LAST)} after {after}: {summary(last_out)}; wall {int(wall // 60)}:{wall % 60:04.1f}", flush=True)
    return next((rc for rc in (first_rc, second_rc, last_rc) if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
