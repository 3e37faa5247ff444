"""The whole feedback loop on two small TUNING households, for the bench tools that re-score
``bench.label_feedback --cache`` answers (bench.feedback_methods, bench.feedback_decompose):
their figure must be ``mesh_after_feedback``'s on the same answers."""

from __future__ import annotations

import numpy as np


def whole_loop_cases(draws: int = 2):
    """Per mode ("batch": feedback given on answers before any label; "stream": as served at
    arrival), yield (mode, households, the cached answers as bench.label_feedback stores them,
    ``mesh_after_feedback``'s report). After the labels one household's answers are sharper and
    stamped label-shaped."""
    from bench import _worlds_eval as E
    from bench import worlds as W
    hs = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=2)
    fed = E.feedback_draws(hs, draws=draws)
    probs = [E.hearth_batch(h)[1] for h in hs]
    sharper = [E.FedAnswers(p ** (1.0 + i) / (p ** (1.0 + i)).sum(axis=1, keepdims=True), np.ones(p.shape[0], bool),
                            np.full(p.shape[0], "label" if i else "", dtype=object)) for i, p in enumerate(probs)]
    for mode, before in (("batch", True), ("stream", False)):
        outs = [{mode: p, f"fed_{mode}": [s] * draws} for p, s in zip(probs, sharper)]
        ages = E.model_ages(hs, mode)
        loop = E.mesh_after_feedback(hs, probs, [o[f"fed_{mode}"] for o in outs], fed, ages, sample_before=before)
        yield mode, hs, outs, loop
