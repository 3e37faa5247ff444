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


def test_the_unknown_genre_knob_renames_genres_only_and_is_off_by_default():
    """``unknown_genre_share`` (TUNING worlds with many names outside the vocabulary)
    keeps the households — members, sessions, devices — and only renames genres; off
    (the default, what REPORTING uses) the world is exactly the one without the knob."""
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    plain, off, on = (W.make_world("living_room", rng(), "w", **kw)
                      for kw in ({}, {"unknown_genre_share": 0.0}, {"unknown_genre_share": 1.0}))
    assert off.catalogue_genres == plain.catalogue_genres
    assert all(g.endswith("~") for title in on.catalogue_genres for g in title if g not in W.CATALOGUE_GENRES[18:])
    assert [tuple(g.rstrip("~") for g in t) for t in on.catalogue_genres] == plain.catalogue_genres
    a = W.make_household(plain, np.random.default_rng(3), "h")
    b = W.make_household(on, np.random.default_rng(3), "h")
    assert (a.person == b.person).all() and (a.start_ts == b.start_ts).all() and (a.device_id == b.device_id).all()
    assert b.unknown_genre_share > max(0.9, a.unknown_genre_share)
    assert not np.allclose(a.features, b.features)                  # the names reach the vectors


def test_households_carry_each_sessions_end_and_series():
    """end_ts and series come from the session builder's sessions and their events: a
    session ends at or after it starts, and a binge family's households carry series ids
    (the evidence bench.evidence_probe measures)."""
    hs = W.generate(W.TUNING, families=("bingers",), worlds_per_family=1, households_per_world=2)
    for h in hs:
        assert h.end_ts.shape == (h.n_sessions,) and np.all(h.end_ts >= h.start_ts)
        assert len(h.series) == h.n_sessions
        assert all(list(s) == sorted(set(s)) for s in h.series)
    assert any(s for h in hs for s in h.series)
