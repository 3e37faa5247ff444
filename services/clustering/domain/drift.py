"""Per-household drift detection against a frozen reference mixture.

Two statistics run over the stream of new sessions (indices count monitored sessions):

1. **Surprise CUSUM.** Each session's negative log-likelihood under the reference
   mixture, standardised with the mean/std measured on held-out reference sessions:
   z_i = (-log p(x_i) - mu) / sigma (mu, sigma: median and 1.4826 MAD). One-sided CUSUM C_i = max(0, C_{i-1} + z_i - k)
   with allowance k = ``CUSUM_ALLOWANCE`` and z clipped at ``Z_CLIP`` (single
   outliers such as a trip must not accumulate); alarm when C_i > ``cusum_h``. The mean of
   -log p over a window minus mu estimates the excess cross-entropy, i.e. the increase of
   KL(recent || model) over its reference level (reported as ``kl_excess``).
2. **Composition KL.** Over the last ``window`` sessions, the mean posterior ŵ (who
   watched) against the model's weights w: G = 2 * window * KL(ŵ || w), asymptotically
   chi-square with K-1 degrees of freedom when nothing changed; alarm when G >
   ``kl_threshold``. It sees a person leaving, which the surprise cannot.

Thresholds are calibrated on simulated *stable* households (``calibrate``): each is set
at the (1 - alpha/2) quantile of the per-household maximum of its statistic over the
monitoring horizon, so that the per-household false-alarm rate is at most ~alpha
(union bound). The shipped defaults come from ``calibrate`` at alpha = 1 % on the
simulator's default difficulty (docs/clustering.md; bench/accuracy.py re-measures the
false-alarm rate on fresh households).

Event typing (heuristic, reported separately from detection): composition when the KL
statistic fires first or most alarming sessions look like nobody (z > ``NOVEL_Z``);
seasonal when the surprise rises for most persons together; otherwise a single person
changed: behavioural when the excess is mostly in the genre block, gradual when the
surprise keeps rising across the alarm window (positive trend), sudden otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from services.clustering.domain import features as F
from services.clustering.domain.gmm import Mixture

CUSUM_ALLOWANCE = 1.0
Z_CLIP = 3.0  # one outlying session (a trip, a guest) adds at most Z_CLIP - allowance
NOVEL_Z = 4.0
RECLUSTER_SEVERITY = 1.5


@dataclass(frozen=True)
class DriftThresholds:
    cusum_h: float = 26.8  # bench.accuracy --calibrate: 99.5 % quantile, 367 stable households
    kl_threshold: float = 23.7  # same, composition KL
    window: int = 40
    false_alarm_rate: float = 0.01  # per household over the calibration horizon
    horizon_sessions: int = 400


DEFAULT_THRESHOLDS = DriftThresholds()


@dataclass(frozen=True)
class DriftEvent:
    """``type`` in behavioural/composition/seasonal/gradual/sudden; ``severity`` =
    statistic / threshold (>= 1 at alarm); ``session_index`` = monitored session at
    which the alarm fired; ``change_index`` = CUSUM's estimate of where it started;
    ``recluster`` = severity high enough (or composition) to refit automatically."""

    type: str
    severity: float
    statistic: float
    statistic_name: str
    session_index: int
    change_index: int
    time: float | None
    recluster: bool
    kl_excess: float
    details: dict = field(default_factory=dict)


class DriftDetector:
    """Streaming detector for one household. ``reference`` is the frozen mixture;
    ``holdout`` are reference-period sessions the mixture was NOT fitted on (used for
    the standardisation of the surprise)."""

    def __init__(self, reference: Mixture, holdout: np.ndarray,
                 thresholds: DriftThresholds = DEFAULT_THRESHOLDS) -> None:
        holdout = np.asarray(holdout, dtype=np.float64)
        if holdout.ndim != 2 or holdout.shape[0] < 2:
            raise ValueError(f"holdout must hold at least 2 sessions, got shape {holdout.shape}")
        self.reference = reference
        self.thresholds = thresholds
        nll = self._nll(holdout)
        # Robust location/scale: one trip or guest session in the holdout must not
        # inflate sigma (median and 1.4826 * MAD, the normal-consistent MAD).
        self.mu = float(np.median(nll))
        self.sigma = float(max(1.4826 * np.median(np.abs(nll - self.mu)), 1.0))
        self.cusum = 0.0
        self.cusum_start = 0
        self.index = 0
        self.z_hist: list[float] = []
        self.post_hist: list[np.ndarray] = []
        self.block_hist: list[np.ndarray] = []
        self.alarmed = False

    def _nll(self, X: np.ndarray) -> np.ndarray:
        return -logsumexp(self.reference.log_joint(X), axis=1)

    def _blocks(self, X: np.ndarray, comp: np.ndarray) -> np.ndarray:
        """Per-session negative log-density split into (genre, rest) for the assigned
        component (the density is linear in phi, so blocks add up)."""
        phi = self.reference.family.phi(X)
        W = self.reference.W[comp]
        contrib = phi * W
        genre = contrib[:, 1 + F.GENRE.start:1 + F.GENRE.stop].sum(axis=1)
        return np.column_stack((-genre, -(contrib.sum(axis=1) - genre)))

    def update(self, X: np.ndarray, timestamps: Sequence[float] | None = None) -> list[DriftEvent]:
        """Feed new sessions in time order; returns the events raised (at most one per
        call; after an alarm the detector stays quiet until ``reset``)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != F.FEATURE_DIM:
            raise ValueError(f"X must have shape (N, {F.FEATURE_DIM}), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or infinite values")
        if timestamps is not None and len(timestamps) != X.shape[0]:
            raise ValueError("timestamps must match the sessions")
        if X.shape[0] == 0:
            return []
        lj = self.reference.log_joint(X)
        lse = logsumexp(lj, axis=1, keepdims=True)
        post = np.exp(lj - lse)
        z = np.minimum((-lse[:, 0] - self.mu) / self.sigma, Z_CLIP)
        blocks = self._blocks(X, post.argmax(axis=1))
        events: list[DriftEvent] = []
        th = self.thresholds
        logw = self.reference.log_weights
        w = np.exp(logw)
        for i in range(X.shape[0]):
            self.z_hist.append(float(z[i]))
            self.post_hist.append(post[i])
            self.block_hist.append(blocks[i])
            prev = self.cusum
            self.cusum = max(0.0, self.cusum + float(z[i]) - CUSUM_ALLOWANCE)
            if prev == 0.0 and self.cusum > 0.0:
                self.cusum_start = self.index
            kl_g = 0.0
            if len(self.post_hist) >= th.window:
                w_hat = np.mean(self.post_hist[-th.window:], axis=0) * 0.999 + 0.001 * w
                alive = w > 0
                kl_g = 2.0 * th.window * float(np.sum(w_hat[alive] * (np.log(w_hat[alive]) - logw[alive])))
            if not self.alarmed and (self.cusum > th.cusum_h or kl_g > th.kl_threshold):
                self.alarmed = True
                ts = float(timestamps[i]) if timestamps is not None else None
                events.append(self._event(kl_g, ts))
            self.index += 1
        return events

    def _event(self, kl_g: float, ts: float | None) -> DriftEvent:
        th = self.thresholds
        by_cusum = self.cusum > th.cusum_h
        if by_cusum:
            stat, name, sev = self.cusum, "surprise_cusum", self.cusum / th.cusum_h
            start = self.cusum_start
        else:
            stat, name, sev = kl_g, "composition_kl", kl_g / th.kl_threshold
            start = max(0, self.index - th.window + 1)
        z = np.array(self.z_hist[start:])
        post = np.array(self.post_hist[start:])
        blocks = np.array(self.block_hist[start:])
        kl_excess = float(np.mean(z) * self.sigma)
        novel = float(np.mean(z > NOVEL_Z))
        comp = post.argmax(axis=1)
        raised = [float(np.mean(z[comp == k])) for k in np.unique(comp) if np.sum(comp == k) >= 3]
        share_raised = float(np.mean(np.array(raised) > 1.0)) if raised else 0.0
        trend = float(np.polyfit(np.arange(z.size), z, 1)[0] * z.size) if z.size >= 5 else 0.0
        genre_excess = float(np.mean(blocks[:, 0]))
        rest_excess = float(np.mean(blocks[:, 1]))
        ref_blocks = np.array(self.block_hist[:start]) if start >= 5 else None
        if ref_blocks is not None:
            genre_excess -= float(np.mean(ref_blocks[:, 0]))
            rest_excess -= float(np.mean(ref_blocks[:, 1]))
        if not by_cusum or novel > 0.5:
            kind = "composition"
        elif share_raised >= 0.75 and len(raised) >= 2:
            kind = "seasonal"
        elif genre_excess > max(rest_excess, 0.0):
            kind = "behavioural"
        elif trend > 2.0:
            kind = "gradual"
        else:
            kind = "sudden"
        return DriftEvent(kind, float(sev), float(stat), name, self.index, int(start), ts,
                          kind == "composition" or sev >= RECLUSTER_SEVERITY, kl_excess,
                          {"novel_share": novel, "share_persons_raised": share_raised, "trend": trend,
                           "genre_excess": genre_excess, "rest_excess": rest_excess, "kl_statistic": kl_g})

    def reset(self) -> None:
        """After a re-cluster: start monitoring afresh (new reference expected)."""
        self.cusum, self.cusum_start, self.alarmed = 0.0, self.index, False


def stream_maxima(reference: Mixture, holdout: np.ndarray, stream: np.ndarray,
                  window: int = DEFAULT_THRESHOLDS.window) -> tuple[float, float]:
    """Maximum CUSUM and composition-KL statistics over a stream with no alarms (used
    for calibration)."""
    det = DriftDetector(reference, holdout, DriftThresholds(np.inf, np.inf, window))
    max_c = max_g = 0.0
    lj = reference.log_joint(stream)
    lse = logsumexp(lj, axis=1, keepdims=True)
    post = np.exp(lj - lse)
    z = np.minimum((-lse[:, 0] - det.mu) / det.sigma, Z_CLIP)
    c = 0.0
    for zi in z:
        c = max(0.0, c + zi - CUSUM_ALLOWANCE)
        max_c = max(max_c, c)
    w = np.exp(reference.log_weights)
    alive = w > 0
    if post.shape[0] >= window:
        csum = np.cumsum(np.vstack((np.zeros(post.shape[1]), post)), axis=0)
        w_hat = (csum[window:] - csum[:-window]) / window * 0.999 + 0.001 * w
        g = 2.0 * window * np.sum(w_hat[:, alive] * (np.log(w_hat[:, alive]) - reference.log_weights[alive]), axis=1)
        max_g = float(g.max())
    return max_c, max_g


def calibrate(maxima: Sequence[tuple[float, float]], alpha: float = 0.01,
              window: int = DEFAULT_THRESHOLDS.window, horizon: int = 400) -> DriftThresholds:
    """Thresholds from stable households' stream maxima: each statistic at its
    (1 - alpha/2) empirical quantile (union bound -> per-household false alarms <= alpha)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arr = np.asarray(maxima, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 10:
        raise ValueError("maxima must hold at least 10 (cusum, kl) pairs")
    q = 1.0 - alpha / 2.0
    return DriftThresholds(float(np.quantile(arr[:, 0], q)), float(np.quantile(arr[:, 1], q)),
                           window, alpha, horizon)


def build_detector(X_reference: np.ndarray, family=None, k_max: int = 6, seed: int = 0,
                   holdout_fraction: float = 0.25,
                   thresholds: DriftThresholds = DEFAULT_THRESHOLDS) -> DriftDetector:
    """Reference mixture fitted on the first (1 - holdout_fraction) of the reference
    sessions (time order), standardisation measured on the rest (out of sample)."""
    from services.clustering.domain.gmm import fit_select_k

    X_reference = np.asarray(X_reference, dtype=np.float64)
    n = X_reference.shape[0]
    n_hold = max(2, int(round(holdout_fraction * n)))
    if n - n_hold < 5:
        raise ValueError(f"X_reference needs at least {n_hold + 5} sessions, got {n}")
    sel = fit_select_k(X_reference[: n - n_hold], k_max, family, seed)
    return DriftDetector(sel.model, X_reference[n - n_hold:], thresholds)
