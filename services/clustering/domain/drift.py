"""Per-household drift detection against a frozen reference mixture.

Six statistics run over the stream of new sessions (indices count monitored sessions):

1. **Surprise CUSUM.** Each session's negative log-likelihood under the reference
   mixture, standardised with the median and 1.4826 MAD measured on held-out reference
   sessions: z_i = (-log p(x_i) - mu) / sigma. One-sided CUSUM
   C_i = max(0, C_{i-1} + z_i - k) with allowance k = ``CUSUM_ALLOWANCE`` and z clipped
   at ``Z_CLIP`` (a single outlier such as a trip must not accumulate); alarm when
   C_i > ``cusum_h``. The mean of -log p over the alarm window minus mu estimates the
   excess cross-entropy, i.e. the increase of KL(recent || model) over its reference
   level (reported as ``kl_excess``).
2. **Composition KL.** Over the last ``window`` sessions, the mean posterior w_hat (who
   watched) against the model's weights w: G = 2 * window * KL(w_hat || w), asymptotically
   chi-square with df = K - 1 when nothing changed; standardised as
   (G - df) / sqrt(2 df) so that one threshold serves every household size; alarm when
   above ``kl_threshold``. It sees a person leaving, which the surprise cannot.
3. **Block-agreement CUSUM** (typed family only; its log-density is a sum of per-block
   terms given the person). Per session, the pointwise mutual information between the
   "when/where" block T (rhythm, device) and the content block C (genres, maturity,
   length, binge, VPN): s = log sum_k w_k p(T|k)p(C|k) - log sum_k w_k p(T|k)
   - log sum_k w_k p(C|k). When a person's hours jump onto another member's while the
   content stays theirs, the mixture still explains each block but the blocks point to
   different persons and s falls. Standardised on the holdout like the surprise
   (lower side), same CUSUM; alarm when above ``agreement_h``.
4. **Window MMD.** Kernel two-sample statistic between the last ``window`` sessions and
   all reference sessions (Gaussian kernel on standardised features without day of
   week, median-heuristic bandwidth), standardised per household by its spread over
   contiguous reference windows; alarm when above ``mmd_threshold``. It needs no
   model, so it sees changes of the joint distribution the mixture absorbs.
5. **Per-person weight CUSUMs.** For each person k, a CUSUM of the log-likelihood
   ratio of the responsibility r_ik (a fractional Bernoulli outcome) under
   w'_k = ``WEIGHT_RHO_DOWN`` * w_k (k leaves) and under
   w'_k = (w_k + ``WEIGHT_SHARE_UP``) / (1 + ``WEIGHT_SHARE_UP``) (k's share rises, e.g.
   a newcomer absorbed by the most similar member) against w_k:
   r log(w'/w) + (1 - r) log((1 - w')/(1 - w)); alarm when the maximum over persons
   and sides exceeds ``weight_h``.
6. **Predictive refit GLR.** Every ``GLR_STRIDE`` sessions, the reference mixture is
   refitted on the block A of the ``GLR_WINDOW`` sessions before the last
   ``GLR_WINDOW`` (block B): a few EM steps warm-started from the reference, whose
   statistics enter as a prior worth ``GLR_PRIOR_SESSIONS`` sessions, plus one extra
   component seeded (``GLR_NEW_PSEUDO`` pseudo-sessions) from A's least-explained
   sessions so the number of persons may grow. The statistic is the out-of-sample
   log-likelihood ratio of the refit against the frozen reference on B:
   sum_{i in B} min(log p_A(x_i) - log p_ref(x_i), ``GLR_CLIP``). Predicting the *next*
   block removes the in-sample gain every refit enjoys under no change (large for
   small references), a change that persists from A into B is rewarded, a trip or a
   binge confined to A is not; the clip keeps a few outlying sessions of B from
   carrying the sum. Alarm when above ``glr_h``.

Thresholds are calibrated on simulated *stable* households (``calibrate``): each
statistic's per-household maximum over the monitoring horizon gets an exponential tail
fitted above its 90 % quantile; every statistic is set where its tail is exceeded with
the same probability p, p chosen so that the share of calibration households with *any*
alarm is at most alpha (the stated false-alarm rate, per household).
The shipped defaults come from ``calibrate`` at alpha = 1 % on the simulator's default
difficulty, seeds 501 (docs/clustering.md); bench/accuracy.py re-measures the
false-alarm rate on fresh households.

Event typing (heuristic, reported separately from detection): composition when the KL
or weight statistic is the most alarming or most alarm-window sessions look like nobody
(z > ``NOVEL_Z``); seasonal when the surprise rises for most persons together; otherwise
a single person changed: behavioural when the excess is mostly in the genre block,
gradual when the surprise keeps rising across the alarm window (positive trend),
sudden otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from services.clustering.domain import features as F
from services.clustering.domain.gmm import _GAUSS_DIMS, Mixture, TypedSession

CUSUM_ALLOWANCE = 1.0
Z_CLIP = 3.0  # one outlying session (a trip, a guest) adds at most Z_CLIP - allowance
NOVEL_Z = 4.0
# The holdout's median estimates mu with standard error ~1.2533 sigma / sqrt(n_hold);
# an error of mu acts as a permanent shift that a CUSUM accumulates over a long stream,
# so the allowance grows by this many standard errors (small references get more slack).
ALLOWANCE_GUARD = 1.5
# Per-person weight CUSUMs: alternatives "person k now watches rho_down times as much"
# (leaving) and "person k's share rose by SHARE_UP of the total" (a newcomer absorbed by
# the most similar member, or a member watching much more).
WEIGHT_RHO_DOWN = 0.25
WEIGHT_SHARE_UP = 0.2
RECLUSTER_SEVERITY = 1.5
# Predictive refit GLR (statistic 6): block size, evaluation stride, prior strength of
# the reference in the refit (in sessions), EM steps, weight of the seeded extra
# component (pseudo-sessions) and the per-session clip of the log-likelihood ratio.
GLR_WINDOW = 40
GLR_STRIDE = 5
GLR_PRIOR_SESSIONS = 150.0
GLR_EM_STEPS = 4
GLR_NEW_PSEUDO = 3.0
GLR_CLIP = 2.0


# -- window MMD ----------------------------------------------------------------------
# Feature weights of the kernel: day of week is left out (a window of 40 sessions spans
# a few days in a large household, so its weekday mix legitimately differs from the
# reference's); every other feature counts after standardisation by the reference.
_MMD_FEATURE_MASK = np.ones(F.FEATURE_DIM, dtype=bool)
_MMD_FEATURE_MASK[F.DOW] = False
MMD_SCALE_FLOOR = 0.05  # std floor: a genre nobody watched must not explode the scale
MMD_NULL_STRIDE = 2
MMD_CHUNK = 256


def _sq_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0)


def _block_sums(K: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """Sum of K[a:a+size, a:a+size] for every a in ``starts`` (summed-area table)."""
    P = np.zeros((K.shape[0] + 1, K.shape[1] + 1))
    P[1:, 1:] = K.cumsum(axis=0).cumsum(axis=1)
    e = starts + size
    return P[e, e] - P[starts, e] - P[e, starts] + P[starts, starts]


def _band_block_sums(K: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """``_block_sums`` from the band |i - j| < size alone: on diagonal d (K[i, i + d],
    or K[i - d, i] below) the block at a holds the entries of positions a .. a + size - |d|
    - 1, a difference of that diagonal's running sum. O(n * size) instead of the
    summed-area table's two n x n cumsums (which were 40 % of the reference's build and
    two more n x n arrays), and better rounded: the table's corners are sums of up to n^2
    entries (~10^6 at 2,500 sessions), so each block came as a difference of large
    numbers; here of sums of at most n."""
    out = np.zeros(starts.size)
    for d in range(1 - size, size):
        run = np.concatenate(([0.0], np.cumsum(np.diagonal(K, d))))
        out += run[starts + size - abs(d)] - run[starts]
    return out


def _symmetric_sq_dist(R: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Squared distances between R's rows, exactly symmetric (R @ R.T is one symmetric
    BLAS product, and sq_i + sq_j is sq_j + sq_i), computed in blocks of ``MMD_CHUNK``
    rows in place of the product, so only one n x n array is alive; the upper
    triangle's entries (i < j) are copied, row after row, into ``upper`` (n (n - 1) / 2
    values) for the bandwidth's median."""
    n = R.shape[0]
    sq = (R * R).sum(axis=1)
    D2 = R @ R.T
    pos = 0
    for r0 in range(0, n, MMD_CHUNK):
        r1 = min(r0 + MMD_CHUNK, n)
        block = D2[r0:r1]
        block *= -2.0   # exact; (sq_i + sq_j) + (-2 g) is (sq_i + sq_j) - 2 g, symmetric in i, j
        np.add(np.add.outer(sq[r0:r1], sq), block, out=block)
        np.maximum(block, 0.0, out=block)
        for i in range(r0, r1):
            upper[pos:pos + n - 1 - i] = block[i - r0, i + 1:]
            pos += n - 1 - i
    return D2


def _median(values: np.ndarray, sample: int = 4096) -> float:
    """``np.median(values)``, the same value, selecting only near it: a strided sample of
    ``values`` brackets the median, one pass counts the values below the bracket and
    collects those inside, and the middle order statistics are selected among those (a
    few per cent of the values). Exact whenever the bracket holds the middle ranks, which
    is checked (otherwise, or with NaN present, ``np.median`` itself). Why: the bandwidth's
    median over the n (n - 1) / 2 reference pairs was the largest single part of the
    window MMD's build (~35 of ~90 ms at 2,539 sessions; this ~12)."""
    m = values.size
    if m < 8 * sample:
        return float(np.median(values))
    probe = np.sort(values[:: m // sample])
    half = int(3.0 * np.sqrt(probe.size)) + 1   # ~3 standard errors of the sample's median rank
    lo, hi = probe[max(probe.size // 2 - half, 0)], probe[min(probe.size // 2 + half, probe.size - 1)]
    below = int(np.count_nonzero(values < lo))
    inside = values[(values >= lo) & (values <= hi)]
    k_lo, k_hi = (m - 1) // 2, m // 2   # the middle ranks (equal when m is odd)
    if below + inside.size + int(np.count_nonzero(values > hi)) != m \
            or not below <= k_lo <= k_hi < below + inside.size:
        return float(np.median(values))
    middle = np.partition(inside, [k_lo - below, k_hi - below])
    return float(np.mean(middle[[k_lo - below, k_hi - below]]))   # np.median's mean of the two


def _reference_null(ref: np.ndarray, window: int) -> tuple[float, float, float, float]:
    """The window MMD's bandwidth, reference term and null (location, scale) over the
    standardised reference sessions ``ref`` (n x features): what ``_WindowMMD`` computes
    once per reference (the build after each full refit). Quadratic in n by nature (every
    pair's kernel enters the reference term and the null), so it is made cheap rather
    than avoided (session 25, docs/clustering.md "Drift"): one n x n array (the squared
    distances, turned into the kernel in place) plus the upper triangle for the median,
    instead of five or six n x n arrays; the bandwidth is the median over the pairs i < j
    (the same as over all off-diagonal entries of a symmetric matrix, half the
    selection); the contiguous windows' block sums come from the band (``_band_block_sums``).
    Equal to the summed-area version to rounding (~1e-13 relative; tested against it,
    tests/unit/clustering/test_drift_build.py)."""
    n = ref.shape[0]
    upper = np.empty(n * (n - 1) // 2)
    K = _symmetric_sq_dist(ref, upper)
    bandwidth = float(max(_median(upper), 1e-6))
    del upper
    np.divide(K, -bandwidth, out=K)
    np.exp(K, out=K)
    total = float(K.sum())
    ref_term = (total - n) / (n * (n - 1))
    # Null: contiguous reference windows (size w0 <= window) against the rest.
    w0 = int(min(window, n // 2))
    starts = np.arange(0, n - w0 + 1, MMD_NULL_STRIDE)
    within = _band_block_sums(K, starts, w0)
    crow = np.concatenate(([0.0], np.cumsum(K.sum(axis=1))))
    del K
    win_rows = crow[starts + w0] - crow[starts]  # sum over win x all
    cross = win_rows - within  # win x rest
    rest = total - 2.0 * win_rows + within  # rest x rest (with diagonal)
    m = n - w0
    null = ((within - w0) / (w0 * (w0 - 1)) + (rest - m) / (m * (m - 1))
            - 2.0 * cross / (w0 * m))
    null_loc = float(np.median(null))
    null_scale = float(max(1.4826 * np.median(np.abs(null - null_loc)), 1e-4))
    return bandwidth, ref_term, null_loc, null_scale


class _WindowMMD:
    """Squared MMD between the last ``window`` sessions and the reference sessions,
    Gaussian kernel k(x, y) = exp(-|s(x) - s(y)|^2 / bw) on standardised features s
    (bandwidth bw = median squared distance within the reference). Unbiased within-
    window term: MMD^2 = mean_{i != j in win} k + mean_{r != r'} k - 2 mean_{i, r} k.

    A kernel two-sample test sees any change of the joint distribution, including the
    ones a mixture likelihood absorbs (a person's hours moving onto another member's
    while their genres stay; a newcomer resembling an existing member shifts the
    joint mix of the window). Standardised per household with the null spread of the
    same statistic on contiguous reference windows against the rest of the reference
    (contiguous, so that binges and trips inflate the null as they do in the stream):
    z = (MMD^2 - median) / (1.4826 MAD)."""

    def __init__(self, X_ref: np.ndarray, window: int,
                 null: Sequence[float] | None = None) -> None:
        self.window = window
        self.loc = X_ref[:, _MMD_FEATURE_MASK].mean(axis=0)
        self.scale = np.maximum(X_ref[:, _MMD_FEATURE_MASK].std(axis=0), MMD_SCALE_FLOOR)
        self.ref = self._standardise(X_ref)
        self.tail = np.zeros((0, self.ref.shape[1]))
        self.tail_cross = np.zeros(0)
        if null is not None:
            # A resumed detector (DriftDetector.resume): bandwidth, reference term and the
            # null's location and scale as the build measured them on the same reference
            # sessions — the n x n kernel below is what a fold no longer pays for.
            self.bandwidth, self.ref_term, self.null_loc, self.null_scale = (float(v) for v in null)
            return
        self.bandwidth, self.ref_term, self.null_loc, self.null_scale = _reference_null(self.ref, window)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (X[:, _MMD_FEATURE_MASK] - self.loc) / self.scale

    def null(self) -> list[float]:
        """What the build measured on the whole reference (the O(n^2) part), for ``null=``."""
        return [self.bandwidth, self.ref_term, self.null_loc, self.null_scale]

    def series(self, X: np.ndarray) -> np.ndarray:
        """Standardised statistic for each new session (NaN until a window is full);
        consumes the sessions (keeps the last window - 1 as the tail)."""
        out = np.full(X.shape[0], np.nan)
        w = self.window
        for c0 in range(0, X.shape[0], MMD_CHUNK):
            S = self._standardise(X[c0:c0 + MMD_CHUNK])
            cross_new = np.exp(-_sq_dist(S, self.ref) / self.bandwidth).mean(axis=1)
            Y = np.vstack((self.tail, S))
            cross = np.concatenate((self.tail_cross, cross_new))
            m = self.tail.shape[0]
            ends = np.arange(m + 1, Y.shape[0] + 1)  # window ends (exclusive) of new sessions
            full = ends >= w
            if full.any():
                K = np.exp(-_sq_dist(Y, Y) / self.bandwidth)
                starts = ends[full] - w
                within = (_block_sums(K, starts, w) - w) / (w * (w - 1))
                ccum = np.concatenate(([0.0], np.cumsum(cross)))
                xterm = (ccum[starts + w] - ccum[starts]) / w
                mmd2 = within + self.ref_term - 2.0 * xterm
                out[c0 + np.flatnonzero(full)] = (mmd2 - self.null_loc) / self.null_scale
            keep = max(w - 1, 0)
            self.tail = Y[-keep:] if keep else Y[:0]
            self.tail_cross = cross[-keep:] if keep else cross[:0]
        return out


class _RefitGLR:
    """Predictive refit GLR (statistic 6 of the module docstring). Keeps phi and the
    reference log-density of the last 2 * ``GLR_WINDOW`` sessions; ``series`` returns the
    statistic at the sessions where it is evaluated (every ``GLR_STRIDE`` sessions once
    2 * ``GLR_WINDOW`` have been seen, counted from the first monitored session) and NaN
    elsewhere. The refit of block A:
    stats = prior + sum_{i in A} r_i phi(x_i), prior = reference statistics scaled to
    ``GLR_PRIOR_SESSIONS`` sessions plus an extra component with statistics
    ``GLR_NEW_PSEUDO`` * sum_i s_i phi(x_i), s = softmax over A of -log p_ref(x_i)."""

    def __init__(self, reference: Mixture) -> None:
        self.reference = reference
        total = float(reference.stats[:, 0].sum())
        self.prior = reference.stats * (GLR_PRIOR_SESSIONS / max(total, 1e-12))
        n_phi = reference.W.shape[1]
        self.phi = np.zeros((0, n_phi))
        self.lse_ref = np.zeros(0)
        self.seen = 0

    def _block_glr(self, phi_a: np.ndarray, lse_a: np.ndarray, phi_b: np.ndarray,
                   lse_b: np.ndarray) -> float:
        surprise = -lse_a
        seed_w = np.exp(surprise - surprise.max())
        seed_w /= seed_w.sum()
        prior = np.vstack((self.prior, (GLR_NEW_PSEUDO * seed_w) @ phi_a))
        mix = Mixture(self.reference.family, prior.copy())
        for _ in range(GLR_EM_STEPS):
            lj = phi_a @ mix.W.T + mix.log_weights
            R = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
            mix.stats = prior + R.T @ phi_a
            mix.refresh()
        lse_refit = logsumexp(phi_b @ mix.W.T + mix.log_weights, axis=1)
        return float(np.minimum(lse_refit - lse_b, GLR_CLIP).sum())

    def series(self, phi: np.ndarray, lse_ref: np.ndarray) -> np.ndarray:
        """Consumes the sessions (phi rows and their reference log-densities)."""
        w, span = GLR_WINDOW, 2 * GLR_WINDOW
        out = np.full(phi.shape[0], np.nan)
        P = np.vstack((self.phi, phi))
        L = np.concatenate((self.lse_ref, lse_ref))
        offset = self.seen - self.phi.shape[0]  # stream index of P's first row
        for j in range(phi.shape[0]):
            count = self.seen + j + 1  # sessions seen up to and including this one
            if count >= span and (count - span) % GLR_STRIDE == 0:
                e = count - offset
                out[j] = self._block_glr(P[e - span:e - w], L[e - span:e - w], P[e - w:e], L[e - w:e])
        self.seen += phi.shape[0]
        self.phi, self.lse_ref = P[-(span - 1):], L[-(span - 1):]
        return out


@dataclass(frozen=True)
class DriftThresholds:
    """Alarm thresholds. Defaults: ``calibrate(alpha=0.01)`` on the maxima of 367 stable
    simulated households (default difficulty, seeds 501, ``python -m bench.accuracy
    --calibrate``); ``false_alarm_rate`` is the stated per-household rate they hold
    on that calibration set over ``horizon_sessions``."""

    cusum_h: float = 16.05  # surprise CUSUM
    kl_threshold: float = 15.04  # composition KL, chi-square standardised G
    window: int = 40
    false_alarm_rate: float = 0.01  # per household over the calibration horizon
    horizon_sessions: int = 400
    mmd_threshold: float = 20.47  # standardised window MMD
    agreement_h: float = 17.10  # block-agreement CUSUM
    weight_h: float = 16.38  # per-person weight CUSUM (maximum over persons and sides)
    glr_h: float = 37.74  # predictive refit GLR (nats over a block of GLR_WINDOW sessions)


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


def _when_where_columns(family, n_phi: int) -> np.ndarray | None:
    """Boolean mask over phi's columns of the "when and where" blocks (rhythm, device)
    for the typed family, whose log-density is a sum of per-block terms given the
    component; None for families whose blocks are coupled (full covariance)."""
    if not isinstance(family, TypedSession):
        return None
    mask = np.zeros(n_phi, dtype=bool)
    mask[1 + F.HOUR.start:1 + F.DOW.stop] = True
    mask[1 + F.DEVICE.start:1 + F.DEVICE.stop] = True
    mask[1 + F.FEATURE_DIM + _GAUSS_DIMS.size:] = True  # rhythm cells
    return mask


def _agreement(mix: Mixture, phi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pointwise mutual information between the "when/where" block T and the content
    block C of each session under the mixture:
    s = log sum_k w_k p(T|k) p(C|k) - log sum_k w_k p(T|k) - log sum_k w_k p(C|k).
    Its mean is the mutual information of the blocks (>= 0): sessions whose hours and
    devices point to one person and whose content points to another drive it down."""
    lt = phi[:, mask] @ mix.W[:, mask].T
    lc = phi[:, ~mask] @ mix.W[:, ~mask].T
    lw = mix.log_weights
    return (logsumexp(lt + lc + lw, axis=1) - logsumexp(lt + lw, axis=1) - logsumexp(lc + lw, axis=1))


class DriftDetector:
    """Streaming detector for one household. ``reference`` is the frozen mixture;
    ``holdout`` are reference-period sessions the mixture was NOT fitted on (used for
    the standardisation of the surprise)."""

    def __init__(self, reference: Mixture, holdout: np.ndarray,
                 thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
                 reference_sessions: np.ndarray | None = None) -> None:
        holdout = np.asarray(holdout, dtype=np.float64)
        if holdout.ndim != 2 or holdout.shape[0] < 2:
            raise ValueError(f"holdout must hold at least 2 sessions, got shape {holdout.shape}")
        if thresholds.window < 2:
            raise ValueError(f"thresholds.window must be >= 2, got {thresholds.window}")
        self.mmd: _WindowMMD | None = None
        # Block agreement: standardised like the surprise, on the holdout.
        self._tw_mask = _when_where_columns(reference.family, reference.W.shape[1])
        self.agree_mu = self.agree_sigma = 0.0
        if self._tw_mask is not None:
            a = _agreement(reference, reference.family.phi(holdout), self._tw_mask)
            self.agree_mu = float(np.median(a))
            self.agree_sigma = float(max(1.4826 * np.median(np.abs(a - self.agree_mu)), 0.25))
        # Chi-square standardisation of the composition G statistic: df = alive persons - 1
        # (at least 1), so one threshold serves households of every size.
        self._kl_df = float(max(int(np.sum(np.isfinite(reference.log_weights))) - 1, 1))
        # Per-person weight CUSUMs (log-likelihood ratios of the responsibility r_ik as a
        # fractional Bernoulli outcome, alternative share w' against w).
        w = np.exp(reference.log_weights)
        alive = w > 0
        w_down = WEIGHT_RHO_DOWN * w
        w_up = (w + WEIGHT_SHARE_UP) / (1.0 + WEIGHT_SHARE_UP)
        self._alive = alive & (w < 1.0 - 1e-9)  # a one-person household has no weights to shift
        with np.errstate(divide="ignore", invalid="ignore"):
            llr = np.stack([np.log(w_down / w), np.log((1 - w_down) / (1 - w)),
                            np.log(w_up / w), np.log((1 - w_up) / (1 - w))])
        self._llr = np.where(self._alive[None, :], llr, 0.0)
        self.weight_cusum = np.zeros((2, w.size))
        self.weight_start = np.zeros((2, w.size), dtype=int)
        self.max_weight = 0.0
        self.agree_cusum = 0.0
        self.agree_start = 0
        self.max_agree = 0.0
        if reference_sessions is not None:
            reference_sessions = np.asarray(reference_sessions, dtype=np.float64)
            if reference_sessions.ndim != 2 or reference_sessions.shape[1] != F.FEATURE_DIM \
                    or reference_sessions.shape[0] < 4:
                raise ValueError("reference_sessions must have shape (N >= 4, "
                                 f"{F.FEATURE_DIM}), got {reference_sessions.shape}")
            self.mmd = _WindowMMD(reference_sessions, thresholds.window)
        self.mmd_hist: list[float] = []
        self.glr = _RefitGLR(reference)
        self.max_glr = 0.0
        self.reference = reference
        self.thresholds = thresholds
        nll = self._nll(holdout)
        # Robust location/scale: one trip or guest session in the holdout must not
        # inflate sigma (median and 1.4826 * MAD, the normal-consistent MAD).
        self.mu = float(np.median(nll))
        self.allowance = CUSUM_ALLOWANCE + ALLOWANCE_GUARD * 1.2533 / np.sqrt(holdout.shape[0])
        self.sigma = float(max(1.4826 * np.median(np.abs(nll - self.mu)), 1.0))
        self.cusum = 0.0
        self.cusum_start = 0
        self.index = 0
        self.z_hist: list[float] = []
        self.post_hist: list[np.ndarray] = []
        self.block_hist: list[np.ndarray] = []
        self.alarmed = False
        self.max_cusum = 0.0
        self.max_kl = 0.0

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
        phi = self.reference.family.phi(X)
        lj = phi @ self.reference.W.T + self.reference.log_weights
        lse = logsumexp(lj, axis=1, keepdims=True)
        glr = self.glr.series(phi, lse[:, 0])
        post = np.exp(lj - lse)
        z = np.minimum((-lse[:, 0] - self.mu) / self.sigma, Z_CLIP)
        blocks = self._blocks(X, post.argmax(axis=1))
        mmd = self.mmd.series(X) if self.mmd is not None else np.full(X.shape[0], np.nan)
        if self._tw_mask is not None:
            a = _agreement(self.reference, phi, self._tw_mask)
            za = np.minimum((self.agree_mu - a) / self.agree_sigma, Z_CLIP)
        else:
            za = np.zeros(X.shape[0])
        events: list[DriftEvent] = []
        th = self.thresholds
        logw = self.reference.log_weights
        w = np.exp(logw)
        for i in range(X.shape[0]):
            self.z_hist.append(float(z[i]))
            self.post_hist.append(post[i])
            self.block_hist.append(blocks[i])
            prev = self.cusum
            self.cusum = max(0.0, self.cusum + float(z[i]) - self.allowance)
            if prev == 0.0 and self.cusum > 0.0:
                self.cusum_start = self.index
            kl_g = 0.0
            if len(self.post_hist) >= th.window:
                w_hat = np.mean(self.post_hist[-th.window:], axis=0) * 0.999 + 0.001 * w
                alive = w > 0
                g_raw = 2.0 * th.window * float(np.sum(w_hat[alive] * (np.log(w_hat[alive]) - logw[alive])))
                kl_g = (g_raw - self._kl_df) / np.sqrt(2.0 * self._kl_df)
            prev_a = self.agree_cusum
            self.agree_cusum = max(0.0, self.agree_cusum + float(za[i]) - self.allowance)
            if prev_a == 0.0 and self.agree_cusum > 0.0:
                self.agree_start = self.index
            self.max_agree = max(self.max_agree, self.agree_cusum)
            r = post[i]
            step = np.stack([r * self._llr[0] + (1 - r) * self._llr[1],
                             r * self._llr[2] + (1 - r) * self._llr[3]])
            fresh = self.weight_cusum == 0.0
            self.weight_cusum = np.maximum(0.0, self.weight_cusum + step)
            self.weight_start[fresh & (self.weight_cusum > 0)] = self.index
            weight_stat = float(self.weight_cusum.max())
            self.max_weight = max(self.max_weight, weight_stat)
            self.max_cusum = max(self.max_cusum, self.cusum)
            self.max_kl = max(self.max_kl, kl_g)
            mmd_i = float(mmd[i]) if np.isfinite(mmd[i]) else 0.0
            self.mmd_hist.append(mmd_i)
            glr_i = float(glr[i]) if np.isfinite(glr[i]) else -np.inf
            if np.isfinite(glr_i):
                self.max_glr = max(self.max_glr, glr_i)
            if not self.alarmed and (self.cusum > th.cusum_h or kl_g > th.kl_threshold
                                     or mmd_i > th.mmd_threshold
                                     or self.agree_cusum > th.agreement_h
                                     or weight_stat > th.weight_h or glr_i > th.glr_h):
                self.alarmed = True
                ts = float(timestamps[i]) if timestamps is not None else None
                events.append(self._event(kl_g, mmd_i, ts, max(glr_i, 0.0)))
            self.index += 1
        return events

    def _event(self, kl_g: float, mmd_z: float, ts: float | None, glr: float) -> DriftEvent:
        th = self.thresholds
        # The statistic furthest above its threshold names the event.
        ratios = {"surprise_cusum": self.cusum / th.cusum_h, "composition_kl": kl_g / th.kl_threshold,
                  "window_mmd": mmd_z / th.mmd_threshold,
                  "block_agreement_cusum": self.agree_cusum / th.agreement_h,
                  "person_weight_cusum": float(self.weight_cusum.max()) / th.weight_h,
                  "refit_glr": glr / th.glr_h}
        name = max(ratios, key=ratios.get)
        sev = ratios[name]
        stat = {"surprise_cusum": self.cusum, "composition_kl": kl_g, "window_mmd": mmd_z,
                "block_agreement_cusum": self.agree_cusum,
                "person_weight_cusum": float(self.weight_cusum.max()), "refit_glr": glr}[name]
        by_cusum = name not in ("composition_kl", "person_weight_cusum")
        if name == "surprise_cusum":
            start = self.cusum_start
        elif name == "block_agreement_cusum":
            start = self.agree_start
        elif name == "person_weight_cusum":
            start = int(self.weight_start.flat[int(np.argmax(self.weight_cusum))])
        elif name == "refit_glr":
            start = max(0, self.index - 2 * GLR_WINDOW + 1)  # block A's first session
        else:
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
                           "genre_excess": genre_excess, "rest_excess": rest_excess, "kl_statistic": kl_g, "mmd_statistic": mmd_z,
                           "glr_statistic": glr})

    def maxima(self) -> tuple[float, float, float, float, float, float]:
        """Largest value each statistic reached so far, in ``calibrate``'s column order
        (the refit GLR's maximum is 0 until it has been evaluated once)."""
        return (self.max_cusum, self.max_kl, float(max(self.mmd_hist, default=0.0)),
                self.max_agree, self.max_weight, self.max_glr)

    def reset(self) -> None:
        """After a re-cluster: start monitoring afresh (new reference expected)."""
        self.cusum, self.cusum_start, self.alarmed = 0.0, self.index, False
        self.agree_cusum, self.agree_start = 0.0, self.index
        self.weight_cusum = np.zeros_like(self.weight_cusum)
        self.weight_start = np.full_like(self.weight_start, self.index)

    def checkpoint(self) -> dict:
        """What ``resume`` needs, besides the sessions, to continue this detector where it
        is: the reference mixture's statistics, the window MMD's null (the build's
        O(n^2) part) and the stream state (CUSUMs, maxima, the alarm, the window MMD's
        cross terms and the refit GLR's reference log-densities of the last sessions).
        JSON-able; floats as float64 bytes (base64), so a resumed detector holds the same
        values to the bit. It holds no session vector: the standardised reference, the
        window MMD's tail, the refit GLR's window and the histories are recomputed from
        the sessions passed to ``resume`` (the keeper's fold opens them anyway), so
        nothing here is a copy of a viewer's sessions (docs/clustering.md "A fold's drift
        check resumes the detector")."""
        ref = self.reference
        if not isinstance(ref.family, TypedSession) or ref.family != TypedSession():
            raise ValueError("only the default typed family's detector can be resumed")
        return {"v": DETECTOR_STATE_VERSION, "consumed": self.index, "window": self.thresholds.window,
                "stats": _pack(ref.stats), "stats_shape": list(ref.stats.shape),
                "mmd": self.mmd.null() if self.mmd is not None else None,
                "tail_cross": _pack(self.mmd.tail_cross) if self.mmd is not None else None,
                "glr_lse": _pack(self.glr.lse_ref), "glr_seen": self.glr.seen,
                "cusum": self.cusum, "cusum_start": self.cusum_start, "max_cusum": self.max_cusum,
                "max_kl": self.max_kl, "max_mmd": max(self.mmd_hist) if self.mmd_hist else None,
                "agree_cusum": self.agree_cusum, "agree_start": self.agree_start, "max_agree": self.max_agree,
                "weight_cusum": _pack(self.weight_cusum), "weight_start": self.weight_start.tolist(),
                "max_weight": self.max_weight, "max_glr": self.max_glr, "alarmed": self.alarmed}

    @classmethod
    def resume(cls, state: dict, X_reference: np.ndarray, X_seen: np.ndarray | None,
               holdout_fraction: float = 0.25,
               thresholds: DriftThresholds = DEFAULT_THRESHOLDS) -> "DriftDetector":
        """The detector ``build_detector(X_reference, ...)`` became after ``update`` had
        consumed ``X_seen`` (None: the detector as built, before any session; only the
        state's reference part is read), from its ``checkpoint``: the reference mixture is not
        fitted again nor the window MMD's n x n kernel computed; what depends on the
        sessions alone is recomputed from them, vectorised (the holdout's
        standardisations, the standardised reference, the per-session histories the
        event typing reads, the windows). The same values as the uninterrupted detector
        up to floating-point rounding of batched products (~1e-14; a matrix product's
        rows are not bitwise the same for another number of rows, which main's own
        replays already vary): tested against it on random streams
        (tests/unit/clustering/test_drift_resume.py). Raises ValueError when the state
        does not fit the sessions."""
        X_reference = np.asarray(X_reference, dtype=np.float64)
        if state.get("v") != DETECTOR_STATE_VERSION or state["window"] != thresholds.window:
            raise ValueError("the drift detector's state does not fit these sessions")
        n = X_reference.shape[0]
        n_hold = max(2, int(round(holdout_fraction * n)))
        stats = _unpack(state["stats"]).reshape(state["stats_shape"])
        det = cls(Mixture(TypedSession(), stats), X_reference[n - n_hold:], thresholds)
        w, span = thresholds.window, 2 * GLR_WINDOW
        if state["mmd"] is not None:
            det.mmd = _WindowMMD(X_reference, w, null=state["mmd"])
        if X_seen is None:
            return det
        X_seen = np.asarray(X_seen, dtype=np.float64).reshape(-1, F.FEATURE_DIM)
        seen = X_seen.shape[0]
        if state["consumed"] != seen or state["glr_seen"] != seen:
            raise ValueError("the drift detector's state does not fit these sessions")
        if det.mmd is not None:
            keep = min(seen, max(w - 1, 0))
            det.mmd.tail = det.mmd._standardise(X_seen[seen - keep:])
            det.mmd.tail_cross = _unpack(state["tail_cross"])
            if det.mmd.tail_cross.shape[0] != keep:
                raise ValueError("the drift detector's state does not fit these sessions")
        if seen:
            phi = det.reference.family.phi(X_seen)
            lj = phi @ det.reference.W.T + det.reference.log_weights
            lse = logsumexp(lj, axis=1, keepdims=True)
            post = np.exp(lj - lse)
            z = np.minimum((-lse[:, 0] - det.mu) / det.sigma, Z_CLIP)
            det.z_hist = [float(v) for v in z]
            det.post_hist = list(post)
            det.block_hist = list(det._blocks(X_seen, post.argmax(axis=1)))
            det.glr.phi = phi[-(span - 1):]
        det.glr.lse_ref = _unpack(state["glr_lse"])
        det.glr.seen = seen
        if det.glr.lse_ref.shape[0] != det.glr.phi.shape[0]:
            raise ValueError("the drift detector's state does not fit these sessions")
        det.index = seen
        det.cusum, det.cusum_start = float(state["cusum"]), int(state["cusum_start"])
        det.agree_cusum, det.agree_start = float(state["agree_cusum"]), int(state["agree_start"])
        det.weight_cusum = _unpack(state["weight_cusum"]).reshape(det.weight_cusum.shape)
        det.weight_start = np.array(state["weight_start"], dtype=det.weight_start.dtype).reshape(
            det.weight_start.shape)
        det.max_cusum, det.max_kl = float(state["max_cusum"]), float(state["max_kl"])
        det.max_agree, det.max_weight = float(state["max_agree"]), float(state["max_weight"])
        det.max_glr, det.alarmed = float(state["max_glr"]), bool(state["alarmed"])
        # the largest window MMD so far stands for the ones before (maxima() reads it)
        det.mmd_hist = [float(state["max_mmd"])] if state["max_mmd"] is not None else []
        return det


DETECTOR_STATE_VERSION = 1


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode("ascii")


def _unpack(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f8").astype(np.float64)


def stream_maxima(reference: Mixture, holdout: np.ndarray, stream: np.ndarray,
                  reference_sessions: np.ndarray,
                  window: int = DEFAULT_THRESHOLDS.window) -> tuple[float, ...]:
    """Per-household maxima over a stream with every alarm disabled (calibration), in
    ``calibrate``'s column order: (surprise CUSUM, composition KL, window MMD, block
    agreement, person weight, refit GLR)."""
    off = DriftThresholds(np.inf, np.inf, window, mmd_threshold=np.inf, agreement_h=np.inf, weight_h=np.inf,
                          glr_h=np.inf)
    det = DriftDetector(reference, holdout, off, reference_sessions=reference_sessions)
    det.update(np.asarray(stream, dtype=np.float64))
    return det.maxima()


TAIL_FROM_QUANTILE = 0.9  # peaks over this quantile model each statistic's tail


def _tail_threshold(x: np.ndarray, p: float) -> float:
    """Threshold exceeded with probability ``p`` under an exponential tail fitted to the
    peaks over the ``TAIL_FROM_QUANTILE`` quantile (peaks-over-threshold; the maxima of a
    CUSUM are close to Gumbel, whose tail is exponential):
    t = u + mean(x - u | x > u) * log((1 - q0) / p)."""
    u = float(np.quantile(x, TAIL_FROM_QUANTILE))
    excess = x[x > u] - u
    scale = float(excess.mean()) if excess.size else 0.0
    return u + max(scale, 1e-9) * float(np.log((1.0 - TAIL_FROM_QUANTILE) / p))


def calibrate(maxima: Sequence[Sequence[float]], alpha: float = 0.01,
              window: int = DEFAULT_THRESHOLDS.window, horizon: int = 400) -> DriftThresholds:
    """Thresholds from stable households' stream maxima, columns in the order
    (surprise CUSUM, composition KL[, window MMD[, block agreement[, person weight[,
    refit GLR]]]]).

    Each statistic gets the threshold its fitted tail (``_tail_threshold``) exceeds with
    the same probability p; p is the largest value on a geometric grid from alpha down
    at which the share of calibration households with *any* statistic above its
    threshold is <= alpha. The union is thereby held at alpha on the calibration data
    (not each statistic; correlated statistics get more room than Bonferroni's
    alpha / m), while the fitted tails give thresholds that vary smoothly instead of
    jumping between the few most extreme households, which is all an empirical 99.9 %
    quantile of a few hundred households can see. Columns not given are disabled (inf)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arr = np.asarray(maxima, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 10 or arr.shape[1] not in (2, 3, 4, 5, 6):
        raise ValueError("maxima must hold at least 10 rows of (cusum, kl[, mmd[, agreement[, weight[, glr]]]]) "
                         "maxima")
    if not np.all(np.isfinite(arr)):
        raise ValueError("maxima must be finite")
    th = np.full(arr.shape[1], np.inf)
    for p in np.geomspace(alpha, alpha * 1e-4, 400):
        th = np.array([_tail_threshold(arr[:, j], p) for j in range(arr.shape[1])])
        if np.mean(np.any(arr > th, axis=1)) <= alpha:
            break
    else:
        th = arr.max(axis=0)  # unreachable in practice: above every calibration maximum
    full = np.concatenate((th, np.full(6 - th.size, np.inf)))
    return DriftThresholds(float(full[0]), float(full[1]), window, alpha, horizon,
                           float(full[2]), float(full[3]), float(full[4]), float(full[5]))


def build_detector(X_reference: np.ndarray, family=None, k_max: int = 6, seed: int = 0,
                   holdout_fraction: float = 0.25,
                   thresholds: DriftThresholds = DEFAULT_THRESHOLDS) -> DriftDetector:
    """Reference mixture fitted on the first (1 - holdout_fraction) of the reference
    sessions (time order), standardisation of the surprise measured on the rest (out of
    sample); the window MMD compares against all reference sessions."""
    from services.clustering.domain.gmm import fit_select_k

    X_reference = np.asarray(X_reference, dtype=np.float64)
    if X_reference.ndim != 2 or X_reference.shape[1] != F.FEATURE_DIM:
        raise ValueError(f"X_reference must have shape (N, {F.FEATURE_DIM}), got {X_reference.shape}")
    if not np.all(np.isfinite(X_reference)):
        raise ValueError("X_reference contains NaN or infinite values")
    n = X_reference.shape[0]
    n_hold = max(2, int(round(holdout_fraction * n)))
    if n - n_hold < 5:
        raise ValueError(f"X_reference needs at least {n_hold + 5} sessions, got {n}")
    sel = fit_select_k(X_reference[: n - n_hold], k_max, family, seed)
    return DriftDetector(sel.model, X_reference[n - n_hold:], thresholds, reference_sessions=X_reference)
