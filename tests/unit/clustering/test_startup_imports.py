"""The clustering process starts without scikit-learn and scipy.optimize (session 20):
they were ~1 CPU-s of its ~1.4 s of imports at every start (docs/benchmarks.md "##
bench-assign", perf20) and only a fit uses them (placement's logistic regression, the
Hungarian matching of persons), so they are imported at the first fit; answering from a
stored model never needs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("sklearn", "scipy.optimize", "scipy.stats", "pandas")


def _loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    run = subprocess.run([sys.executable, "-c", code + f"\nimport json, sys\nprint(json.dumps([m for m in {modules!r} "
                                                      "if m in sys.modules]))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_service_imports_neither_scikit_learn_nor_scipy_optimize_to_start():
    assert _loaded_after("import services.clustering.__main__") == []


def test_a_stored_model_answers_without_them_and_the_fits_parts_that_need_them_work(tmp_path):
    from services.clustering.domain import features as F
    from services.clustering.domain import model as M
    from services.clustering.domain.placement import discriminative_responsibilities
    from services.clustering.domain.simulator import simulate_population

    h = [h for h in simulate_population(6, seed=21, drift_fraction=0.0) if h.n_persons >= 2][0]
    fitted = M.HouseholdModel().fit(h.features)
    assert len(fitted.person_ids) >= 2
    (tmp_path / "model.bin").write_bytes(fitted.to_bytes())
    np.save(tmp_path / "x.npy", h.features[:5])
    assert _loaded_after(
        "import numpy as np\n"
        "from services.clustering.domain.model import HouseholdModel\n"
        f"m = HouseholdModel.from_bytes(open({str(tmp_path / 'model.bin')!r}, 'rb').read())\n"
        f"assert m.assign_batch(np.load({str(tmp_path / 'x.npy')!r})).probabilities.shape[0] == 5") == []
    # what a fit imports when it needs it: placement's classifier, the Hungarian matching
    rng = np.random.default_rng(0)
    X = rng.random((60, F.FEATURE_DIM))
    known = np.where(np.arange(60) < 20, 0, np.where(np.arange(60) < 40, 1, -1))
    R = discriminative_responsibilities(X, known, np.arange(60) % 2, 2)
    assert R is not None and R.shape == (60, 2) and np.allclose(R.sum(axis=1), 1.0)
    rows, cols = M._linear_sum_assignment(-np.array([[1.0, 5.0], [4.0, 1.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
