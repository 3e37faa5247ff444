"""`make run`'s logs are bounded (ops33): each process's stdout/stderr is a file in
<data dir>/logs it appends to, and until session 33 nothing bounded it — a keyless client
at 80 requests/s (~650 bytes of log a 401) filled the data dir's disk at ~190 MB/h.

The writer here is what a child is: an O_APPEND fd on the file, written to and never
reopened, while the launcher rotates by name (services.testing.mesh.rotate_log)."""

from __future__ import annotations

import os

from services.testing.mesh import rotate_log

LINE = b'{"level": "WARNING", "msg": "security event", "reason": "missing_key"}' + b" " * 580 + b"\n"


def test_a_log_written_by_an_inherited_append_fd_stays_within_its_bound(tmp_path):
    path = tmp_path / "gateway.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)   # as Mesh._spawn's open(..., "ab")
    max_bytes, backups = 20_000, 2
    try:
        for i in range(2_000):   # 1.3 MB of 401 lines, the launcher's loop rotating between them
            os.write(fd, LINE)
            if i % 10 == 0:
                rotate_log(path, max_bytes, backups)
        os.write(fd, b"the last line\n")
    finally:
        os.close(fd)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gateway.log", "gateway.log.1", "gateway.log.2"], files
    # Each file at most the bound plus what was written between two rotations (10 lines).
    for name in files:
        assert (tmp_path / name).stat().st_size <= max_bytes + 10 * len(LINE), name
    # The child's writes after a truncation land at the start, not past a hole of zeros.
    current = path.read_bytes()
    assert b"\0" not in current and current.endswith(b"the last line\n")
    assert current.startswith(LINE)
    # The copies are whole lines, oldest in .2.
    for name in ("gateway.log.1", "gateway.log.2"):
        assert (tmp_path / name).read_bytes().count(LINE) * len(LINE) == (tmp_path / name).stat().st_size


def test_a_log_under_its_bound_is_left_alone_and_no_backups_only_empties_it(tmp_path):
    path = tmp_path / "privacy.log"
    path.write_bytes(LINE * 3)
    assert rotate_log(path, 10 * len(LINE), 3) is False
    assert path.read_bytes() == LINE * 3
    assert rotate_log(tmp_path / "absent.log", 1, 3) is False
    assert rotate_log(path, len(LINE), 0) is True
    assert path.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["privacy.log"]
