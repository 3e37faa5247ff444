"""bench/feedback_tuning.py's sweep: answers pooled as after_feedback pools them, each
candidate scored on the answers that did not get feedback."""

from __future__ import annotations

import pickle

import numpy as np

from bench import feedback_tuning


def _household(rng: np.random.Generator, n: int, bias: float) -> dict:
    person = rng.integers(0, 2, n)
    c = rng.uniform(0.55, 0.95, n)
    right = rng.random(n) < np.clip(c - bias, 0, 1)
    top = np.where(right, person, 1 - person)
    P = np.zeros((n, 2))
    P[np.arange(n), top] = c
    P[np.arange(n), 1 - top] = 1 - c
    return {"id": "h", "family": "f", "person": person, "batch": P, "stream": P.copy()}


def test_sweep_scores_every_candidate_on_held_out_answers(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "answers.pkl"
    with open(path, "wb") as f:   # answers 0.15 too sure: the level calibrator must help
        pickle.dump({"households": [], "rows": [_household(rng, 400, 0.15) for _ in range(20)]}, f)
    report = feedback_tuning.sweep([str(path)], draws=3, names=["identity", "service"], distort=(0.0, -0.1))
    assert set(report) == {f"{path}:batch", f"{path}:stream", f"{path}:batch@-0.10", f"{path}:stream@-0.10"}
    pool = report[f"{path}:batch"]
    assert pool["answers"] == 8000 and pool["confidence"] - pool["accuracy"] > 0.1
    assert pool["service"]["mean"] < pool["identity"]["mean"] / 2
    # Moved 0.10 down, the answers are only ~0.05 too sure: identity gets better.
    assert report[f"{path}:batch@-0.10"]["identity"]["mean"] < pool["identity"]["mean"] - 0.05
