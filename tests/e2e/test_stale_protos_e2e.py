"""Generated code older than protos/ (a merge changed a .proto, `make protos` not re-run).

Session 28 saw `scripts/run.py` start such a checkout's old code: privacy crashed at start
(AttributeError: no DATA_KEY_OUTCOME_ERASED) and the mesh went down with "privacy exited
with code 1". Now `scripts/run.py` regenerates first, as `make run` does, and a service or
the `hearth` CLI started on stale code stops with one line naming the command
(scripts/gen_protos.py: the digest of the protos in `hearth/__init__.py`).

The checkout here is a copy of this one whose hearth/ was generated from the protos of
43a5077 (before privacy's GetDataKeys), the case session 28 met.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.common.child_process import spawn_tied
from services.testing.mesh import ROOT
from tests.helpers.history import require_commit

BEFORE_DATA_KEYS_BATCH = "43a5077"   # its protos lack DATA_KEY_OUTCOME_ERASED


def _stale_checkout(into: Path) -> Path:
    """A copy of this checkout (code, scripts, protos) whose hearth/ is generated from
    43a5077's protos by this checkout's generator, then protos/ put back as they are now."""
    require_commit(BEFORE_DATA_KEYS_BATCH)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("services", "gateway", "scripts", "protos"):
        shutil.copytree(ROOT / part, into / part, ignore=ignore)
    shutil.rmtree(into / "protos")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_DATA_KEYS_BATCH, "protos"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, str(into / "scripts" / "gen_protos.py")], check=True,
                   capture_output=True, cwd=into)
    shutil.rmtree(into / "protos")
    shutil.copytree(ROOT / "protos", into / "protos")
    return into


@pytest.fixture(scope="module")
def stale(tmp_path_factory) -> Path:
    return _stale_checkout(tmp_path_factory.mktemp("stale-checkout"))


def _env(tree: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    # This copy's packages, not the checkout's the virtualenv points at.
    env["PYTHONPATH"] = str(tree)
    env["HEARTH_DATA_DIR"] = str(data_dir)
    return env


@pytest.mark.parametrize("command", [["-m", "services.privacy"], ["-m", "services.cli", "backup", "--help"],
                                     ["-m", "gateway"]],
                         ids=["privacy", "hearth-cli", "gateway"])
def test_a_process_on_stale_generated_code_stops_in_one_line_naming_the_command(stale, tmp_path, command):
    ran = subprocess.run([sys.executable, *command], cwd=stale, env=_env(stale, tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert "generated from other protos" in lines[0] and "`make protos`" in lines[0], ran.stderr
    assert str(stale / "protos") in lines[0], ran.stderr


def test_run_py_regenerates_stale_code_and_the_mesh_comes_up(tmp_path):
    stale = _stale_checkout(tmp_path / "tree")   # its own: this test makes it current
    run = spawn_tied([sys.executable, "scripts/run.py", "--data-dir", str(tmp_path / "var"), "--free-ports"],
                     cwd=stale, env=_env(stale, tmp_path), stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ended = threading.Event()
    up = threading.Event()

    def read() -> None:
        for line in run.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                up.set()
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert up.wait(240), "scripts/run.py did not come up:\n" + "".join(lines)
        out = "".join(lines)
        assert re.search(r"generated from other protos .*: regenerating it", out), out
        assert re.search(r"privacy\s+grpc 127\.0\.0\.1:\d+ .* SERVING", out), out
    finally:
        run.send_signal(signal.SIGINT)
        try:
            run.wait(120)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait(30)
    # The checkout's code is current now: the same process starts as it is.
    ran = subprocess.run([sys.executable, "-m", "services.cli", "backup", "--help"], cwd=stale,
                         env=_env(stale, tmp_path), capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
