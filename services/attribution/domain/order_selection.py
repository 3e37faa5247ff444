r"""Choosing the Markov order from the data: held-out conversion prediction.

``order="auto"`` asks which order's chain best predicts whether a *held-out* journey
converts. A journey that ended in state ``s`` (its last ``k`` channels at order ``k``,
under the same repeat/warm-up conventions as the attribution) converted with the
chain's probability of the conversion edge given that the walk stops there,

.. math::  \hat p_s = \frac{n^{conv}_s + a\,\pi}{n^{conv}_s + n^{null}_s + a}

estimated on the training folds, smoothed toward the training conversion rate
``pi`` with ``a = 1`` pseudo-journey so a state never seen in training predicts ``pi``
(higher orders see more unseen states; that is their cost out of sample). The score
of an order is the mean log loss over the held-out journeys of ``folds``-fold cross
validation; the lowest mean wins. Journeys, not path rows, are split: a row with
``c`` conversions and ``n`` nulls sends each of its journeys to a uniformly random
fold (a multinomial split), so grouped and ungrouped files get the same folds in
distribution; rows with fractional weights (person-level splits) go whole to a fold.

Reported: every candidate's mean log loss and its standard error over folds, the
winner, and its margin over the runner-up and over order 1 with the standard error
of the paired per-fold difference (a margin within ~2 SE is not a clear win).
Non-converting journeys are required (a classifier needs both outcomes), as for
ChannelAttribution's ``choose_order``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.markov import MAX_ORDER, MarkovConventions, _check_key_space, _state_sequences
from services.attribution.domain.paths import Paths
from services.common.client import check_serving_deadline

DEFAULT_FOLDS = 5
PSEUDO_JOURNEYS = 1.0
_EPS = 1e-12


@dataclass(frozen=True)
class OrderSelection:
    chosen: int
    candidates: tuple[int, ...]
    log_loss: dict[int, float]
    log_loss_se: dict[int, float]
    margin: float              # runner-up's loss minus the winner's (0 with one candidate)
    margin_se: float
    margin_vs_order1: float
    margin_vs_order1_se: float
    folds: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen, "candidates": list(self.candidates),
            "log_loss": {str(k): v for k, v in self.log_loss.items()},
            "log_loss_se": {str(k): v for k, v in self.log_loss_se.items()},
            "margin": self.margin, "margin_se": self.margin_se,
            "margin_vs_order1": self.margin_vs_order1, "margin_vs_order1_se": self.margin_vs_order1_se,
            "folds": self.folds, "seed": self.seed,
            "at_upper_bound": self.chosen == max(self.candidates) and len(self.candidates) > 1,
            "criterion": "held-out log loss of the journey's conversion given its last state",
        }


def split_journeys(paths: Paths, folds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(conversions, nulls) of every path in every fold, each (n_paths, folds)."""
    c, n = paths.conversions, paths.nulls
    integral = (c == np.round(c)) & (n == np.round(n))
    p = np.full(folds, 1.0 / folds)
    cf = np.zeros((paths.n_paths, folds))
    nf = np.zeros((paths.n_paths, folds))
    cf[integral] = rng.multinomial(c[integral].astype(np.int64), p)
    nf[integral] = rng.multinomial(n[integral].astype(np.int64), p)
    frac = np.flatnonzero(~integral)
    fold = rng.integers(0, folds, frac.size)
    cf[frac, fold] = c[frac]
    nf[frac, fold] = n[frac]
    return cf, nf


def _last_states(paths: Paths, conventions: MarkovConventions) -> np.ndarray:
    base = _check_key_space(paths.n_channels, conventions.order)
    keys, offsets = _state_sequences(paths, conventions, base)
    _, ids = np.unique(keys[offsets[1:] - 1], return_inverse=True)
    return ids.ravel()


def _fold_losses(last: np.ndarray, cf: np.ndarray, nf: np.ndarray) -> np.ndarray:
    """Mean held-out log loss of each fold."""
    n_states = int(last.max()) + 1 if last.size else 0
    folds = cf.shape[1]
    conv_sf = np.stack([np.bincount(last, weights=cf[:, f], minlength=n_states) for f in range(folds)], axis=1)
    null_sf = np.stack([np.bincount(last, weights=nf[:, f], minlength=n_states) for f in range(folds)], axis=1)
    conv_s, null_s = conv_sf.sum(axis=1), null_sf.sum(axis=1)
    out = np.zeros(folds)
    for f in range(folds):
        tc, tn = conv_s - conv_sf[:, f], null_s - null_sf[:, f]
        pi = tc.sum() / max(tc.sum() + tn.sum(), _EPS)
        p_hat = np.clip((tc + PSEUDO_JOURNEYS * pi) / (tc + tn + PSEUDO_JOURNEYS), _EPS, 1 - _EPS)
        p = p_hat[last]
        loss = -(cf[:, f] * np.log(p) + nf[:, f] * np.log1p(-p)).sum()
        weight = cf[:, f].sum() + nf[:, f].sum()
        out[f] = loss / weight if weight > 0 else np.nan
    return out


def choose_order(
    paths: Paths,
    conventions: MarkovConventions | None = None,
    *,
    max_order: int = MAX_ORDER,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> OrderSelection:
    """Cross-validated order choice (see module doc); ``conventions.order`` is ignored."""
    conventions = conventions or MarkovConventions()
    if not isinstance(max_order, (int, np.integer)) or not 1 <= max_order <= MAX_ORDER:
        raise AttributionInputError("max_order", f"must be an integer in 1..{MAX_ORDER}")
    if not isinstance(folds, (int, np.integer)) or not 2 <= folds <= 20:
        raise AttributionInputError("folds", "must be an integer in 2..20")
    data = paths.without_empty()
    if not conventions.include_nulls or data.nulls.sum() <= 0 or data.conversions.sum() <= 0:
        raise AttributionInputError(
            "order", "'auto' needs converting and non-converting journeys (total_null, include_nulls)"
        )
    cf, nf = split_journeys(data, folds, np.random.default_rng(seed))
    per_fold: dict[int, np.ndarray] = {}
    for k in range(1, max_order + 1):
        check_serving_deadline()
        try:
            last = _last_states(data, replace(conventions, order=k, horizon=None))
        except AttributionInputError:
            break  # the key space of more channels x order overflows: stop here
        per_fold[k] = _fold_losses(last, cf, nf)
    mean = {k: float(np.nanmean(v)) for k, v in per_fold.items()}
    se = {k: float(np.nanstd(v, ddof=1) / np.sqrt(np.isfinite(v).sum())) for k, v in per_fold.items()}
    ranked = sorted(mean, key=lambda k: (mean[k], k))
    best = ranked[0]

    def diff(a: int, b: int) -> tuple[float, float]:
        d = per_fold[a] - per_fold[b]
        return float(np.nanmean(d)), float(np.nanstd(d, ddof=1) / np.sqrt(np.isfinite(d).sum()))

    margin, margin_se = diff(ranked[1], best) if len(ranked) > 1 else (0.0, 0.0)
    m1, m1_se = diff(1, best)
    return OrderSelection(best, tuple(per_fold), mean, se, margin, margin_se, m1, m1_se, folds, seed)
