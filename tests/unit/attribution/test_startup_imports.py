"""The attribution process starts without SciPy (session 22): scipy.sparse was ~0.25 of
its ~0.8 CPU-s of imports at every start (every mesh the suite starts, every pod), and
only computing an attribution uses it, so it is imported there
(services/common/lazy_import.py)."""

from __future__ import annotations

import numpy as np

from services.common.lazy_import import lazy_module
from tests.unit.clustering.test_startup_imports import _loaded_after


def test_the_service_starts_without_scipy_and_an_attribution_imports_it():
    assert _loaded_after("import services.attribution.__main__", ("scipy",)) == []
    assert _loaded_after(
        "from services.attribution.domain import markov\n"
        "from services.attribution.domain.paths import Paths\n"
        "paths = Paths.from_lists([['email', 'search'], ['search']], [1.0, 0.0], nulls=[0.0, 1.0])\n"
        "print(markov.removal_effects(markov.build_chain(paths)))", ("scipy.sparse",)) == ["scipy.sparse"]


def test_a_lazy_module_is_the_module_at_its_first_use_and_keeps_what_it_read():
    sparse = lazy_module("scipy.sparse")
    import scipy.sparse
    assert sparse.csr_matrix is scipy.sparse.csr_matrix and "csr_matrix" in vars(sparse)
    m = sparse.csr_matrix(np.eye(2))
    assert isinstance(m, sparse.csr_matrix) and m.nnz == 2
    assert "scipy.sparse" in repr(sparse)
