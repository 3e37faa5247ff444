"""spawn_tied (services/common/child_process.py): the child dies with its parent, and no
Python code runs in it between fork and exec — a parent with threads (an in-process gRPC
server, OpenTelemetry's exporter) must not be able to hang a spawn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from services.common.child_process import _tied_command, spawn_tied, stop_group
from tests.helpers.processes import alive
from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[3]


def test_a_spawn_runs_no_fork_hook_of_the_parent_in_the_child():
    # A fork hook that waits for a lock another thread holds: CPython runs it in the child
    # of a spawn with preexec_fn, which then never reaches exec (the hang of a CI run).
    script = textwrap.dedent("""
        import os, sys, threading
        from services.common.child_process import spawn_tied
        held = threading.Lock()
        taken = threading.Event()
        def hold():
            held.acquire(); taken.set(); threading.Event().wait()
        threading.Thread(target=hold, daemon=True).start()
        taken.wait()
        os.register_at_fork(after_in_child=held.acquire)
        child = spawn_tied(["true"])
        sys.exit(child.wait(timeout=20))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_child_dies_when_its_parent_is_killed():
    script = textwrap.dedent("""
        import sys, time
        from services.common.child_process import spawn_tied
        child = spawn_tied(["sleep", "60"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    _assert_the_child_dies_with_its_killed_parent(script)


def test_a_child_spawned_from_a_thread_outlives_that_thread():
    # PR_SET_PDEATHSIG's parent is the forking THREAD: a server spawned from a pool's worker
    # was SIGKILLed as the pool shut down (bench.assign_cpu's meshes, review35 R7).
    spawned = []
    worker = threading.Thread(target=lambda: spawned.append(spawn_tied(["sleep", "60"])))
    worker.start()
    worker.join()
    child = spawned[0]
    try:
        # The death signal is set before the child execs sleep: once it runs sleep, a kill
        # for the ended thread has either come (it is gone) or will never come.
        wait_for(lambda: child.poll() is not None or _command_of(child.pid)[:1] == ["sleep"], timeout_s=60,
                 what="the child to exec its command", interval_s=0.02)
        assert child.poll() is None, f"killed when the thread that spawned it ended: {child.returncode}"
    finally:
        stop_group(child)


def test_a_child_spawned_from_a_thread_still_dies_when_its_parent_is_killed():
    script = textwrap.dedent("""
        import sys, threading, time
        from services.common.child_process import spawn_tied
        spawned = []
        worker = threading.Thread(target=lambda: spawned.append(spawn_tied(["sleep", "60"])))
        worker.start(); worker.join()
        print(spawned[0].pid, flush=True)
        time.sleep(60)
    """)
    _assert_the_child_dies_with_its_killed_parent(script)



def _assert_the_child_dies_with_its_killed_parent(script: str) -> None:
    """Runs ``script`` (which spawns a tied ``sleep 60`` and prints its pid) as a parent
    process, waits for the child to run its command, kills the parent, and asserts the child
    dies with it."""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        wait_for(lambda: not alive(child_pid) or _command_of(child_pid)[:1] == ["sleep"], timeout_s=60,
                 what="the child to exec its command", interval_s=0.02)
        assert alive(child_pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child_pid), timeout_s=10, what=f"child {child_pid} to die with its parent",
                 interval_s=0.05)
    finally:
        parent.kill()

def _command_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().split("\0")
    except OSError:
        return []


def test_a_child_whose_parent_died_before_the_death_signal_was_set_dies_at_once():
    # The check after setpriv's prctl: the pid it is given is not its parent any more.
    orphan = subprocess.Popen(_tied_command(["sleep", "60"], parent_pid=1, sig=signal.SIGKILL, env=None))
    assert orphan.wait(timeout=10) == -signal.SIGKILL


def test_the_child_runs_the_command_itself_in_a_session_of_its_own():
    child = spawn_tied(["sleep", "30"])
    try:
        # Until setpriv and sh have exec'd it (a fixed 0.3 s here before session 36: under
        # load the cmdline could still be setpriv's), then it must be the command itself.
        wait_for(lambda: _command_of(child.pid)[:2] == ["sleep", "30"], timeout_s=60,
                 what="the child to exec sleep 30", interval_s=0.02)
        assert os.getsid(child.pid) == child.pid
    finally:
        stop_group(child)
    assert child.returncode == -signal.SIGTERM
