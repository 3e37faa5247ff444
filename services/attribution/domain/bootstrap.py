r"""Bootstrap confidence intervals of every method's credit, by journey resampling.

Resampling unit: one *journey* (one conversion or one null of a path). A path row
with ``c`` conversions and ``n`` nulls stands for ``c + n`` journeys, so the Poisson
bootstrap (each journey drawn ``Poisson(1)`` times) gives the row ``c* ~ Poisson(c)``
conversions and ``n* ~ Poisson(n)`` nulls, independently; its value becomes
``v * c*/c`` (each conversion keeps the row's mean value). Because a sum of
independent Poissons is Poisson of the sum, identical paths can be grouped first and
drawn once per *unique* path: grouped and ungrouped inputs have the same bootstrap
distribution. A fractional weight (a conversion split over persons, ``q`` and
``1 - q``) is treated as ``q`` conversion units and ``1 - q`` null units: the Poisson
draw then has mean ``q`` -- an approximation that keeps the expected weights.

Nothing is rebuilt from rows per replicate:

* **Linear methods** (first/last touch, linear, time decay, position-based, Shapley):
  credit is ``A^T w`` with ``A`` the (unique paths x channels) matrix of touch
  fractions, so ``B`` replicates are one sparse-dense product ``A^T W``.
* **Markov**: the walk of every unique path is turned once into an incidence matrix
  ``E`` (unique paths x distinct transitions) and a last-state matrix ``L``; a
  replicate's transition counts are ``E^T (C* + N*)``, its conversion/null/value
  columns ``L^T C*``, ``L^T N*``, ``L^T V*``. Each replicate's chain is then solved
  exactly like the point estimate (same conventions, same solver).
* **Hybrid**: ``alpha M_b + (1 - alpha) S_b`` with the *same* draws for both parts.

Replicates are processed in blocks so the (unique paths x block) weight matrices stay
under ~64 MB. Intervals are percentile intervals at ``level`` (default 95 %) with the
bootstrap standard error beside them; the seed makes them reproducible. A chosen
Markov order (``order="auto"``) is held fixed in the replicates: the interval does
not include the uncertainty of choosing the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.heuristics import HEURISTICS, HeuristicParams, credited_values, touch_fractions
from services.attribution.domain.markov import (
    MarkovChain,
    MarkovConventions,
    _check_key_space,
    _state_sequences,
    credit_from_removal_effects,
    solve_removal_effects,
)
from services.attribution.domain.paths import Paths
from services.attribution.domain.shapley import shapley_touch_fractions
from services.common.client import check_serving_deadline
from services.common.lazy_import import lazy_module

# scipy.sparse is imported at its first use: the service starts without it (services/common/lazy_import.py)
sp = lazy_module("scipy.sparse")

MAX_REPLICATES = 10_000
BLOCK_CELLS = 8_000_000  # unique paths x replicates per block (64 MB of float64 per matrix)


@dataclass(frozen=True)
class BootstrapSpec:
    """``replicates`` (0 = no intervals), ``seed``, ``level`` of the percentile interval."""

    replicates: int = 0
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.replicates, (int, np.integer)) or not 0 <= self.replicates <= MAX_REPLICATES:
            raise AttributionInputError("bootstrap_replicates", f"must be an integer in 0..{MAX_REPLICATES}")
        if self.replicates == 1:
            raise AttributionInputError("bootstrap_replicates", "need at least 2 replicates for an interval (0 = none)")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
            raise AttributionInputError("bootstrap_seed", "must be an integer in 0..2**63-1")
        lv = float(self.level)
        if not np.isfinite(lv) or not 0.5 <= lv < 1.0:
            raise AttributionInputError("confidence_level", f"must be in [0.5, 1), got {self.level!r}")


@dataclass(frozen=True, eq=False)
class Intervals:
    """Percentile intervals and standard errors per channel code."""

    level: float
    replicates: int
    seed: int
    conversions_lower: np.ndarray
    conversions_upper: np.ndarray
    conversions_se: np.ndarray
    revenue_lower: np.ndarray
    revenue_upper: np.ndarray
    share_lower: np.ndarray
    share_upper: np.ndarray

    @classmethod
    def from_replicates(cls, spec: BootstrapSpec, conversions: np.ndarray, revenue: np.ndarray) -> Intervals:
        q = (1.0 - spec.level) / 2.0
        totals = conversions.sum(axis=1, keepdims=True)
        shares = np.divide(conversions, totals, out=np.zeros_like(conversions), where=totals > 0)
        lo, hi = 100 * q, 100 * (1 - q)
        return cls(
            level=spec.level, replicates=spec.replicates, seed=spec.seed,
            conversions_lower=np.percentile(conversions, lo, axis=0),
            conversions_upper=np.percentile(conversions, hi, axis=0),
            conversions_se=conversions.std(axis=0, ddof=1),
            revenue_lower=np.percentile(revenue, lo, axis=0),
            revenue_upper=np.percentile(revenue, hi, axis=0),
            share_lower=np.percentile(shares, lo, axis=0),
            share_upper=np.percentile(shares, hi, axis=0),
        )


# ---- grouping ----------------------------------------------------------------------------


def group_identical_paths(paths: Paths) -> tuple[Paths, np.ndarray]:
    """(one path per distinct channel sequence with summed weights, group of every row).

    Sequences are identified by two independent 64-bit polynomial hashes plus the
    length (vectorised; a collision needs both hashes to collide).
    """
    n = paths.n_paths
    if n == 0:
        return paths, np.zeros(0, dtype=np.int64)
    row = paths.row_of_touch()
    pos = np.arange(paths.n_touches, dtype=np.int64) - paths.offsets[:-1][row]
    code = paths.channels.astype(np.uint64) + np.uint64(1)
    hashes = []
    for mult in (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)):
        max_len = int(paths.lengths.max()) if n else 0
        powers = np.ones(max(max_len, 1), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(1, powers.size):
                powers[i] = powers[i - 1] * mult
            term = code * powers[pos]
        h = np.zeros(n, dtype=np.uint64)
        _add_reduce_rows(h, term, paths)
        hashes.append(h)
    # One sort on the first hash; the second (and the length) only has to agree within
    # each group, else fall back to sorting on all three.
    _, first, group = np.unique(hashes[0], return_index=True, return_inverse=True)
    group = group.ravel()
    if not (np.array_equal(hashes[1], hashes[1][first][group])
            and np.array_equal(paths.lengths, paths.lengths[first][group])):  # pragma: no cover
        key = np.empty(n, dtype=[("h1", np.uint64), ("h2", np.uint64), ("len", np.int64)])
        key["h1"], key["h2"], key["len"] = hashes[0], hashes[1], paths.lengths
        _, first, group = np.unique(key, return_index=True, return_inverse=True)
        group = group.ravel()
    reps = paths.select(first)
    g = first.size
    grouped = Paths(
        channels=reps.channels, offsets=reps.offsets,
        conversions=np.bincount(group, weights=paths.conversions, minlength=g),
        values=np.bincount(group, weights=credited_values(paths), minlength=g),
        nulls=np.bincount(group, weights=paths.nulls, minlength=g),
        channel_names=paths.channel_names,
    )
    return grouped, group


def _add_reduce_rows(out: np.ndarray, term: np.ndarray, paths: Paths) -> None:
    """Per-row wrapping uint64 sums of ``term`` (rows with touches)."""
    nonempty = paths.lengths > 0
    starts = paths.offsets[:-1][nonempty]
    with np.errstate(over="ignore"):
        out[nonempty] = np.add.reduceat(term, starts)


# ---- draws -------------------------------------------------------------------------------


def _blocks(n_units: int, replicates: int) -> list[int]:
    size = max(1, min(replicates, BLOCK_CELLS // max(n_units, 1)))
    sizes = [size] * (replicates // size)
    if replicates % size:
        sizes.append(replicates % size)
    return sizes


def _poisson(rng: np.random.Generator, lam: np.ndarray, b: int) -> np.ndarray:
    """(len(lam), b) Poisson draws; rows with mean 0 are 0 without drawing. (An
    inverse-CDF table per distinct mean was tried and was not faster here.)"""
    out = np.zeros((lam.size, b))
    positive = np.flatnonzero(lam > 0)
    if positive.size:
        out[positive] = rng.poisson(lam[positive, None], size=(positive.size, b))
    return out


def _draw(rng: np.random.Generator, conv: np.ndarray, nulls: np.ndarray, value: np.ndarray, b: int):
    """Poisson-resampled (conversions, nulls, values), each (units, b)."""
    c = _poisson(rng, conv, b)
    nl = _poisson(rng, nulls, b)
    per_conv = np.divide(value, conv, out=np.zeros_like(value), where=conv > 0)
    return c, nl, c * per_conv[:, None]


# ---- Markov structure --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _WalkStructure:
    n_states: int
    edges: sp.csr_matrix          # (units, K) multiplicity of transition k in the unit's walk
    edge_rows: np.ndarray         # (K,) source index (S = start)
    edge_cols: np.ndarray         # (K,) destination index
    last: sp.csr_matrix           # (units, S) one-hot last state
    membership: sp.csr_matrix
    longest: int


def _walk_structure(units: Paths, conventions: MarkovConventions) -> _WalkStructure:
    base = _check_key_space(units.n_channels, conventions.order)
    keys, offsets = _state_sequences(units, conventions, base)
    state_keys, ids = np.unique(keys, return_inverse=True)
    ids = ids.ravel()
    s = state_keys.size
    n_u = units.n_paths
    seq_len = np.diff(offsets)
    unit_of_state = np.repeat(np.arange(n_u, dtype=np.int64), seq_len)
    inner = np.ones(ids.size, dtype=bool)
    inner[offsets[1:] - 1] = False
    src = np.concatenate((np.full(n_u, s, np.int64), ids[inner]))
    dst = np.concatenate((ids[offsets[:-1]], ids[1:][inner[:-1]]))
    unit = np.concatenate((np.arange(n_u, dtype=np.int64), unit_of_state[inner]))
    pair_ids, pair = np.unique(src * (s + 1) + dst, return_inverse=True)
    edges = sp.csr_matrix((np.ones(unit.size), (unit, pair.ravel())), shape=(n_u, pair_ids.size))
    edges.sum_duplicates()
    last = sp.csr_matrix(
        (np.ones(n_u), (np.arange(n_u), ids[offsets[1:] - 1])), shape=(n_u, s)
    )
    template = MarkovChain(
        order=conventions.order, channel_names=units.channel_names, state_keys=state_keys,
        counts=sp.csr_matrix((s + 1, s + 3)), conversion_value=np.zeros(s + 1),
        total_conversions=0.0, total_value=0.0, max_states_per_path=0, n_paths=0,
    )
    return _WalkStructure(
        n_states=s, edges=edges, edge_rows=pair_ids // (s + 1), edge_cols=pair_ids % (s + 1),
        last=last, membership=template.membership(), longest=int(seq_len.max()) if n_u else 0,
    )


def _markov_replicate(
    ws: _WalkStructure, edge_w: np.ndarray, conv: np.ndarray, nulls: np.ndarray, value: np.ndarray,
    conventions: MarkovConventions, horizon: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    s = ws.n_states
    states = np.arange(s)
    rows = np.concatenate((ws.edge_rows, states, states))
    cols = np.concatenate((ws.edge_cols, np.full(s, s + 1), np.full(s, s + 2)))
    data = np.concatenate((edge_w, conv, nulls))
    counts = sp.csr_matrix((data, (rows, cols)), shape=(s + 1, s + 3))
    totals = np.asarray(counts.sum(axis=1)).ravel()
    inv = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    probabilities = sp.csr_matrix(sp.diags(inv) @ counts)
    mean_value = np.zeros(s + 1)
    mean_value[:s] = np.divide(value, conv, out=np.zeros_like(value), where=conv > 0)
    effects = solve_removal_effects(
        probabilities, ws.membership, mean_value, horizon=horizon, solver=conventions.solver
    )
    return credit_from_removal_effects(effects, float(conv.sum()), float(value.sum()), conventions.revenue)


# ---- driver ------------------------------------------------------------------------------

LINEAR_METHODS = (*HEURISTICS, "shapley")


def bootstrap_replicates(
    paths: Paths,
    methods: Sequence[str],
    spec: BootstrapSpec,
    *,
    conventions: MarkovConventions | None = None,
    alpha: float = 0.5,
    heuristic_params: HeuristicParams | None = None,
    touch_ages: np.ndarray | None = None,
    prior_paths: Paths | None = None,
    prior_strength: float = 0.0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{method: (conversions (B, C), revenue (B, C))}`` over ``spec.replicates`` draws.

    ``methods`` may hold any heuristic, ``"shapley"``, ``"markov"`` and ``"hybrid"``;
    all share the same draws. With ``prior_paths`` (same vocabulary) the Markov part
    of every replicate is the persona-smoothed chain of the resampled journeys (the
    prior's journeys stay fixed).
    """
    conventions = conventions or MarkovConventions()
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in (*LINEAR_METHODS, "markov", "hybrid")]
    if unknown:
        raise AttributionInputError("method", f"no bootstrap for {unknown}")
    n_ch = paths.n_channels
    b_total = spec.replicates
    nonempty = paths.lengths > 0
    if touch_ages is not None:
        # Ages differ between otherwise identical paths: rows are the units.
        row_keep = np.repeat(nonempty, paths.lengths)
        units, ages = paths.select(nonempty), np.asarray(touch_ages)[row_keep]
        units = Paths(units.channels, units.offsets, units.conversions, credited_values(units),
                      units.nulls, units.channel_names)
    else:
        units, _ = group_identical_paths(paths.select(nonempty))
        ages = None
    n_u = units.n_paths
    need_markov = any(m in ("markov", "hybrid") for m in methods)
    need_linear = {m for m in methods if m in LINEAR_METHODS}
    if "hybrid" in methods:
        need_linear.add("shapley")
    allocation: dict[str, sp.csr_matrix] = {}
    row = units.row_of_touch()
    for m in need_linear:
        frac = shapley_touch_fractions(units) if m == "shapley" else touch_fractions(
            units, m, heuristic_params, ages)
        allocation[m] = sp.csr_matrix((frac, (units.channels, row)), shape=(n_ch, n_u))
    smoothed = prior_paths is not None and prior_strength > 0
    ws = _walk_structure(units, conventions) if need_markov and n_u and not smoothed else None
    horizon = conventions.horizon
    if horizon == "data" and ws is not None:
        horizon = ws.longest + 1
    nulls_in = units.nulls if conventions.include_nulls else np.zeros(n_u)
    out_conv = {m: np.zeros((b_total, n_ch)) for m in methods}
    out_rev = {m: np.zeros((b_total, n_ch)) for m in methods}
    markov_c = np.zeros((b_total, n_ch))
    markov_r = np.zeros((b_total, n_ch))
    rng = np.random.default_rng(spec.seed)
    done = 0
    for b in _blocks(n_u, b_total):
        check_serving_deadline()
        c, nl, v = _draw(rng, units.conversions, nulls_in, units.values, b)
        sl = slice(done, done + b)
        linear_c = {m: (a @ c).T for m, a in allocation.items()}
        linear_r = {m: (a @ v).T for m, a in allocation.items()}
        for m in allocation:
            if m in out_conv:
                out_conv[m][sl], out_rev[m][sl] = linear_c[m], linear_r[m]
        if ws is not None:
            edge_w = (ws.edges.T @ (c + nl))
            conv_s = ws.last.T @ c
            null_s = ws.last.T @ nl
            val_s = ws.last.T @ v
            for j in range(b):
                check_serving_deadline()  # each replicate is a chain solve: stop once nobody waits
                mc, mr = _markov_replicate(ws, edge_w[:, j], conv_s[:, j], null_s[:, j], val_s[:, j],
                                           conventions, horizon)
                markov_c[done + j], markov_r[done + j] = mc, mr
        if need_markov and smoothed:
            from services.attribution.domain.hybrid import smoothed_markov_attribution

            for j in range(b):
                check_serving_deadline()
                resampled = Paths(units.channels, units.offsets, c[:, j], v[:, j], nl[:, j], units.channel_names)
                res = smoothed_markov_attribution(resampled, prior_paths, prior_strength, conventions)
                markov_c[done + j], markov_r[done + j] = res.conversions, res.revenue
        if "hybrid" in methods:
            sc, sr = linear_c["shapley"], linear_r["shapley"]
            out_conv["hybrid"][sl] = alpha * markov_c[sl] + (1 - alpha) * sc
            out_rev["hybrid"][sl] = alpha * markov_r[sl] + (1 - alpha) * sr
        done += b
    if "markov" in methods:
        out_conv["markov"], out_rev["markov"] = markov_c, markov_r
    return {m: (out_conv[m], out_rev[m]) for m in methods}


def bootstrap_intervals(
    paths: Paths, methods: Sequence[str], spec: BootstrapSpec, **kwargs
) -> dict[str, Intervals]:
    """Percentile intervals per method (see :func:`bootstrap_replicates` for kwargs)."""
    reps = bootstrap_replicates(paths, methods, spec, **kwargs)
    return {m: Intervals.from_replicates(spec, c, r) for m, (c, r) in reps.items()}
