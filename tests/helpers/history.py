"""A test that runs an older release beside this tree takes it from the repository's own
history (git archive): a shallow clone or an unpacked tarball has none, and such a test
must fail saying so, not be skipped (.ci/run fails rather than skips)."""

from __future__ import annotations

import subprocess

import pytest

from services.testing.mesh import ROOT


def require_commit(ref: str) -> None:
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"commit {ref} (the release this rolling-upgrade test runs beside this one) "
                    f"is not in {ROOT}'s history: a shallow clone or a tarball? Clone the whole history "
                    "(git fetch --unshallow) to run the suite.")
