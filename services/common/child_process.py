"""Child processes that cannot outlive the process that started them.

The local mesh (`make run`, the end-to-end tests) and the test fixtures (PostgreSQL,
redis-server) start long-running servers. When the parent ends normally it stops them;
when it is killed (SIGKILL of pytest, an OOM kill, a crashed interpreter) nothing of it
runs any more, so the kernel has to do it: Linux's ``PR_SET_PDEATHSIG`` makes the kernel
send the child a signal when its parent thread exits. It is set after any change of user
(a change of credentials clears it), and the child checks that the parent did not already
die before the call (then it is already an orphan and no signal would come).

No Python code runs in the child between fork and exec. A ``preexec_fn`` makes CPython run
every ``os.register_at_fork`` hook in the forked child — gRPC's and OpenTelemetry's among
them — and one that waits for a lock another thread of the parent held at the fork never
returns: a CI run hung until the 300 s test timeout starting a mesh from a test process that also
ran an in-process gRPC server (tests/e2e/test_otlp_tracing.py, session 17). So the child
execs util-linux's ``setpriv --pdeathsig`` (Debian's essential util-linux), which sets the
death signal and execs ``/bin/sh`` to check the parent and exec the command; where setpriv
is missing (not Linux) the child is only put in its own session.

Each child also gets its own session (process group), so a normal stop can signal the
server and anything it forked as one.

The "parent" of ``PR_SET_PDEATHSIG`` is the THREAD that forked the child, not the process
(prctl(2)): a server spawned from a worker thread was killed the moment that thread ended —
bench/assign_cpu.py's two meshes started by ``Mesh.start_healthy`` in a ThreadPoolExecutor
were SIGKILLed as the pool shut down, and the bench's seeding then met "Connection refused"
(review35 R7, session 35; reproduced in session 36). So a spawn asked for from any thread
but the main one is made by one thread of this module that lives as long as the process
(``_spawning_thread``); the main thread ends only with the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
# $0: the parent's pid; the rest: the command. $PPID is not the parent any more when the
# parent died before setpriv's prctl (the child was re-parented): then die at once.
_CHECK_PARENT_THEN_EXEC = 'if [ "$PPID" != "$0" ]; then kill -s "$SIG" $$; fi; exec "$@"'


def _tied_command(args: Sequence[str], parent_pid: int, sig: int, env: dict | None) -> list[str]:
    """The child's argv: ``args`` behind setpriv and the parent check (module doc)."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(args[0], path=path) is None:   # as Popen would: the caller learns it here
        raise FileNotFoundError(2, "No such file or directory", args[0])
    name = signal.Signals(sig).name.removeprefix("SIG")
    return [_SETPRIV, f"--pdeathsig={name}", "--", "/bin/sh", "-c",
            _CHECK_PARENT_THEN_EXEC.replace('"$SIG"', name), str(parent_pid), *args]


def spawn_tied(args: Sequence[str], *, death_signal: int = signal.SIGKILL, **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child gets ``death_signal`` when this process dies,
    in a new session of its own. Accepts Popen's keyword arguments (``user=`` included:
    the death signal is set after the change of user)."""
    if "preexec_fn" in popen_kwargs or "start_new_session" in popen_kwargs:
        raise TypeError("spawn_tied sets the death signal and start_new_session itself")
    args = list(args)
    if _SETPRIV is None:
        return subprocess.Popen(args, start_new_session=True, **popen_kwargs)
    args = _tied_command(args, os.getpid(), death_signal, popen_kwargs.get("env"))
    return _on_a_lasting_thread(lambda: subprocess.Popen(args, start_new_session=True, **popen_kwargs))


_requests: SimpleQueue = SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawning_thread() -> None:
    while True:
        call, result = _requests.get()
        if result.set_running_or_notify_cancel():
            try:
                result.set_result(call())
            except BaseException as exc:   # handed to the caller's thread, raised there
                result.set_exception(exc)


def _on_a_lasting_thread(call: Callable[[], T]) -> T:
    """``call()`` on a thread that ends only with the process: the main thread when it is
    the caller, else this module's spawning thread (a daemon, started on first use). The
    death signal of a child forked there comes when the process ends, not when the caller's
    thread does (module doc)."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return call()
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawning_thread, name="hearth-spawn-tied", daemon=True)
            _spawner.start()
    result: Future = Future()
    _requests.put((call, result))
    return result.result()


def stop_group(proc: subprocess.Popen, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal the child's whole process group, wait, then SIGKILL the group if needed."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
