"""The evaluation worlds (bench/worlds.py) stay independent of the model, go through the
real session builder, and keep tuning and reporting apart."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from bench import worlds as W

ROOT = Path(__file__).resolve().parents[3]


def test_no_service_module_imports_the_evaluation_worlds():
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "bench" or n.startswith("bench.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_worlds_share_nothing_with_the_model_simulator():
    source = (ROOT / "bench" / "worlds.py").read_text()
    assert "simulator" not in {n for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
                               for n in (node.module or "").split(".")}


def test_tuning_and_reporting_never_share_seeds_and_some_families_are_held_out():
    assert W.TUNING.seed != W.REPORTING.seed
    assert set(W.HELD_OUT_FAMILIES) and not set(W.HELD_OUT_FAMILIES) & set(W.TUNING.families)
    assert set(W.REPORTING.families) == set(W.FAMILIES)


def test_households_come_from_the_session_builder_with_truth_and_devices():
    hs = W.generate(W.REPORTING, families=("mobile_first",), worlds_per_family=1, households_per_world=2)
    again = W.generate(W.REPORTING, families=("mobile_first",), worlds_per_family=1, households_per_world=1)
    assert np.array_equal(hs[0].features, again[0].features)  # a prefix of the same households
    for h in hs:
        assert h.features.shape == (h.n_sessions, 35) and h.person.shape == (h.n_sessions,)
        assert np.all(np.diff(h.start_ts) >= 0)
        assert set(h.person.tolist()) == set(range(h.n_persons))
        assert h.device_id.shape == (h.n_sessions,) and h.device_slots().max() < len(set(h.device_id))
