"""What tests/conftest.py sets up for the whole run (docs/benchmarks.md, "Session 23"):

- the processes a run starts keep their compiled bytecode for the next one: with
  PYTHONDONTWRITEBYTECODE set, every mesh process, restart and CLI run compiled the
  project's modules from source again (~0.06-0.08 CPU-s a process); they write it under the
  run's own PYTHONPYCACHEPREFIX instead, never into the checkout;
- pytest's tmp_path directories (the SQLite databases of in-process servers and meshes) are
  on tmpfs where the machine has one (an fsync per SQLite commit: 1.7 ms on this disk);
- the PostgreSQL clusters go beside them (session 24), named after the run's pid, and the
  clusters of runs that are gone (killed before their teardown) are removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TMP_PATH_ON_TMPFS, _tmpfs

ROOT = Path(__file__).resolve().parents[3]


def _child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=120)


def test_a_process_the_run_starts_writes_bytecode_the_next_one_reads_outside_the_checkout():
    assert _child("-c", "import sys; print(sys.dont_write_bytecode)").stdout.strip() == "False"
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    if prefix is None:
        # The run was started without PYTHONDONTWRITEBYTECODE: its processes keep their
        # bytecode beside the sources, as Python does by default (__pycache__, ignored by git).
        return
    assert not Path(prefix).resolve().is_relative_to(ROOT)
    source = ROOT / "services" / "common" / "lazy_import.py"
    _child("-c", "import services.common.lazy_import")
    cached = Path(_child("-c", f"import importlib.util; print(importlib.util.cache_from_source({str(source)!r}))")
                  .stdout.strip())
    assert cached.is_file() and cached.resolve().is_relative_to(Path(prefix).resolve()), cached
    assert not (source.parent / "__pycache__").exists()
    # The next process loads that file rather than compiling the source again (python -v
    # names where each module's code object came from).
    verbose = _child("-v", "-c", "import services.common.lazy_import").stderr
    assert f"# code object from '{cached}'" in verbose, [line for line in verbose.splitlines() if "lazy_import" in line]


def _filesystem(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    mounts = [line.split() for line in open("/proc/mounts", encoding="utf-8")]
    best = max((m for m in mounts if path.resolve().is_relative_to(m[1])), key=lambda m: len(m[1]))
    return best[2]


def test_tmp_path_is_on_tmpfs_where_the_machine_has_one(tmp_path):
    if not TMP_PATH_ON_TMPFS:
        # No tmpfs with 2 GB free at /dev/shm, or the caller chose (PYTEST_DEBUG_TEMPROOT).
        assert os.environ.get("PYTEST_DEBUG_TEMPROOT") or not _tmpfs("/dev/shm", 0) or \
            _filesystem(tmp_path) == _filesystem(Path("/tmp"))
        return
    assert _filesystem(tmp_path) == "tmpfs" and tmp_path.resolve().is_relative_to("/dev/shm")


def test_a_test_cluster_goes_beside_tmp_path_and_a_gone_runs_cluster_is_removed(monkeypatch, tmp_path):
    from tests.helpers import servers

    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", "/dev/shm/not-the-tmpfs-root")
    assert servers.cluster_base() is None   # tempfile's directory, as before
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(servers, "TMPFS_TEMPROOT", str(root))
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(root))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()   # its pid no longer exists (reaped)
    stale = root / f"hearth-pg-{gone.pid}-abc"
    live = root / f"hearth-pg-{os.getppid()}-def"   # a run that still exists
    other = root / "hearth-pg-notapid-ghi"
    for d in (stale, live, other):
        (d / "data" / "base").mkdir(parents=True)
    base = servers.cluster_base()
    assert base is not None and base.parent == root and base.name.startswith(f"hearth-pg-{os.getpid()}-")
    assert not stale.exists() and live.exists() and other.exists()
