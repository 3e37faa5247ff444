"""Shared evaluation helpers for bench/accuracy.py (metrics with Hungarian matching)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def match(truth: np.ndarray, pred: np.ndarray, n_pred: int | None = None) -> np.ndarray:
    """map[pred component] -> truth person (or -1), maximising matched sessions."""
    n_pred = int(max(pred.max() + 1 if pred.size else 0, n_pred or 0))
    n_true = int(truth.max() + 1)
    C = np.zeros((n_pred, n_true))
    np.add.at(C, (pred, truth), 1)
    r, c = linear_sum_assignment(-C)
    out = np.full(n_pred, -1)
    out[r] = c
    return out


def matched_correct(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    m = match(truth, pred)
    return m[pred] == truth


def brier_ece_parts(truth: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per session: multi-class Brier (probabilities mapped to truth persons by the
    Hungarian match of argmax labels; mass on unmatched components counts as wrong),
    top-label confidence, correctness."""
    pred = P.argmax(axis=1)
    m = match(truth, pred, P.shape[1])
    n_true = int(truth.max() + 1)
    Q = np.zeros((P.shape[0], n_true + 1))
    for comp, person in enumerate(m):
        Q[:, person if person >= 0 else n_true] += P[:, comp]
    Y = np.zeros_like(Q)
    Y[np.arange(P.shape[0]), truth] = 1.0
    brier = ((Q - Y) ** 2).sum(axis=1)
    conf = P.max(axis=1)
    correct = m[pred] == truth
    return brier, conf, correct


def probability_figures(truths, probs) -> dict:
    """Brier (multi-class and top-label) and ECE over households: ``truths`` the true
    person of each session per household, ``probs`` the (sessions, persons) answers."""
    parts = [brier_ece_parts(truth, P) for truth, P in zip(truths, probs)]
    brier = np.concatenate([p[0] for p in parts])
    conf = np.concatenate([p[1] for p in parts])
    correct = np.concatenate([p[2] for p in parts])
    return {"brier": float(brier.mean()), "brier_top_label": float(np.mean((conf - correct) ** 2)),
            "ece": ece(conf, correct), "mean_confidence": float(conf.mean())}


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top label, equal-width bins."""
    if conf.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(conf[sel].mean() - correct[sel].mean())
    return float(total / conf.size)


def ece_floor(conf: np.ndarray, reps: int = 20, seed: int = 0, bins: int = 15) -> float:
    """The ECE's own noise on these confidences: the mean ``ece`` of answers drawn right
    with exactly their stated confidence (Bernoulli(conf)), ``reps`` draws from one
    generator seeded ``seed``. No calibrator gets below it on a sample of this size; an
    ECE is read against it (about 0.010 on the 60 households' ~7,000-9,000 held-out
    answers, 0.013 on their streams' at-arrival answers)."""
    conf = np.asarray(conf, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(conf, rng.random(conf.size) < conf, bins) for _ in range(reps)]))
