"""A test that runs a command in process leaves its umask to no later test (tests/conftest.py
``_the_runs_umask``; review30 R21: `hearth backup`/`restore` called through ``cli.main`` left
077 for the rest of the worker, and the next test's files were private). The two tests run in
this order in one process (one file goes to one worker, in file order)."""

from __future__ import annotations

import os

from services.common import config
from tests.conftest import RUN_UMASK


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_command_in_process_makes_new_files_private():
    config.keep_files_private()
    assert _current_umask() == RUN_UMASK | config.PRIVATE_UMASK
    # A run started private already (umask 077) would see no change above: leave a umask
    # that differs from the run's in any case (review30 R35).
    os.umask(RUN_UMASK ^ 0o007)


def test_the_next_test_starts_with_the_runs_umask():
    assert _current_umask() == RUN_UMASK
