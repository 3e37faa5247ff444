"""scripts/fresh_machine_drill.sh, the README's two commands in a Debian root made from
nothing (docs/operations.md, "Provisioning a fresh machine"). The drill itself needs root,
debootstrap and the network for about 15 minutes, so it is run by hand before a release;
these tests hold its guards: it refuses, without touching anything, to run as another user,
without debootstrap, or into a directory that exists."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fresh_machine_drill.sh"


def _run(tmp_path: Path, uid: int, debootstrap: bool, root: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "mkdir"):
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    shim = bin_dir / "id"
    shim.write_text(f"#!/bin/bash\n[ \"$1\" = -u ] && echo {uid}\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    marker = tmp_path / "debootstrap-ran"
    boot = bin_dir / "debootstrap"
    boot.unlink(missing_ok=True)
    if debootstrap:
        boot.write_text(f"#!/bin/bash\n/bin/touch {marker}\nexit 1\n")
        boot.chmod(boot.stat().st_mode | stat.S_IXUSR)
    return subprocess.run([shutil.which("bash"), str(SCRIPT), str(root)], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=30)


def test_refuses_another_user(tmp_path):
    done = _run(tmp_path, 1000, True, tmp_path / "root")
    assert done.returncode == 2 and "run as root" in done.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "debootstrap-ran").exists()


def test_refuses_without_debootstrap(tmp_path):
    done = _run(tmp_path, 0, False, tmp_path / "root")
    assert done.returncode == 2 and "debootstrap" in done.stderr and not (tmp_path / "root").exists()


def test_refuses_a_directory_that_exists(tmp_path):
    existing = tmp_path / "root"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    done = _run(tmp_path, 0, True, existing)
    assert done.returncode == 2 and "exists" in done.stderr
    assert (existing / "keep").read_text() == "mine" and not (tmp_path / "debootstrap-ran").exists()
