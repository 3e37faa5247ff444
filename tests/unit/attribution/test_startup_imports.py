"""The attribution process starts without SciPy (session 22): scipy.sparse was ~0.25 of
its ~0.8 CPU-s of imports at every start (every mesh the suite starts, every pod), and
only computing an attribution uses it, so it is imported there
(services/common/lazy_import.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from services.common.lazy_import import lazy_module

ROOT = Path(__file__).resolve().parents[3]


def _scipy_after(code: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
                                                       "if m == 'scipy' or m.startswith('scipy.'))))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_service_starts_without_scipy_and_an_attribution_imports_it():
    assert _scipy_after("import services.attribution.__main__") == []
    assert "scipy.sparse" in _scipy_after(
        "from services.attribution.domain import markov\n"
        "from services.attribution.domain.paths import Paths\n"
        "paths = Paths.from_lists([['email', 'search'], ['search']], [1.0, 0.0], nulls=[0.0, 1.0])\n"
        "print(markov.removal_effects(markov.build_chain(paths)))")


def test_a_lazy_module_is_the_module_at_its_first_use_and_keeps_what_it_read():
    sparse = lazy_module("scipy.sparse")
    import scipy.sparse
    assert sparse.csr_matrix is scipy.sparse.csr_matrix and "csr_matrix" in vars(sparse)
    m = sparse.csr_matrix(np.eye(2))
    assert isinstance(m, sparse.csr_matrix) and m.nnz == 2
    assert "scipy.sparse" in repr(sparse)
