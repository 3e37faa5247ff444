"""The bundled PostgreSQL 16 (tests/helpers/servers.py ``bundled_postgres16``) runs from a
checkout the ``postgres`` user cannot enter: as root the servers run as that user, and a
fresh clone in a folder only root may enter (``mktemp -d``) would fail initdb there."""

from __future__ import annotations

import os
import shutil
import subprocess

from services.testing.servers import postgres_user
from tests.helpers.servers import bundled_postgres16, runnable_by_postgres


def _runs(bin_dir) -> bool:
    try:
        return subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                              **postgres_user()).returncode == 0
    except PermissionError:
        return False


def test_binaries_in_a_folder_only_root_may_enter_are_run_from_a_copy(tmp_path):
    installed = bundled_postgres16()
    package = next(p for p in installed.parents if p.name == "pgserver")
    locked = tmp_path / "locked" / "site-packages"
    shutil.copytree(package / "pginstall", locked / "pgserver" / "pginstall", symlinks=True)
    if (package.parent / "pgserver.libs").is_dir():
        shutil.copytree(package.parent / "pgserver.libs", locked / "pgserver.libs", symlinks=True)
    (tmp_path / "locked").chmod(0o700)
    bin_dir = locked / "pgserver" / "pginstall" / "bin"
    usable = runnable_by_postgres(bin_dir)
    if os.geteuid() != 0:          # the servers run as ourselves: nothing to copy
        assert usable == bin_dir
        return
    assert not _runs(bin_dir)
    assert usable != bin_dir and _runs(usable)
    # initdb too: it finds its share/ and the wheel's libpq through the copy's layout.
    assert subprocess.run([str(usable / "initdb"), "--version"], capture_output=True,
                          **postgres_user()).returncode == 0
