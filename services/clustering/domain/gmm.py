"""Mixture models over session feature vectors, with exact unlearning.

Every model here is an exponential-family mixture: a session ``x`` is mapped to its
sufficient-statistic vector ``phi(x)`` (column 0 is the constant 1) and the log density
of component ``k`` is *linear* in it::

    log p(x | k) = phi(x) . W[k]

so the E-step is one matrix product, batch scoring across many households is a gather
plus a dot product, and a component's parameters are a function of the accumulated
statistics ``stats[k] = sum_i r_ik * phi(x_i)`` alone (M-step). Removing sessions is
therefore exact: subtract ``r_ik * phi(x_i)`` with the responsibilities ``r`` that were
added for them (kept in a per-session ledger) and redo the M-step; the result equals a
model whose statistics were accumulated from the remaining sessions only.

Families (``phi`` layout / M-step):

* ``GaussianFull(reg)`` — phi = [1, x, vec(x x^T)]; mean = S1/N, cov = S2/N - mean mean^T
  + reg*I. The textbook full-covariance GMM.
* ``GaussianDiag(reg)`` — phi = [1, x, x^2]; variance floor ``reg``.
* ``TypedSession`` — follows the feature schema (features.py): von Mises on the hour
  and day-of-week angles, categorical device (Dirichlet smoothing ``device_alpha``),
  multinomial genre mix counted as ``genre_weight`` draws (smoothing ``genre_beta``),
  Bernoulli binge flag, Gaussians with variance floors on kids/teen/VPN shares and the
  log lengths. With ``binge_lengths="pooled"`` the lengths of binge sessions follow one
  Gaussian shared by all components (they count episodes, not persons). Far fewer parameters than a full covariance on 35 dimensions (38 per
  component instead of 665), and the right shape for one-hot and circular features.

Numerical failure (non-finite statistics, a covariance that is not positive definite)
raises ``MixtureNumericalError``; the model layer catches it and falls back to k-means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.special import i0e

from services.clustering.domain import features as F
from services.clustering.domain.kmeans import kmeans_plus_plus

LOG_2PI = float(np.log(2.0 * np.pi))
DEAD_COMPONENT = 1e-8  # a component with less total responsibility than this is empty
CRITERIA = ("bic", "icl", "bic_eff")


def logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """``scipy.special.logsumexp(a, axis=1, keepdims=True)`` of a 2-D real array, the same
    value to the bit: scipy's own steps (each row's largest entry taken out of the sum,
    log1p of the rest over the number of maxima plus the log of that number and the
    maximum; where that is not finite, the direct log of the sum of exponentials), without
    scipy's array-API dispatch around them, which cost ~0.3-0.8 ms a call on a
    1,900 x 3 array — and EM's E-step calls it at every iteration (~15 % of the drift
    detector's build at 2,548 sessions; session 26, docs/clustering.md "A fold's cost, and
    the detector's mixture fit"). Equal to scipy's bit for bit, NaN and infinities
    included, under hypothesis (tests/unit/clustering/test_fit_reuse.py); scipy is pinned
    in pyproject.toml."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a_max = a.max(axis=1, keepdims=True)
        at_max = a == a_max
        m = at_max.sum(axis=1, keepdims=True, dtype=a.dtype)
        s = np.exp(np.where(at_max, -np.inf, a) - a_max).sum(axis=1, keepdims=True, dtype=a.dtype)
        s = np.where(s == 0, s, s / m)
        out = np.log1p(s) + np.log(m) + a_max
        finite = np.isfinite(out)
        if not finite.all():
            out = np.where(finite, out, np.log(np.exp(a).sum(axis=1, keepdims=True, dtype=a.dtype)))
    return out


class MixtureNumericalError(ArithmeticError):
    """The mixture cannot be computed (singular covariance, NaN/inf statistics)."""


class Family(Protocol):
    name: str

    def phi(self, X: np.ndarray) -> np.ndarray: ...

    def weights(self, stats: np.ndarray) -> np.ndarray: ...

    def params_per_component(self, dim: int) -> int: ...


def _check_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (sessions x features), got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


@dataclass(frozen=True)
class GaussianFull:
    """Full covariance Gaussian; ``reg`` is added to the covariance diagonal."""

    reg: float = 1e-3
    name: str = "gaussian_full"

    def phi(self, X: np.ndarray) -> np.ndarray:
        n, d = X.shape
        outer = (X[:, :, None] * X[:, None, :]).reshape(n, d * d)
        return np.hstack((np.ones((n, 1)), X, outer))

    def dim_of(self, s: int) -> int:
        return int((-1 + np.sqrt(1 + 4 * (s - 1))) / 2)

    def weights(self, stats: np.ndarray) -> np.ndarray:
        k, s = stats.shape
        d = self.dim_of(s)
        n = np.maximum(stats[:, 0], DEAD_COMPONENT)
        mean = stats[:, 1:1 + d] / n[:, None]
        second = stats[:, 1 + d:].reshape(k, d, d) / n[:, None, None]
        cov = second - mean[:, :, None] * mean[:, None, :]
        cov = 0.5 * (cov + cov.transpose(0, 2, 1)) + self.reg * np.eye(d)
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError as exc:
            raise MixtureNumericalError(f"covariance not positive definite: {exc}") from exc
        logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        prec = np.linalg.inv(cov)
        prec = 0.5 * (prec + prec.transpose(0, 2, 1))
        lin = np.einsum("kij,kj->ki", prec, mean)
        const = -0.5 * (d * LOG_2PI + logdet + np.einsum("ki,ki->k", mean, lin))
        return np.hstack((const[:, None], lin, (-0.5 * prec).reshape(k, d * d)))

    def params_per_component(self, dim: int) -> int:
        return dim + dim * (dim + 1) // 2


@dataclass(frozen=True)
class GaussianDiag:
    """Diagonal Gaussian; ``reg`` is the variance floor (added to every variance)."""

    reg: float = 1e-2
    name: str = "gaussian_diag"

    def phi(self, X: np.ndarray) -> np.ndarray:
        return np.hstack((np.ones((X.shape[0], 1)), X, X * X))

    def weights(self, stats: np.ndarray) -> np.ndarray:
        d = (stats.shape[1] - 1) // 2
        n = np.maximum(stats[:, 0], DEAD_COMPONENT)[:, None]
        mean = stats[:, 1:1 + d] / n
        var = np.maximum(stats[:, 1 + d:] / n - mean**2, 0.0) + self.reg
        const = -0.5 * (d * LOG_2PI + np.log(var).sum(axis=1) + (mean**2 / var).sum(axis=1))
        return np.hstack((const[:, None], mean / var, -0.5 / var))

    def params_per_component(self, dim: int) -> int:
        return 2 * dim


_SHARED_DEVICE_TYPES = tuple(F.DEVICE_TYPES.index(t) for t in ("tv", "console", "other"))
_GAUSS_DIMS = np.array([F.KIDS_SHARE, F.TEEN_SHARE, F.LOG_MINUTES, F.LOG_TITLES, F.VPN_SHARE])
_GAUSS_FLOORS = np.array([0.01, 0.01, 0.02, 0.01, 0.01])
RHYTHM_BINS = 12  # 2-hour bins of the UTC start hour
# Session lengths (log minutes, log titles) of a binge session say how many episodes
# were played, not who played them (episodes have a series' length); see TypedSession.
_LENGTH_DIMS = np.array([F.LOG_MINUTES, F.LOG_TITLES])
_LENGTH_IN_GAUSS = np.array([int(np.flatnonzero(_GAUSS_DIMS == j)[0]) for j in _LENGTH_DIMS])
BINGE_LENGTHS = ("joint", "pooled")
LENGTH_PSEUDO = 1.0  # sessions of the household's pooled length distribution per component
_WEEK_RATIO = np.array([2.0 / 5.0, 5.0 / 2.0])  # weekday row borrows from weekend scaled by days


def rhythm_cells(X: np.ndarray) -> np.ndarray:
    """(N, 2*RHYTHM_BINS) one-hot of (weekend, 2-hour bin) recovered from the hour and
    day-of-week angles of the feature vector (Saturday and Sunday are weekend)."""
    hour = np.mod(np.arctan2(X[:, F.HOUR.start], X[:, F.HOUR.start + 1]), 2 * np.pi) * 24.0 / (2 * np.pi)
    dow = np.mod(np.arctan2(X[:, F.DOW.start], X[:, F.DOW.start + 1]), 2 * np.pi) * 7.0 / (2 * np.pi)
    weekend = (np.floor(dow) >= 5).astype(np.int64)
    b = np.minimum((hour * RHYTHM_BINS / 24.0).astype(np.int64), RHYTHM_BINS - 1)
    out = np.zeros((X.shape[0], 2 * RHYTHM_BINS))
    out[np.arange(X.shape[0]), weekend * RHYTHM_BINS + b] = 1.0
    return out


@dataclass(frozen=True)
class TypedSession:
    """Schema-aware product of distributions (see module docstring).

    Conventions: angles are read from the (sin, cos) pairs of features.py; the von Mises
    concentration uses Banerjee's approximation kappa = R(2 - R^2)/(1 - R^2) of the mean
    resultant length R, shrunk by ``angle_pseudo`` sessions of uniform angle and capped
    at ``kappa_max``; genre log-likelihood = genre_weight * sum_g share_g * log theta_g.
    """

    genre_weight: float = 4.0
    device_alpha: float = 0.5
    genre_beta: float = 0.1
    binge_alpha: float = 0.5
    angle_pseudo: float = 1.0
    kappa_max: float = 60.0
    rhythm: str = "bins"
    rhythm_alpha: float = 0.5
    rhythm_share: float = 0.3
    binge_lengths: str = "joint"
    device_slots: int = 0
    slot_alpha: float = 0.3
    slot_weight: float = 1.0
    # Block weights (a tempered, "weighted likelihood" product: each block's log density
    # times its weight; the M-step is unchanged because each block's maximiser does not
    # depend on the weight). 1.0 everywhere is the plain product of distributions.
    rhythm_weight: float = 1.0
    device_weight: float = 1.0
    binge_weight: float = 1.0
    gauss_weight: float = 1.0
    name: str = "typed"

    def __post_init__(self) -> None:
        if self.binge_lengths not in BINGE_LENGTHS:
            raise ValueError(f"binge_lengths must be one of {BINGE_LENGTHS}, got {self.binge_lengths!r}")
        if self.rhythm not in ("bins", "vonmises"):
            raise ValueError(f"rhythm must be 'bins' or 'vonmises', got {self.rhythm!r}")

    @property
    def n_cells(self) -> int:
        return 2 * RHYTHM_BINS if self.rhythm == "bins" else 0

    @property
    def cells(self) -> slice:
        """Columns of phi holding the rhythm cells (empty for von Mises)."""
        start = 1 + F.FEATURE_DIM + _GAUSS_DIMS.size
        return slice(start, start + self.n_cells)

    @property
    def n_binge_columns(self) -> int:
        return 2 * _LENGTH_DIMS.size if self.binge_lengths == "pooled" else 0

    @property
    def n_slot_columns(self) -> int:
        return self.device_slots

    def split_slots(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, FEATURE_DIM), device slot (N,) int, -1 = unknown device).

        With ``device_slots`` > 0 a session may carry one extra column after the
        feature vector: the household-local index of its device id (0..device_slots-1,
        -1 when the device is unknown). Without that column every device is unknown."""
        if X.shape[1] == F.FEATURE_DIM:
            return X, np.full(X.shape[0], -1, dtype=np.int64)
        if self.device_slots and X.shape[1] == F.FEATURE_DIM + 1:
            slots = np.rint(X[:, F.FEATURE_DIM]).astype(np.int64)
            slots[(slots < 0) | (slots >= self.device_slots)] = -1
            # Only personal devices are evidence of who watched: a TV, console or
            # "other" device is shared, so its identity is marginalised out (its
            # sessions are judged by type, hours and content alone). Otherwise one
            # person with a TV and a phone looks like two.
            slots[X[:, F.DEVICE][:, list(_SHARED_DEVICE_TYPES)].sum(axis=1) > 0.5] = -1
            return X[:, :F.FEATURE_DIM], slots
        raise ValueError(f"X must have {F.FEATURE_DIM} feature columns for the typed family"
                         f"{' (+1 device slot)' if self.device_slots else ''}, got {X.shape[1]}")

    def seed_features(self, X: np.ndarray) -> np.ndarray:
        """What k-means++ seeding compares: the features, plus the device slot one-hot
        (scaled like a strong feature) when device slots are in use."""
        base, slots = self.split_slots(X)
        if not self.device_slots:
            return base
        onehot = np.zeros((X.shape[0], self.device_slots))
        known = slots >= 0
        onehot[np.flatnonzero(known), slots[known]] = 1.0
        return np.hstack((base, onehot))

    def phi(self, X: np.ndarray) -> np.ndarray:
        X, slots = self.split_slots(X)
        g = X[:, _GAUSS_DIMS]
        parts = [np.ones((X.shape[0], 1)), X, g * g]
        if self.rhythm == "bins":
            parts.append(rhythm_cells(X))
        if self.binge_lengths == "pooled":
            bx = X[:, _LENGTH_DIMS] * X[:, F.BINGE:F.BINGE + 1]
            parts += [bx, bx * X[:, _LENGTH_DIMS]]
        if self.device_slots:
            # Device identity: one-hot of the household-local device slot; an unknown
            # device is an all-zero row, i.e. the slot is marginalised out (its
            # probabilities sum to one), so vectors without a device still score.
            onehot = np.zeros((X.shape[0], self.device_slots))
            known = slots >= 0
            onehot[np.flatnonzero(known), slots[known]] = 1.0
            parts.append(onehot)
        return np.hstack(parts)

    def _angle(self, stats: np.ndarray, block: slice, n: np.ndarray, W: np.ndarray, const: np.ndarray) -> None:
        s_sin = stats[:, 1 + block.start]
        s_cos = stats[:, 1 + block.start + 1]
        m_sin, m_cos = s_sin / (n + self.angle_pseudo), s_cos / (n + self.angle_pseudo)
        r = np.minimum(np.hypot(m_sin, m_cos), 0.999)
        kappa = np.minimum(r * (2.0 - r * r) / (1.0 - r * r), self.kappa_max)
        safe_r = np.where(r > 0, r, 1.0)
        W[:, 1 + block.start] = kappa * m_sin / safe_r
        W[:, 1 + block.start + 1] = kappa * m_cos / safe_r
        const -= LOG_2PI + np.log(i0e(kappa)) + kappa

    def weights(self, stats: np.ndarray) -> np.ndarray:
        k = stats.shape[0]
        d = F.FEATURE_DIM
        n = np.maximum(stats[:, 0], DEAD_COMPONENT)
        const = np.zeros(k)
        n_slot = self.n_slot_columns
        if n_slot:
            W_base = self._base().weights(stats[:, :stats.shape[1] - n_slot])
            slot_counts = stats[:, -n_slot:]
            used = max(int((slot_counts.sum(axis=0) > 0.5).sum()), 1)
            # Categorical over the household's devices (Dirichlet slot_alpha over the
            # devices in use), counted as slot_weight draws: a personal device's
            # sessions concentrate on one person, a shared TV's spread over several.
            theta = (slot_counts + self.slot_alpha) / (slot_counts.sum(axis=1, keepdims=True) + self.slot_alpha * used)
            return np.hstack((W_base, self.slot_weight * np.log(theta)))
        if self.rhythm == "bins":
            # Categorical over (weekday/weekend, 2-hour bin) cells: captures two-peak
            # rhythms that one von Mises cannot. Counts are smoothed over neighbouring
            # bins and partly shared between weekday and weekend (linear in the
            # statistics, so unlearning stays exact).
            cells = stats[:, self.cells].reshape(k, 2, RHYTHM_BINS)
            sm = 0.5 * cells + 0.25 * (np.roll(cells, 1, axis=2) + np.roll(cells, -1, axis=2))
            sm = sm + self.rhythm_share * sm[:, ::-1, :] * _WEEK_RATIO[None, :, None] + self.rhythm_alpha
            theta = sm / sm.sum(axis=(1, 2), keepdims=True)
            W = np.zeros((k, 1 + d + _GAUSS_DIMS.size + self.n_cells + self.n_binge_columns))
            W[:, self.cells] = self.rhythm_weight * np.log(theta).reshape(k, -1)
        else:
            W = np.zeros((k, 1 + d + _GAUSS_DIMS.size + self.n_binge_columns))
            self._angle(stats, F.HOUR, n, W, const)
            self._angle(stats, F.DOW, n, W, const)
        dev = stats[:, 1 + F.DEVICE.start:1 + F.DEVICE.stop] + self.device_alpha
        W[:, 1 + F.DEVICE.start:1 + F.DEVICE.stop] = self.device_weight * np.log(dev / dev.sum(axis=1, keepdims=True))
        gen = stats[:, 1 + F.GENRE.start:1 + F.GENRE.stop] + self.genre_beta
        W[:, 1 + F.GENRE.start:1 + F.GENRE.stop] = self.genre_weight * np.log(gen / gen.sum(axis=1, keepdims=True))
        q = (stats[:, 1 + F.BINGE] + self.binge_alpha) / (n + 2 * self.binge_alpha)
        W[:, 1 + F.BINGE] = self.binge_weight * (np.log(q) - np.log1p(-q))
        const += self.binge_weight * np.log1p(-q)
        mean = stats[:, 1 + _GAUSS_DIMS] / n[:, None]
        var = np.maximum(stats[:, 1 + d:1 + d + _GAUSS_DIMS.size] / n[:, None] - mean**2, 0.0) + _GAUSS_FLOORS
        if self.binge_lengths == "pooled":
            self._binge_lengths(stats, n, mean, var, W)
        gw = self.gauss_weight
        W[:, 1 + _GAUSS_DIMS] = gw * mean / var
        W[:, 1 + d:1 + d + _GAUSS_DIMS.size] = gw * -0.5 / var
        const -= gw * 0.5 * (_GAUSS_DIMS.size * LOG_2PI + np.log(var).sum(axis=1) + (mean**2 / var).sum(axis=1))
        W[:, 0] = const
        return W

    def _binge_lengths(self, stats: np.ndarray, n: np.ndarray, mean: np.ndarray, var: np.ndarray,
                       W: np.ndarray) -> None:
        """``binge_lengths="pooled"``: the lengths of a component's *non-binge* sessions
        are its Gaussian (mean/var replaced in place, shrunk towards the household's
        pooled non-binge lengths by LENGTH_PSEUDO sessions), and the lengths of binge
        sessions follow ONE Gaussian pooled over all components (same for every k, so it
        cancels in the posterior). With b the binge flag and y a length column:

            log p = (1 - b) N(y; mu_k, s_k^2) + b N(y; mu_b, s_b^2)

        is linear in (y, y^2, b, b*y, b*y^2); the last two are the extra phi columns.
        The pooled parameters are sums of the statistics over components, so exact
        unlearning still holds."""
        d = F.FEATURE_DIM
        nb_cols = slice(W.shape[1] - self.n_binge_columns, W.shape[1])
        b_y = stats[:, nb_cols][:, :_LENGTH_DIMS.size]
        b_yy = stats[:, nb_cols][:, _LENGTH_DIMS.size:]
        n_b = stats[:, 1 + F.BINGE]
        y = stats[:, 1 + _LENGTH_DIMS]
        yy = stats[:, 1 + d + _LENGTH_IN_GAUSS]
        floors = _GAUSS_FLOORS[_LENGTH_IN_GAUSS]

        def gauss(s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, pseudo: float, m0: np.ndarray,
                  v0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            c = s0[..., None] + pseudo
            m = (s1 + pseudo * m0) / c
            v = np.maximum((s2 + pseudo * (v0 + m0**2)) / c - m**2, 0.0) + floors
            return m, v

        # Household pools (sums over components); a household without any non-binge
        # (or binge) session falls back on all of its sessions' lengths.
        tot_n, tot_b = n.sum(), n_b.sum()
        all_m, all_v = gauss(np.array(tot_n), y.sum(0), yy.sum(0), 1e-9, np.zeros(2), np.zeros(2))
        pool_nb_m, pool_nb_v = gauss(np.array(tot_n - tot_b), y.sum(0) - b_y.sum(0), yy.sum(0) - b_yy.sum(0),
                                     LENGTH_PSEUDO, all_m, all_v)
        mu_b, var_b = gauss(np.array(tot_b), b_y.sum(0), b_yy.sum(0), LENGTH_PSEUDO, all_m, all_v)
        mu_k, var_k = gauss(np.maximum(n - n_b, 0.0), y - b_y, yy - b_yy, LENGTH_PSEUDO, pool_nb_m, pool_nb_v)
        mean[:, _LENGTH_IN_GAUSS] = mu_k
        var[:, _LENGTH_IN_GAUSS] = var_k
        # b * (pooled binge log density - component non-binge log density), expanded.
        gw = self.gauss_weight
        W[:, nb_cols] = gw * np.hstack((mu_b / var_b - mu_k / var_k, -0.5 / var_b + 0.5 / var_k))
        const_b = -0.5 * (LOG_2PI + np.log(var_b) + mu_b**2 / var_b).sum()
        const_k = -0.5 * (LOG_2PI + np.log(var_k) + mu_k**2 / var_k).sum(axis=1)
        W[:, 1 + F.BINGE] += gw * (const_b - const_k)

    def _base(self) -> "TypedSession":
        from dataclasses import replace
        return replace(self, device_slots=0)

    def slot_params(self, stats: np.ndarray) -> float:
        """Free parameters of the device-slot categorical per component: devices the
        household uses minus one (0 without device slots)."""
        if not self.n_slot_columns:
            return 0.0
        used = int((stats[:, -self.n_slot_columns:].sum(axis=0) > 0.5).sum())
        return float(max(used - 1, 0))

    def effective_params(self, stats: np.ndarray, support: float = 0.5) -> np.ndarray:
        """(K,) parameters each component actually estimates from its sessions.

        A categorical block with C categories has C - 1 free parameters, but a category
        a component never uses (expected count < ``support``) is fixed by the smoothing
        prior, not by the data; counting it (as plain BIC does) charges a small
        household ~57 parameters per person and merges persons who differ in only a few
        categories (e.g. tablet at 16h vs tv at 21h). Here a categorical block counts
        (used categories - 1); the binge rate and the Gaussians (mean, variance) count
        in full. This is BIC with the dimension of the estimated model's support."""
        d = F.FEATURE_DIM
        def used(block: np.ndarray) -> np.ndarray:
            return np.maximum((block >= support).sum(axis=1) - 1, 0)
        df = used(stats[:, 1 + F.DEVICE.start:1 + F.DEVICE.stop]) + used(stats[:, 1 + F.GENRE.start:1 + F.GENRE.stop])
        if self.rhythm == "bins":
            df = df + used(stats[:, self.cells])
        else:
            df = df + 4
        if self.n_slot_columns:
            df = df + used(stats[:, -self.n_slot_columns:])
        return (df + 1 + 2 * _GAUSS_DIMS.size).astype(np.float64)

    def params_per_component(self, dim: int) -> int:
        rhythm = 2 * RHYTHM_BINS - 1 if self.rhythm == "bins" else 4
        return rhythm + (len(F.DEVICE_TYPES) - 1) + (len(F.GENRES) - 1) + 1 + 2 * _GAUSS_DIMS.size


FAMILIES = {"gaussian_full": GaussianFull, "gaussian_diag": GaussianDiag, "typed": TypedSession}


@dataclass
class Mixture:
    """A fitted mixture: statistics, derived weights, and the responsibility ledger.

    ``stats`` (K, S): sum of r_ik * phi(x_i); ``W`` (K, S) log-density weights;
    ``log_weights`` (K,) log mixing proportions (-inf for empty components);
    ``ledger_keys`` (M,) int64 session keys; ``ledger_resp`` (M, K) the responsibilities
    that were added for each key (needed to subtract them again).
    """

    family: Family
    stats: np.ndarray
    W: np.ndarray = field(init=False)
    log_weights: np.ndarray = field(init=False)
    ledger_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ledger_resp: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.refresh()

    # -- parameters ---------------------------------------------------------------
    def refresh(self) -> None:
        """M-step: parameters from the statistics."""
        if not np.all(np.isfinite(self.stats)):
            raise MixtureNumericalError("mixture statistics contain NaN or inf")
        W = self.family.weights(self.stats)
        if not np.all(np.isfinite(W)):
            raise MixtureNumericalError("mixture parameters contain NaN or inf")
        counts = self.stats[:, 0]
        alive = counts > DEAD_COMPONENT
        total = counts[alive].sum()
        with np.errstate(divide="ignore"):
            self.log_weights = np.where(alive, np.log(np.maximum(counts, 0.0) / max(total, DEAD_COMPONENT)), -np.inf)
        self.W = W

    @property
    def n_components(self) -> int:
        return int(self.stats.shape[0])

    @property
    def counts(self) -> np.ndarray:
        return self.stats[:, 0].copy()

    @property
    def alive(self) -> np.ndarray:
        return self.stats[:, 0] > DEAD_COMPONENT

    # -- scoring ------------------------------------------------------------------
    def log_joint(self, X: np.ndarray) -> np.ndarray:
        """(N, K) log w_k + log p(x_i | k)."""
        return self.family.phi(_check_matrix(X)) @ self.W.T + self.log_weights

    def log_likelihood(self, X: np.ndarray) -> float:
        return float(logsumexp_rows(self.log_joint(X)).sum())

    def predict_proba(self, X: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Posterior over components; ``temperature`` > 1 softens (calibration)."""
        lj = self.log_joint(X) / temperature
        lj -= lj.max(axis=1, keepdims=True)  # plain numpy: scipy's logsumexp costs ~40 us a call
        np.exp(lj, out=lj)
        lj /= lj.sum(axis=1, keepdims=True)
        return lj

    # -- learning -----------------------------------------------------------------
    def partial_fit(self, X: np.ndarray, keys: np.ndarray | None = None,
                    clamp: np.ndarray | None = None) -> np.ndarray:
        """Incremental EM step: E-step with the current parameters on the new sessions,
        add their statistics, M-step. ``clamp`` (N,) component index or -1 fixes the
        responsibility of labelled sessions. Returns the responsibilities added."""
        X = _check_matrix(X)
        R = self.predict_proba(X) if X.shape[0] else np.zeros((0, self.n_components))
        R = _apply_clamp(R, clamp)
        self.stats = self.stats + R.T @ self.family.phi(X)
        self._ledger_add(keys, R)
        self.refresh()
        return R

    def remove_sessions(self, keys: np.ndarray, X: np.ndarray) -> None:
        """Exact unlearning: subtract the statistics the sessions ``keys`` (with feature
        rows ``X``, same order) contributed. Raises KeyError for unknown keys."""
        keys = np.asarray(keys, dtype=np.int64)
        X = _check_matrix(X)
        if keys.shape[0] != X.shape[0]:
            raise ValueError(f"keys ({keys.shape[0]}) and X ({X.shape[0]}) must have the same length")
        pos = {int(k): i for i, k in enumerate(self.ledger_keys)}
        missing = [int(k) for k in keys if int(k) not in pos]
        if missing:
            raise KeyError(f"sessions not in the model ledger: {missing[:5]}")
        rows = np.array([pos[int(k)] for k in keys], dtype=np.int64)
        R = self.ledger_resp[rows]
        self.stats = self.stats - R.T @ self.family.phi(X)
        # Round-off can leave -1e-13 counts for a fully removed component.
        self.stats[np.abs(self.stats[:, 0]) < 1e-9, 0] = 0.0
        keep = np.ones(self.ledger_keys.shape[0], dtype=bool)
        keep[rows] = False
        self.ledger_keys = self.ledger_keys[keep]
        self.ledger_resp = self.ledger_resp[keep]
        self.refresh()

    unlearn = remove_sessions

    def _ledger_add(self, keys: np.ndarray | None, R: np.ndarray) -> None:
        if keys is None:
            # New keys after the largest: unique and not in the ledger by construction,
            # so not checked (the check sorted them twice: ~5 % of fit_select_k's time).
            start = int(self.ledger_keys.max()) + 1 if self.ledger_keys.size else 0
            keys = np.arange(start, start + R.shape[0], dtype=np.int64)
        else:
            keys = np.asarray(keys, dtype=np.int64)
            if keys.shape[0] != R.shape[0]:
                raise ValueError(f"keys ({keys.shape[0]}) must match the sessions ({R.shape[0]})")
            if np.intersect1d(keys, self.ledger_keys).size or np.unique(keys).size != keys.size:
                raise ValueError("keys must be unique and not already in the model")
        self.ledger_keys = np.concatenate((self.ledger_keys, keys))
        prev = self.ledger_resp if self.ledger_resp is not None else np.zeros((0, R.shape[1]))
        self.ledger_resp = np.vstack((prev, R))

    @classmethod
    def from_responsibilities(cls, family: Family, X: np.ndarray, R: np.ndarray,
                              keys: np.ndarray | None = None) -> Mixture:
        """The model whose statistics are sum_i R[i] * phi(X[i]) (M-step on them)."""
        X = _check_matrix(X)
        m = cls(family, R.T @ family.phi(X))
        m._ledger_add(keys, R)
        return m

    def n_params(self) -> float:
        k = int(self.alive.sum())
        dim = self.stats.shape[1]
        slots = getattr(self.family, "slot_params", None)
        per = self.family.params_per_component(_dim_hint(self.family, dim)) + (slots(self.stats) if slots else 0)
        return k * per + (k - 1)

    def n_params_effective(self) -> float:
        """Parameters estimated from data (see TypedSession.effective_params); the
        nominal count for families without that notion."""
        eff = getattr(self.family, "effective_params", None)
        if eff is None:
            return float(self.n_params())
        alive = self.alive
        return float(eff(self.stats[alive]).sum() + (alive.sum() - 1))

    def bic(self, X: np.ndarray, penalty: float = 1.0) -> float:
        """BIC = -2 log L + penalty * p log N (lower is better; penalty 1 = plain BIC)."""
        return -2.0 * self.log_likelihood(X) + penalty * self.n_params() * np.log(max(X.shape[0], 1))

    def bic_effective(self, X: np.ndarray, penalty: float = 1.0) -> float:
        """BIC with the effective parameter count p_eff (``n_params_effective``)."""
        return -2.0 * self.log_likelihood(X) + penalty * self.n_params_effective() * np.log(max(X.shape[0], 1))

    def score(self, X: np.ndarray, criterion: str, penalty: float = 1.0) -> float:
        """Model-selection criterion by name (lower is better). ``penalty`` multiplies
        the parameter charge (>1 when the likelihood is known to be optimistic)."""
        if criterion == "bic":
            return self.bic(X, penalty)
        if criterion == "icl":
            return self.icl(X)
        if criterion == "bic_eff":
            return self.bic_effective(X, penalty)
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")

    def icl(self, X: np.ndarray) -> float:
        """ICL = BIC + 2 * classification entropy: penalises overlapping components."""
        R = self.predict_proba(X)
        entropy = -float(np.sum(R * np.log(np.maximum(R, 1e-300))))
        return self.bic(X) + 2.0 * entropy

    def prune(self) -> np.ndarray:
        """Drop empty components; returns the kept component indices."""
        keep = np.flatnonzero(self.alive)
        self.stats = self.stats[keep]
        if self.ledger_resp is not None:
            self.ledger_resp = self.ledger_resp[:, keep]
        self.refresh()
        return keep


def _dim_hint(family: Family, s: int) -> int:
    if isinstance(family, GaussianFull):
        return family.dim_of(s)
    if isinstance(family, GaussianDiag):
        return (s - 1) // 2
    return F.FEATURE_DIM


def _apply_clamp(R: np.ndarray, clamp: np.ndarray | None) -> np.ndarray:
    if clamp is None:
        return R
    clamp = np.asarray(clamp, dtype=np.int64)
    if clamp.shape[0] != R.shape[0]:
        raise ValueError(f"labels ({clamp.shape[0]}) must match the sessions ({R.shape[0]})")
    if np.any(clamp >= R.shape[1]):
        raise ValueError("labels refer to a component that does not exist")
    fixed = clamp >= 0
    if fixed.any():
        R = R.copy()
        R[fixed] = 0.0
        R[np.flatnonzero(fixed), clamp[fixed]] = 1.0
    return R


def em_iterations(model: Mixture, X: np.ndarray, iters: int, clamp: np.ndarray | None = None,
                  keys: np.ndarray | None = None) -> Mixture:
    """``iters`` plain EM iterations from ``model`` (its own family and block weights in
    the E-step; ``clamp`` >= 0 keeps a session's component), as a new mixture whose
    ledger holds the last responsibilities (``keys``). Empty components are not dropped
    here (the caller prunes). Raises MixtureNumericalError as fit_em does; ``model`` is
    left as it was."""
    X = _check_matrix(X)
    out = model
    for _ in range(iters):
        lj = out.log_joint(X)
        lse = logsumexp_rows(lj)
        if not np.all(np.isfinite(lse)):
            raise MixtureNumericalError("log-likelihood is not finite")
        out = Mixture.from_responsibilities(model.family, X, _apply_clamp(np.exp(lj - lse), clamp), keys)
    return out


def standardise(X: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """Columns to zero mean and unit spread (spread floored) for k-means++ seeding."""
    return (X - X.mean(axis=0)) / np.maximum(X.std(axis=0), floor)


def _seeding(family: Family, X: np.ndarray) -> np.ndarray:
    """What fit_em's k-means++ seeding compares: the family's seed features (or X),
    standardised."""
    seed = getattr(family, "seed_features", None)
    return standardise(seed(X) if seed else X)


def fit_em(X: np.ndarray, k: int, family: Family, rng: np.random.Generator,
           clamp: np.ndarray | None = None, max_iter: int = 200, tol: float = 1e-5,
           keys: np.ndarray | None = None, init_labels: np.ndarray | None = None,
           spans: np.ndarray | None = None, phi: np.ndarray | None = None,
           seeding: np.ndarray | None = None) -> tuple[Mixture, list[float]]:
    """Batch EM for ``k`` components from a k-means++ seeding (hard assignment to the
    nearest seed on standardised features). Labelled sessions (``clamp`` >= 0) keep
    their component. ``spans`` (k, 2): component j owns only rows spans[j, 0] <=
    i < spans[j, 1] (rows in time order: a member who joined at spans[j, 0], model.py's
    newcomer test). Returns the model and the log-likelihood trace (non-decreasing up
    to round-off; that is EM's guarantee). Stops when the gain per session < ``tol``.
    ``phi`` and ``seeding``: ``family.phi(X)`` and ``_seeding(family, X)`` when the caller
    has them (fit_select_k fits the same sessions 11 times); the same values, so the same
    fit."""
    X = _check_matrix(X)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (number of sessions), got {k}")
    Phi = family.phi(X) if phi is None else phi
    if init_labels is None:
        Z = _seeding(family, X) if seeding is None else seeding
        centers = kmeans_plus_plus(Z, k, rng)
        d2 = ((Z[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        init_labels = d2.argmin(axis=1)
    R = np.zeros((n, k))
    R[np.arange(n), init_labels] = 1.0
    R = _apply_clamp(R, clamp)
    # A seed may own no session (duplicates): give every component a tiny share so no
    # component starts dead; EM decides.
    R = 0.98 * R + 0.02 / k
    R = _apply_clamp(R, clamp)
    outside = None
    if spans is not None:
        spans = np.asarray(spans, dtype=np.int64)
        rows = np.arange(n)[:, None]
        outside = (rows < spans[None, :, 0]) | (rows >= spans[None, :, 1])
        R[outside] = 0.0
        R /= R.sum(axis=1, keepdims=True)
    model = Mixture(family, R.T @ Phi)
    trace: list[float] = []
    for _ in range(max_iter):
        lj = Phi @ model.W.T + model.log_weights
        if outside is not None:
            lj[outside] = -np.inf
        lse = logsumexp_rows(lj)
        ll = float(lse.sum())
        if not np.isfinite(ll):
            raise MixtureNumericalError("log-likelihood is not finite")
        trace.append(ll)
        R = _apply_clamp(np.exp(lj - lse), clamp)
        model.stats = R.T @ Phi
        model.refresh()
        if len(trace) > 1 and trace[-1] - trace[-2] < tol * n:
            break
    model._ledger_add(keys, R)
    return model, trace


@dataclass
class Selection:
    model: Mixture
    k: int
    criterion: str
    scores: dict[int, float]


def fit_select_k(X: np.ndarray, k_max: int = 6, family: Family | None = None, seed: int = 0,
                 n_init: int = 2, criterion: str = "bic", clamp: np.ndarray | None = None,
                 k_min: int = 1, keys: np.ndarray | None = None,
                 max_iter: int = 200, penalty: float = 1.0,
                 extra_inits: list[np.ndarray] | None = None) -> Selection:
    """Fit k = k_min..min(k_max, N) components (``n_init`` seedings each, best
    likelihood kept) and keep the k with the lowest ``criterion`` ("bic", "icl" or
    "bic_eff" = BIC with the effective parameter count, see Mixture.n_params_effective).
    Empty components are pruned from the winner."""
    X = _check_matrix(X)
    if X.shape[0] == 0:
        raise ValueError("X must contain at least one session")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    family = family or TypedSession()
    rng = np.random.default_rng(seed)
    scores: dict[int, float] = {}
    best: tuple[float, Mixture, int] | None = None
    # Every fit below reads the same sessions: their phi and seeding features once.
    phi, seeding = family.phi(X), _seeding(family, X)
    for k in range(max(k_min, 1), min(k_max, X.shape[0]) + 1):
        top: tuple[float, Mixture] | None = None
        inits: list[np.ndarray | None] = [None] * (n_init if k > 1 else 1)
        # Extra seedings (e.g. one component per personal device) for their own k.
        inits += [lab for lab in (extra_inits or []) if int(lab.max()) + 1 == k and k > 1]
        for init in inits:
            m, trace = fit_em(X, k, family, rng, clamp=clamp, keys=keys, max_iter=max_iter, init_labels=init,
                              phi=phi, seeding=seeding)
            if top is None or trace[-1] > top[0]:
                top = (trace[-1], m)
        assert top is not None
        score = top[1].score(X, criterion, penalty)
        scores[k] = score
        if best is None or score < best[0]:
            best = (score, top[1], k)
    assert best is not None
    model = best[1]
    if clamp is None:
        model.prune()
    return Selection(model, int(model.n_components), criterion, scores)
