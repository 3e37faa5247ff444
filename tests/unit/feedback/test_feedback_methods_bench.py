"""bench.feedback_methods: the maps a deployment fits on its own labels, their strength chosen
by cross-validation on those labels (issue #10, ece32; docs/feedback.md)."""

from __future__ import annotations

import numpy as np

from bench import feedback_methods as M


def _answers(n: int, a: float, b: float, seed: int = 0):
    """Confidences and outcomes right with probability sigmoid(a + b logit c)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.3, 0.95, n)
    truth = 1.0 / (1.0 + np.exp(-(a + b * M._logit(c))))
    return c, (rng.random(n) < truth).astype(float)


def test_the_logit_linear_fit_recovers_the_map_the_outcomes_were_drawn_from():
    c, y = _answers(20_000, 0.4, 1.5)
    a, b = M.fit_platt(c, y)
    assert abs(a - 0.4) < 0.1 and abs(b - 1.5) < 0.1


def test_cross_validation_mostly_keeps_the_shipped_map_for_answers_already_calibrated():
    # 400 labels (a deployment's 3.75 %): out of fold, a map fitted on noise seldom helps, so
    # most samples keep alpha = 0; some do not (the choice is itself noisy: docs/feedback.md)
    for family in M.FAMILIES:
        alphas = [M.cv_alpha(*_answers(400, 0.0, 1.0, seed=s), family)[0] for s in range(10)]
        assert np.mean(np.asarray(alphas) == 0.0) >= 0.5 and np.mean(alphas) <= 0.3, (family, alphas)


def test_cross_validation_applies_a_miss_far_beyond_the_labels_noise_in_full():
    c, y = _answers(400, 1.0, 1.0, seed=4)   # about 0.1-0.2 under-confident: ~5 standard errors
    for family in M.FAMILIES:
        alpha, _ = M.cv_alpha(c, y, family)
        assert alpha >= 0.75, (family, alpha)
        f, _ = M.fitted_map(c, y, family)
        assert abs(np.mean(f(c)) - y.mean()) < abs(c.mean() - y.mean()) / 2


def test_its_mesh_is_the_whole_loops_figure_in_batch_and_in_streams():
    """The service's grouped calibrator scored by the tool equals mesh_after_feedback's on the
    same answers, per draw, whether the feedback was given on answers before any label (batch)
    or as served at arrival (streams: fitted on the answers after the labels, in their group)."""
    from bench.feedback_shipped import draws_of
    from tests.helpers.feedback_loop import whole_loop_cases
    for mode, hs, outs, loop in whole_loop_cases():
        scored = [M.score_draw(d, mode) for d in draws_of("tuning", hs, outs, 2, mode)]
        assert [round(s["mesh"], 12) for s in scored] == [round(x, 12) for x in loop["per_draw"]["mesh"]], mode
