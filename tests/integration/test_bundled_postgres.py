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


def _locked_bundle(tmp_path):
    """The bundled server's binaries copied under a folder only root may enter."""
    installed = bundled_postgres16()
    package = next(p for p in installed.parents if p.name == "pgserver")
    locked = tmp_path / "locked" / "site-packages"
    shutil.copytree(package / "pginstall", locked / "pgserver" / "pginstall", symlinks=True)
    if (package.parent / "pgserver.libs").is_dir():
        shutil.copytree(package.parent / "pgserver.libs", locked / "pgserver.libs", symlinks=True)
    (tmp_path / "locked").chmod(0o700)
    return locked / "pgserver" / "pginstall" / "bin"


def test_binaries_in_a_folder_only_root_may_enter_are_run_from_a_copy(tmp_path):
    bin_dir = _locked_bundle(tmp_path)
    usable = runnable_by_postgres(bin_dir)
    if os.geteuid() != 0:          # the servers run as ourselves: nothing to copy
        assert usable == bin_dir
        return
    assert not _runs(bin_dir)
    assert usable != bin_dir and _runs(usable)
    # initdb too: it finds its share/ and the wheel's libpq through the copy's layout.
    assert subprocess.run([str(usable / "initdb"), "--version"], capture_output=True,
                          **postgres_user()).returncode == 0


def test_the_copy_is_runnable_after_a_command_in_this_process_made_new_files_private(tmp_path):
    """review30: `hearth backup` / `restore` run in process by earlier tests (cli.main) call
    config.keep_files_private(), which leaves this process's umask at 077: the copy's
    directories made on the way (``<copy>/pgserver``) were then 0700, the postgres user could
    not run the copied binaries, and every PostgreSQL 16 test of a worker that had run such a
    test before failed — in a checkout the postgres user cannot enter (a fresh clone under
    mktemp -d), where every run takes the copy. Seen: this file after
    test_postgres_roles_two_servers.py (its `hearth backup`) failed with PermissionError."""
    from services.common import config

    bin_dir = _locked_bundle(tmp_path)
    before = os.umask(0o022)
    os.umask(before)
    try:
        config.keep_files_private()   # as `hearth backup` in this process leaves it
        usable = runnable_by_postgres(bin_dir)
    finally:
        os.umask(before)
    assert _runs(usable)
