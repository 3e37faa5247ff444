"""Incremental k-means: the simple, robust model and the GMM's fallback.

* Seeding: k-means++ (Arthur & Vassilvitskii 2007): first centre uniform, each next one
  drawn with probability proportional to the squared distance to the nearest chosen
  centre.
* Online update: sessions arrive in micro-batches (default 10). Each session of a batch
  is assigned to its nearest centroid (centroids as they were at the start of the batch);
  then each centroid moves by the per-centroid learning rate 1/(n+1) per session, n being
  the sessions it had absorbed before:  c <- c + (x - c) / (n + 1). Applied to m sessions
  in turn this is exactly the running mean (n c + sum x) / (n + m), which is how it is
  computed (vectorised).
* Probabilities: the posterior of a spherical Gaussian mixture with the fitted centroids,
  proportions n_k / N and one shared variance s^2 (the mean squared distance of the
  sessions to their centroid per dimension), optionally softened by a temperature:
  p_k(x) ∝ (n_k / N) * exp(-||x - c_k||^2 / (2 s^2 T)).
Distances are computed on ``scale``-weighted features so that no block dominates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp


def kmeans_plus_plus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (k, D) drawn from the rows of X. When fewer than k distinct rows
    exist the remaining seeds repeat existing rows (the caller's EM copes)."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if X.ndim != 2 or n == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    centers = np.empty((k, X.shape[1]))
    centers[0] = X[rng.integers(n)]
    d2 = ((X - centers[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = d2.sum()
        idx = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
        centers[j] = X[idx]
        d2 = np.minimum(d2, ((X - centers[j]) ** 2).sum(axis=1))
    return centers


def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return np.maximum((X * X).sum(1)[:, None] - 2.0 * X @ C.T + (C * C).sum(1)[None, :], 0.0)


@dataclass
class IncrementalKMeans:
    """Centroids (K, D) in scaled space, per-centroid counts, a micro-batch buffer."""

    centroids: np.ndarray
    counts: np.ndarray
    scale: np.ndarray
    sq_dist_sum: float = 0.0  # running sum of squared distances at assignment time
    batch_size: int = 10
    buffer: list[np.ndarray] = field(default_factory=list)

    @property
    def n_components(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def variance(self) -> float:
        """Shared per-dimension variance s^2 of the spherical model (floored)."""
        n = float(self.counts.sum())
        d = self.centroids.shape[1]
        return max(self.sq_dist_sum / max(n * d, 1.0), 1e-4)

    @classmethod
    def fit(cls, X: np.ndarray, k: int, seed: int = 0, scale: np.ndarray | None = None,
            n_iter: int = 50, batch_size: int = 10) -> IncrementalKMeans:
        """Batch Lloyd iterations from k-means++ seeds; counts = cluster sizes."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or infinite values")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scale = np.ones(X.shape[1]) if scale is None else np.asarray(scale, dtype=np.float64)
        if scale.shape != (X.shape[1],):
            raise ValueError(f"scale must have shape ({X.shape[1]},), got {scale.shape}")
        Z = X * scale
        rng = np.random.default_rng(seed)
        C = kmeans_plus_plus(Z, k, rng)
        labels = np.full(Z.shape[0], -1)
        for _ in range(n_iter):
            new = _sq_dist(Z, C).argmin(axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = labels == j
                if members.any():
                    C[j] = Z[members].mean(axis=0)
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        sq = float(_sq_dist(Z, C)[np.arange(Z.shape[0]), labels].sum())
        keep = counts > 0
        return cls(C[keep], counts[keep], scale, sq, batch_size)

    def partial_fit(self, X: np.ndarray) -> int:
        """Buffer sessions; apply a micro-batch update every ``batch_size`` sessions.
        Returns the number of sessions applied now."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"X must have shape (N, {self.centroids.shape[1]}), got {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or infinite values")
        self.buffer.extend(X)
        applied = 0
        while len(self.buffer) >= self.batch_size:
            batch = np.array(self.buffer[: self.batch_size])
            del self.buffer[: self.batch_size]
            self.update_batch(batch)
            applied += batch.shape[0]
        return applied

    def flush(self) -> int:
        """Apply what is buffered now (e.g. before persisting)."""
        if not self.buffer:
            return 0
        batch = np.array(self.buffer)
        self.buffer.clear()
        self.update_batch(batch)
        return batch.shape[0]

    def update_batch(self, X: np.ndarray) -> np.ndarray:
        """One micro-batch: nearest centroid per session, then per-centroid running mean
        (learning rate 1/(n+1) per session). Returns the assigned labels."""
        Z = np.asarray(X, dtype=np.float64) * self.scale
        d2 = _sq_dist(Z, self.centroids)
        labels = d2.argmin(axis=1)
        self.sq_dist_sum += float(d2[np.arange(Z.shape[0]), labels].sum())
        k, dim = self.centroids.shape
        sums = np.zeros((k, dim))
        np.add.at(sums, labels, Z)
        m = np.bincount(labels, minlength=k).astype(np.float64)
        moved = m > 0
        n = self.counts[moved]
        self.centroids[moved] = (n[:, None] * self.centroids[moved] + sums[moved]) / (n + m[moved])[:, None]
        self.counts = self.counts + m
        return labels

    def log_joint(self, X: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        Z = np.asarray(X, dtype=np.float64) * self.scale
        logw = np.log(self.counts / self.counts.sum())
        return (logw - _sq_dist(Z, self.centroids) / (2.0 * self.variance)) / temperature

    def predict_proba(self, X: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """(N, K) posterior of the spherical mixture (see module docstring)."""
        lj = self.log_joint(X, temperature)
        return np.exp(lj - logsumexp(lj, axis=1, keepdims=True))

    def predict(self, X: np.ndarray) -> np.ndarray:
        Z = np.asarray(X, dtype=np.float64) * self.scale
        return _sq_dist(Z, self.centroids).argmin(axis=1)

    def bic(self, X: np.ndarray) -> float:
        """BIC of the spherical model: lets k be chosen without a GMM."""
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        lj = self.log_joint(X) - 0.5 * d * np.log(2 * np.pi * self.variance)
        ll = float(logsumexp(lj, axis=1).sum())
        p = self.n_components * d + self.n_components
        return -2.0 * ll + p * np.log(max(n, 1))


def fit_select_k_kmeans(X: np.ndarray, k_max: int = 6, seed: int = 0,
                        scale: np.ndarray | None = None) -> IncrementalKMeans:
    """k in 1..k_max chosen by the spherical-model BIC."""
    X = np.asarray(X, dtype=np.float64)
    best: tuple[float, IncrementalKMeans] | None = None
    for k in range(1, min(k_max, X.shape[0]) + 1):
        m = IncrementalKMeans.fit(X, k, seed=seed, scale=scale)
        b = m.bic(X)
        if best is None or b < best[0]:
            best = (b, m)
    assert best is not None
    return best[1]
