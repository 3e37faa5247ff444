"""A household's model is the same whether it is the first thing a process fits or comes
after other households (bench/repro.py; docs/benchmarks.md, "A household's model does not
depend on the process's history"): nothing a fit leaves behind — random state, caches,
fitted state — reaches the next household's fit."""

from __future__ import annotations

import copy

import pytest

from bench import repro
from bench import worlds as W


@pytest.fixture(scope="module")
def bingers():
    # bing0h4: 64 sessions of two people, no personal device (the shared-only refit at 50
    # sessions); bing0h1: 34 sessions of one (a TV and a console)
    hs = W.generate(W.TUNING, families=("bingers",), worlds_per_family=1, households_per_world=5)   # world 0's first five
    return {h.household_id: h for h in hs}


def test_a_household_fitted_after_others_is_the_fresh_processs_model(bingers):
    a, b = bingers["bing0h4"], bingers["bing0h1"]
    fresh = repro.run_alone([a])["bing0h4"]      # a spawned interpreter: nothing ran before it
    repro.record(b)
    after = repro.record(a)                       # in this process, after b (and whatever ran before)
    assert repro.compare(fresh, after) is None
    # every answer and every selection's scores were compared: the stream refitted and chose
    assert fresh["scores"] and fresh["batch_scores"] and len(fresh["ids"]) == a.n_sessions


def test_the_comparison_sees_a_last_bit_difference(bingers):
    rec = repro.record(bingers["bing0h4"])
    other = copy.deepcopy(rec)
    other["settled_probs"][3][0] += 1e-15
    last = other["scores"][-1]
    last[next(iter(last))] -= 1e-9
    diff = repro.compare(rec, other)
    assert diff is not None and diff["fields"] == ["settled_probs", "scores"]
    assert 0 < diff["max_abs_prob_settled"] < 1e-14
    assert diff["max_abs_score"] == pytest.approx(1e-9, rel=1e-3)
