"""Child processes that cannot outlive the process that started them.

The local mesh (`make run`, the end-to-end tests) and the test fixtures (PostgreSQL,
redis-server) start long-running servers. When the parent ends normally it stops them;
when it is killed (SIGKILL of pytest, an OOM kill, a crashed interpreter) nothing of it
runs any more, so the kernel has to do it: Linux's ``PR_SET_PDEATHSIG`` makes the kernel
send the child a signal when its parent thread exits. It is set in the child between fork
and exec, after any change of user (a change of credentials clears it), and the child
checks that the parent did not already die before the call (then it is already an orphan
and no signal would come).

Each child also gets its own session (process group), so a normal stop can signal the
server and anything it forked as one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int, sig: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def preexec() -> None:  # runs in the child, after setsid/setuid, before exec
        if libc is not None and libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def spawn_tied(args: Sequence[str], *, death_signal: int = signal.SIGKILL, **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child gets ``death_signal`` when this process dies,
    in a new session of its own. Accepts Popen's keyword arguments (``user=`` included:
    the death signal is set after the change of user)."""
    if "preexec_fn" in popen_kwargs or "start_new_session" in popen_kwargs:
        raise TypeError("spawn_tied sets preexec_fn and start_new_session itself")
    return subprocess.Popen(list(args), preexec_fn=_die_with_parent(os.getpid(), death_signal),
                            start_new_session=True, **popen_kwargs)


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
