"""Which processes exist, from /proc (Linux): for the tests that kill a parent and check
that everything it started died with it; and a child's output followed as it comes."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path


def _parent_of(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None   # exited meanwhile
    return int(stat.rsplit(")", 1)[1].split()[1])   # after the command name, which may hold spaces


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := _parent_of(entry)) is not None:
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_each(pids: list[int], sig: int) -> list[int]:
    """Send ``sig`` to each of ``pids`` in order and return those it reached. A process
    that exited after it was listed (a PostgreSQL backend whose client just closed) is
    skipped: `os.kill` would raise ProcessLookupError and fail the test for a race that is
    not its subject. Freezing a tree, list the parent first: once it is stopped it forks
    nothing more."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        reached.append(pid)
    return reached


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


# scripts/run.py's last line once every process is up (`make run`'s "Ctrl-C stops everything.").
MESH_UP = "Ctrl-C stops everything"


def follow_output(proc: subprocess.Popen, marker: str = MESH_UP) -> tuple[list[str], threading.Event]:
    """Read ``proc``'s text stdout on a daemon thread: every line goes to the list returned,
    and the event is set at the first line holding ``marker``."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return lines, seen
