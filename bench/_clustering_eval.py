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


def bin_index(conf: np.ndarray, bins: int = 15) -> np.ndarray:
    """The bin of each confidence, as ``ece`` bins them."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top label, equal-width bins."""
    if conf.size == 0:
        return float("nan")
    idx = bin_index(conf, bins)
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


def household_bootstrap(conf: np.ndarray, right: np.ndarray, account: np.ndarray, reps: int = 200,
                        seed: int = 0, bins: int = 15, sizes: tuple[int, ...] = ()) -> dict[str, float]:
    """The ECE's noise over households (issue #10, ece35): ``account`` names each answer's
    household; the households are resampled with replacement ``reps`` times (one generator
    seeded ``seed``), each draw keeping a household's answers together, since its misses are
    one household's. ``boot_*``: the ECE's spread over the draws (``boot_p025``–``boot_p975``:
    a percentile range, not a confidence interval: an ECE resampled runs high, so the
    measured ECE can sit below it); ``clustered_floor``: the mean of sum_b (W*_b / W*) |gap*_b - gap_b|
    over the draws, what a predictor with exactly the observed gap in every bin reads from
    the households' own spread (the ECE a calibrated predictor would show on this many
    households; ``ece_floor`` is its value when every answer is its own household);
    ``clustered_floor_at_households``: the same for samples of m households like these, m in
    ``sizes`` (drawn with replacement); ``debiased``: 2 * ECE - mean bootstrap ECE."""
    idx = bin_index(conf, bins)
    names, inverse = np.unique(account, return_inverse=True)
    h = names.size
    # per household, per bin: answers, summed confidence, summed right
    cnt = np.zeros((h, bins))
    sc = np.zeros((h, bins))
    sr = np.zeros((h, bins))
    np.add.at(cnt, (inverse, idx), 1.0)
    np.add.at(sc, (inverse, idx), conf)
    np.add.at(sr, (inverse, idx), right.astype(float))
    base_n = cnt.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        base_gap = np.where(base_n > 0, (sc.sum(axis=0) - sr.sum(axis=0)) / np.maximum(base_n, 1), 0.0)
    rng = np.random.default_rng(seed)
    eces, floors = [], []
    for _ in range(reps):
        k = np.bincount(rng.integers(0, h, h), minlength=h).astype(float)
        n_b = k @ cnt
        total = n_b.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(n_b > 0, (k @ sc - k @ sr) / np.maximum(n_b, 1), 0.0)
        eces.append(float(np.sum(n_b * np.abs(gap)) / total))
        floors.append(float(np.sum(n_b * np.abs(gap - base_gap)) / total))
    observed = ece(conf, right, bins)
    # the same floor for a sample of m households like these (m drawn with replacement)
    at = {}
    for m in sizes:
        f = []
        for _ in range(max(reps // 4, 20)):
            k = np.bincount(rng.integers(0, h, m), minlength=h).astype(float)
            n_b = k @ cnt
            with np.errstate(invalid="ignore", divide="ignore"):
                gap = np.where(n_b > 0, (k @ sc - k @ sr) / np.maximum(n_b, 1), 0.0)
            f.append(float(np.sum(n_b * np.abs(gap - base_gap)) / n_b.sum()))
        at[str(m)] = round(float(np.mean(f)), 4)
    return {"ece": round(observed, 4), "clustered_floor_at_households": at, "boot_mean": round(float(np.mean(eces)), 4),
            "boot_sd": round(float(np.std(eces)), 4), "boot_p05": round(float(np.quantile(eces, 0.05)), 4),
            "boot_p95": round(float(np.quantile(eces, 0.95)), 4),
            "boot_p025": round(float(np.quantile(eces, 0.025)), 4),
            "boot_p975": round(float(np.quantile(eces, 0.975)), 4),
            "debiased": round(2 * observed - float(np.mean(eces)), 4),
            "clustered_floor": round(float(np.mean(floors)), 4),
            "clustered_floor_p95": round(float(np.quantile(floors, 0.95)), 4), "households": int(h)}
