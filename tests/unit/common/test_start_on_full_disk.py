"""A service started on a data directory whose volume cannot take a write stops in one
line naming its database, SQLite's error and the volume's free space (ops33).

`make run` stops every process when one exits, and a kubelet restarts a killed pod at
once: on a full disk the restart is the common case, not the odd one. Until ops33 the
first SQLite write of start-up (``PRAGMA journal_mode=WAL`` creating the ``-shm``)
failed with a Python traceback ending ``sqlite3.OperationalError: disk I/O error`` —
an operator reads a failing device, not a full volume. The full disk is made here
without a mount or root, as tests/integration/test_audit_full_disk.py does: a file-size
limit (``RLIMIT_FSIZE``, SIGXFSZ ignored) no file of the child may grow past."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from services.testing.mesh import ROOT


def _no_room() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_service_that_cannot_write_its_database_at_start_stops_in_one_line_naming_it(tmp_path):
    # -B: no .pyc written under the limit (test_audit_full_disk.py says why).
    done = subprocess.run([sys.executable, "-B", "-m", "services.attribution"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, preexec_fn=_no_room,
                          env={**os.environ, "HEARTH_DATA_DIR": str(tmp_path), "HEARTH_GRPC_PORT": "0",
                               "HEARTH_METRICS_PORT": "0", "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("attribution cannot start: its database "), last
    assert str(tmp_path / "attribution.db") in last
    assert "disk I/O error" in last or "full" in last, last
    assert "bytes free" in last, last


def test_the_gateway_that_cannot_write_its_audit_outbox_at_start_says_so(tmp_path):
    # The gateway's only file of its own is its audit outbox (the refusals it decides), opened
    # in the app's start-up, where uvicorn catches the failure: the reason ends the traceback it logs.
    done = subprocess.run([sys.executable, "-B", "-m", "gateway"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=_no_room,
                          env={**os.environ, "HEARTH_DATA_DIR": str(tmp_path), "HEARTH_GATEWAY_PORT": "0",
                               "HEARTH_METRICS_PORT": "0", "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode != 0
    assert (f"gateway cannot start: its audit outbox in {tmp_path} refused a write (disk I/O error); "
            f"the volume of {tmp_path} has ") in done.stderr, done.stderr[-2000:]
