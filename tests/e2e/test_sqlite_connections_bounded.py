"""A SQLite service's open connections do not grow while it idles (attack26): each health
check runs on a thread of its own, and each new thread opened a connection of its own
that the database kept in its list of every connection for good — one per check round
(every 2 s), two file descriptors each: 342 connections to each service's database after
705 s of `scripts/run.py`, on the way to the process's open-files limit."""

from __future__ import annotations

import os
import time

from tests.helpers.waiting import SLOW_MACHINE_S


def _open_database_files(pid: int, name: str) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                count += 1
        except OSError:   # closed meanwhile
            pass
    return count


def test_health_checks_do_not_leave_a_sqlite_connection_behind_each(mesh):
    pids = {s: mesh.processes[s].pid for s in ("clustering", "feedback")}
    # Let the services settle (first requests, workers' own connections).
    before = {s: _open_database_files(pid, f"/{s}.db") for s, pid in pids.items()}
    time.sleep(min(12.0, SLOW_MACHINE_S))   # six check rounds at the default 2 s
    after = {s: _open_database_files(pid, f"/{s}.db") for s, pid in pids.items()}
    # Before the fix each grew with every check round (+23 and +24 here); a worker thread starting
    # meanwhile may open one of its own.
    assert all(after[s] - before[s] <= 2 for s in pids), (before, after)
