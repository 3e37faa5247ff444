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
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

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
    if _SETPRIV is not None:
        args = _tied_command(args, os.getpid(), death_signal, popen_kwargs.get("env"))
    return subprocess.Popen(args, start_new_session=True, **popen_kwargs)


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
