"""Exact k-order Markov attribution (removal effects), orders 1 to 4.

Model
-----
Each journey ``c_1 > c_2 > ... > c_n`` becomes a walk through *states*:

``(start) -> s_1 -> ... -> s_m -> (conversion) | (null)``

* **States** (order ``k``) are tuples of ``k`` consecutive channels. Default
  (ChannelAttribution's convention, ``warmup_states=False``): the states of a path of
  length ``n >= k`` are its ``n-k+1`` sliding windows; a path shorter than ``k`` is one
  shorter state (``("a", "b")`` at order 3). With ``warmup_states=True`` a state ends
  at *every* touch and holds the last ``min(k, t)`` channels, so ``start -> (a) ->
  (a, b) -> (a, b, c) -> (b, c, d)``.
* **Repeats** (``repeats``): ``"collapse_states"`` (default, ChannelAttribution's)
  merges consecutive identical states of a walk, so there are no self-loops; at order 1
  this is the same as merging runs of a channel. ``"collapse_channels"`` merges runs of
  a channel in the path *before* building states. ``"keep"`` keeps everything
  (self-loops allowed).
* **Weights.** Every transition of a path is counted with the path's weight
  ``w = conversions + nulls`` (``conversions`` only when ``include_nulls=False``); the
  last state moves to ``(conversion)`` with weight ``conversions`` and to ``(null)``
  with weight ``nulls``. Weights may be fractional and are used exactly
  (ChannelAttribution truncates them to integers). Transition probabilities are the
  row-normalised counts: ``P[s, t] = W[s, t] / sum_t W[s, t]``.

Exact solution
--------------
With ``Q`` the transient block (start and channel states) and ``r[s] = P[s, conv]``,
the conversion probability from every transient state is the absorption probability
``x = (I - Q)^{-1} r`` (fundamental matrix ``N = (I - Q)^{-1}``); the model's
conversion probability is ``x[start]``. No simulation is involved.

**Removal of channel c** (ChannelAttribution's convention): every state that
*contains* ``c`` anywhere in its tuple is redirected to ``(null)``: its row of ``Q`` and
its ``r`` entry become 0. With ``x^{-c}`` the absorption probability of that chain,
the removal effect is ``RE_c = x[start] - x^{-c}[start]`` (= P(convert and visit a
state containing c)), reported relative to the baseline as ``RE_c / x[start]``.
Credit: ``credit_c = total_conversions * RE_c / sum_j RE_j``.

**Revenue** (``revenue``):

* ``"value_chain"`` (default; what ChannelAttribution estimates by simulation): the
  conversion edge of state ``s`` carries the mean value per conversion of the paths
  ending in ``s``, ``vbar[s] = sum(values) / sum(conversions)`` over those paths, so
  the expected value is ``y = N (r * vbar)``; removal effects on value use ``y`` the
  same way and ``revenue_c = total_value * REV_c / sum_j REV_j``.
* ``"conversion_share"``: ``revenue_c = total_value * credit_c / total_conversions``.

Where ``total_value`` counts values of paths with conversions > 0 only (a value
without a conversion cannot flow through a conversion edge).

**Horizon** (``horizon``): ``None`` (default) solves the infinite-horizon chain. An
integer ``H`` counts a conversion only if it happens after at most ``H`` channel
states, computed exactly with ``H + 1`` sparse matrix products. ``"data"`` uses
``H = (longest observed walk in states) + 1``, which is where ChannelAttribution 2.2.5
cuts its simulated walks (a walk still running then counts as no conversion); use it
to reproduce ChannelAttribution's numbers, whose loops are otherwise truncated.

Solvers: for up to ``DENSE_LIMIT`` transient states the fundamental matrix is formed
densely and every removal uses the first-passage identity ``RE_c = N[start, A]
N[A, A]^{-1} x[A]`` (``A`` = states containing c; one factorisation in total). Larger
chains are solved per channel on the kept states with scipy's sparse LU when that is
cheap, or with GMRES whose residual is verified to ``1e-12`` (falling back to sparse
LU otherwise): the k-order window graph is an expander, so LU fill-in grows towards
dense while Krylov iterations converge in a few dozen steps because every step is
absorbed with probability ~1/(mean path length).

Memory: the builder accepts an iterable of :class:`Paths` chunks; only the aggregated
transition counts (one entry per distinct transition) outlive a chunk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths
from services.common.client import check_serving_deadline
from services.common.lazy_import import lazy_module

# scipy.sparse is imported at its first use: the service starts without it (services/common/lazy_import.py)
sp = lazy_module("scipy.sparse")
spla = lazy_module("scipy.sparse.linalg")

Repeats = Literal["collapse_states", "collapse_channels", "keep"]
Revenue = Literal["value_chain", "conversion_share"]
Solver = Literal["auto", "dense", "sparse_lu", "iterative"]

MAX_ORDER = 4
DENSE_LIMIT = 1200
"""Transient-state count up to which the dense fundamental matrix is used."""
RESIDUAL_TOL = 1e-12

_LUT_LIMIT = 1 << 22  # key spaces up to this size use a lookup table instead of a sort

# Special keys for start and the absorbing states while assembling edges.
_START, _CONV, _NULL = -1, -2, -3


@dataclass(frozen=True)
class MarkovConventions:
    """Switchable conventions; the defaults are ChannelAttribution's (see module doc)."""

    order: int = 1
    repeats: Repeats = "collapse_states"
    include_nulls: bool = True
    warmup_states: bool = False
    horizon: int | Literal["data"] | None = None
    revenue: Revenue = "value_chain"
    solver: Solver = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.order, (int, np.integer)) or not 1 <= self.order <= MAX_ORDER:
            raise AttributionInputError("order", f"must be an integer in 1..{MAX_ORDER}, got {self.order!r}")
        if self.repeats not in ("collapse_states", "collapse_channels", "keep"):
            raise AttributionInputError("repeats", f"unknown convention {self.repeats!r}")
        if self.revenue not in ("value_chain", "conversion_share"):
            raise AttributionInputError("revenue", f"unknown convention {self.revenue!r}")
        if self.solver not in ("auto", "dense", "sparse_lu", "iterative"):
            raise AttributionInputError("solver", f"unknown solver {self.solver!r}")
        if self.horizon is not None and self.horizon != "data" and (
            not isinstance(self.horizon, (int, np.integer)) or self.horizon < 1
        ):
            raise AttributionInputError(
                "horizon", f"must be None, 'data' or an integer >= 1, got {self.horizon!r}"
            )


@dataclass(frozen=True, eq=False)
class MarkovChain:
    """Aggregated transition counts of a k-order chain.

    Index layout of ``counts`` (shape ``(S+1, S+3)``): rows/columns ``0..S-1`` are the
    channel states in ``state_keys`` order, ``S`` is ``(start)``, column ``S+1`` is
    ``(conversion)`` and ``S+2`` is ``(null)``. ``conversion_value[s]`` is the value of
    the conversions leaving state ``s``.

    A state key encodes the tuple in base ``B = n_channels + 1``: digit ``j`` (weight
    ``B**j``) is ``code + 1`` of the channel ``j`` touches before the newest, 0 = none.
    """

    order: int
    channel_names: tuple[str, ...]
    state_keys: np.ndarray
    counts: sp.csr_matrix
    conversion_value: np.ndarray
    total_conversions: float
    total_value: float
    max_states_per_path: int
    n_paths: int

    @property
    def n_states(self) -> int:
        return int(self.state_keys.size)

    @property
    def start(self) -> int:
        return self.n_states

    def state_tuples(self) -> list[tuple[str, ...]]:
        """Channel labels of every state, oldest first (for export and debugging)."""
        base = len(self.channel_names) + 1
        out = []
        for key in self.state_keys.tolist():
            digits = []
            for _ in range(self.order):
                key, d = divmod(key, base)
                if d:
                    digits.append(self.channel_names[d - 1])
            out.append(tuple(reversed(digits)))
        return out

    def membership(self) -> sp.csr_matrix:
        """Boolean (S, n_channels) matrix: state s contains channel c."""
        base = len(self.channel_names) + 1
        rows, cols = [], []
        keys = self.state_keys
        for j in range(self.order):
            digit = (keys // base**j) % base
            has = digit > 0
            rows.append(np.flatnonzero(has))
            cols.append(digit[has] - 1)
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        m = sp.csr_matrix(
            (np.ones(r.size, dtype=bool), (r, c)),
            shape=(self.n_states, len(self.channel_names)),
        )
        m.sum_duplicates()
        return m

    def transition_probabilities(self) -> sp.csr_matrix:
        """Row-normalised ``counts`` (rows with no outgoing weight stay 0)."""
        totals = np.asarray(self.counts.sum(axis=1)).ravel()
        inv = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
        return sp.csr_matrix(sp.diags(inv) @ self.counts)

    def mean_conversion_value(self) -> np.ndarray:
        """``vbar[s]`` = value per conversion leaving state s (0 where none)."""
        conv = self.counts[:, self.n_states + 1].toarray().ravel()
        return np.divide(
            self.conversion_value, conv, out=np.zeros_like(conv), where=conv > 0
        )


@dataclass(frozen=True, eq=False)
class RemovalEffects:
    """Absorption results of one chain; arrays are indexed by channel code."""

    conversion_probability: float
    expected_value: float
    removal_conversion: np.ndarray
    """Absolute drop of the conversion probability when the channel is removed."""
    removal_value: np.ndarray
    """Absolute drop of the expected value per journey when the channel is removed."""
    solver: str


@dataclass(frozen=True, eq=False)
class MarkovResult:
    """Per-channel Markov attribution; arrays are indexed by channel code."""

    channel_names: tuple[str, ...]
    conversions: np.ndarray
    revenue: np.ndarray
    removal_effects: np.ndarray
    """Relative removal effects ``RE_c / P(conv)`` (what ChannelAttribution reports)."""
    removal_effects_value: np.ndarray
    conversion_probability: float
    total_conversions: float
    total_value: float
    n_states: int
    solver: str
    conventions: MarkovConventions = field(default_factory=MarkovConventions)

    @property
    def shares(self) -> np.ndarray:
        total = self.conversions.sum()
        return self.conversions / total if total > 0 else np.zeros_like(self.conversions)


# ---- chain construction -----------------------------------------------------------------


def _check_key_space(n_channels: int, order: int) -> int:
    base = n_channels + 1
    if order * np.log2(base) >= 62:
        raise AttributionInputError(
            "order", f"{n_channels} channels at order {order} overflow the 64-bit state key"
        )
    return base


def _state_sequences(
    paths: Paths, conventions: MarkovConventions, base: int
) -> tuple[np.ndarray, np.ndarray]:
    """State keys of every path's walk (CSR: keys, offsets), conventions applied."""
    order = conventions.order
    if conventions.repeats == "collapse_channels":
        paths = paths.collapse_repeats()
    lengths = paths.lengths
    n_touch = paths.n_touches
    codes = paths.channels.astype(np.int64) + 1
    row = np.repeat(np.arange(paths.n_paths, dtype=np.int64), lengths)
    pos = np.arange(n_touch, dtype=np.int64) - paths.offsets[:-1][row]
    keys = codes.copy()
    for j in range(1, order):
        shifted = np.zeros(n_touch, dtype=np.int64)
        shifted[j:] = codes[:-j]
        keys += np.where(pos >= j, shifted, 0) * base**j
    if conventions.warmup_states or order == 1:
        is_state = np.ones(n_touch, dtype=bool)
    else:
        row_len = lengths[row]
        is_state = (pos >= order - 1) | ((row_len < order) & (pos == row_len - 1))
    keys = keys[is_state]
    row = row[is_state]
    if conventions.repeats != "keep" and keys.size > 1:
        repeat = np.zeros(keys.size, dtype=bool)
        repeat[1:] = (keys[1:] == keys[:-1]) & (row[1:] == row[:-1])
        keys = keys[~repeat]
        row = row[~repeat]
    offsets = np.zeros(paths.n_paths + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=paths.n_paths), out=offsets[1:])
    return keys, offsets


def _chunk_edges(
    paths: Paths, conventions: MarkovConventions, base: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Aggregated (from_key, to_key, weight, value) of one chunk and its longest walk.

    Edges are aggregated in a dense id space of the chunk's distinct states: the start,
    conversion and null edges with one ``bincount`` each, state-to-state edges with a
    ``bincount`` over pair ids (small chains) or a coo->csr reduction (large ones).
    Zero-weight paths go through the same arithmetic and are dropped as zero edges.
    """
    if np.any(paths.lengths == 0):
        paths = paths.without_empty()
    if paths.n_paths == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), np.zeros(0), 0
    weight = paths.conversions + (paths.nulls if conventions.include_nulls else 0.0)
    nulls = paths.nulls if conventions.include_nulls else np.zeros(paths.n_paths)
    value = np.where(paths.conversions > 0, paths.values, 0.0)
    keys, offsets = _state_sequences(paths, conventions, base)
    uniq, ids = _dense_ids(keys, base**conventions.order)
    n = uniq.size
    seq_len = np.diff(offsets)
    first_ids = ids[offsets[:-1]]
    last_ids = ids[offsets[1:] - 1]
    w_start = np.bincount(first_ids, weights=weight, minlength=n)
    w_conv = np.bincount(last_ids, weights=paths.conversions, minlength=n)
    w_null = np.bincount(last_ids, weights=nulls, minlength=n)
    v_conv = np.bincount(last_ids, weights=value, minlength=n)
    inner = np.ones(ids.size, dtype=bool)
    inner[offsets[1:] - 1] = False  # the last state of a walk has no successor state
    row = np.repeat(np.arange(paths.n_paths, dtype=np.int64), seq_len)
    s_id = ids[inner]
    d_id = ids[1:][inner[:-1]]
    w_inner = weight[row[inner]]
    if n * n <= _LUT_LIMIT:
        pair_w = np.bincount(s_id * n + d_id, weights=w_inner, minlength=n * n)
        nz = np.flatnonzero(pair_w)
        inner_src, inner_dst, inner_w = uniq[nz // n], uniq[nz % n], pair_w[nz]
    else:
        m = sp.csr_matrix((w_inner, (s_id, d_id)), shape=(n, n))
        m.sum_duplicates()
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(m.indptr))
        inner_src, inner_dst, inner_w = uniq[rows], uniq[m.indices], m.data
    src = np.concatenate((np.full(n, _START, np.int64), inner_src, uniq, uniq))
    dst = np.concatenate((uniq, inner_dst, np.full(n, _CONV, np.int64), np.full(n, _NULL, np.int64)))
    w = np.concatenate((w_start, inner_w, w_conv, w_null))
    v = np.concatenate((np.zeros(n + inner_w.size), v_conv, np.zeros(n)))
    keep = w > 0
    return src[keep], dst[keep], w[keep], v[keep], int(seq_len.max())


def _dense_ids(keys: np.ndarray, key_space: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and the id of every key (lookup table when the space is small)."""
    shifted = keys + 3  # special keys -3..-1 -> 0..2
    if key_space + 3 <= _LUT_LIMIT:
        present = np.bincount(shifted, minlength=key_space + 3) > 0
        uniq = np.flatnonzero(present)
        lut = np.zeros(key_space + 3, dtype=np.int64)
        lut[uniq] = np.arange(uniq.size)
        return uniq - 3, lut[shifted]
    uniq, inv = np.unique(shifted, return_inverse=True)
    return uniq - 3, inv


def _aggregate_edges(
    src: np.ndarray, dst: np.ndarray, w: np.ndarray, v: np.ndarray, key_space: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sum weights and values of identical (src, dst) pairs."""
    if src.size == 0:
        return src, dst, w, v
    uniq, ids = _dense_ids(np.concatenate((src, dst)), key_space)
    n = uniq.size
    s_id, d_id = ids[: src.size], ids[src.size :]
    shape = (n, n)
    if n * n <= _LUT_LIMIT:
        pair = s_id * n + d_id
        w_sum = np.bincount(pair, weights=w, minlength=n * n)
        v_sum = np.bincount(pair, weights=v, minlength=n * n)
        nz = np.flatnonzero(w_sum)
        return uniq[nz // n], uniq[nz % n], w_sum[nz], v_sum[nz]
    # coo -> csr sums duplicates without a global sort of the edge list; both matrices
    # come from the same coordinates, so their canonical structures coincide.
    wm = sp.csr_matrix((w, (s_id, d_id)), shape=shape)
    vm = sp.csr_matrix((v, (s_id, d_id)), shape=shape)
    wm.sum_duplicates()
    vm.sum_duplicates()
    if not (np.array_equal(wm.indptr, vm.indptr) and np.array_equal(wm.indices, vm.indices)):
        raise AssertionError("edge aggregation: weight and value structures differ")  # pragma: no cover
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(wm.indptr))
    return uniq[rows], uniq[wm.indices], wm.data, vm.data


def build_chain(
    paths: Paths | Iterable[Paths], conventions: MarkovConventions | None = None
) -> MarkovChain:
    """Aggregate transition counts of ``paths`` (one :class:`Paths` or an iterable of chunks).

    Chunks must share a vocabulary prefix (as :func:`iter_path_chunks` yields them);
    the last chunk's ``channel_names`` is used.
    """
    conventions = conventions or MarkovConventions()
    chunks = [paths] if isinstance(paths, Paths) else paths
    parts: list[tuple[np.ndarray, ...]] = []
    channel_names: tuple[str, ...] = ()
    total_conv = total_value = 0.0
    max_states = 0
    n_paths = 0
    # The key base depends on the vocabulary size; chunks may grow it, so keys are
    # built per chunk in that chunk's base and re-encoded into the final base below.
    chunk_bases: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, Paths):
            raise AttributionInputError("paths", "must be Paths or an iterable of Paths")
        if chunk.channel_names[: len(channel_names)] != channel_names:
            raise AttributionInputError("paths", "chunks must extend one another's channel_names")
        channel_names = chunk.channel_names
        base = _check_key_space(len(channel_names), conventions.order)
        f, t, w, v, longest = _chunk_edges(chunk, conventions, base)
        parts.append((f, t, w, v))
        chunk_bases.append(base)
        counted = chunk.conversions > 0
        total_conv += float(chunk.conversions[chunk.lengths > 0].sum())
        total_value += float(chunk.values[counted & (chunk.lengths > 0)].sum())
        max_states = max(max_states, longest)
        n_paths += chunk.n_paths
    base = _check_key_space(len(channel_names), conventions.order)
    srcs, dsts, ws, vs = [], [], [], []
    for (f, t, w, v), b in zip(parts, chunk_bases):
        if b != base:
            f, t = _rebase(f, b, base, conventions.order), _rebase(t, b, base, conventions.order)
        srcs.append(f)
        dsts.append(t)
        ws.append(w)
        vs.append(v)
    src = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    dst = np.concatenate(dsts) if dsts else np.zeros(0, np.int64)
    w = np.concatenate(ws) if ws else np.zeros(0)
    v = np.concatenate(vs) if vs else np.zeros(0)
    if len(parts) > 1:
        src, dst, w, v = _aggregate_edges(src, dst, w, v, base**conventions.order)
    state_keys = np.unique(np.concatenate((src[src >= 0], dst[dst >= 0])))
    n_states = state_keys.size

    def index(keys: np.ndarray) -> np.ndarray:
        out = np.searchsorted(state_keys, keys)
        out[keys == _START] = n_states
        out[keys == _CONV] = n_states + 1
        out[keys == _NULL] = n_states + 2
        return out

    s_idx, d_idx = index(src), index(dst)
    counts = sp.csr_matrix((w, (s_idx, d_idx)), shape=(n_states + 1, n_states + 3))
    counts.sum_duplicates()
    conversion_value = np.bincount(s_idx, weights=v, minlength=n_states + 1)
    return MarkovChain(
        order=conventions.order,
        channel_names=channel_names,
        state_keys=state_keys,
        counts=counts,
        conversion_value=conversion_value,
        total_conversions=total_conv,
        total_value=total_value,
        max_states_per_path=max_states,
        n_paths=n_paths,
    )


def _rebase(keys: np.ndarray, old: int, new: int, order: int) -> np.ndarray:
    out = np.where(keys < 0, keys, 0)
    pos = keys >= 0
    k = keys[pos]
    acc = np.zeros(k.size, dtype=np.int64)
    for j in range(order):
        acc += ((k // old**j) % old) * new**j
    out[pos] = acc
    return out


# ---- solving ------------------------------------------------------------------------------


def _transient_system(
    probabilities: sp.csr_matrix, n_states: int, mean_value: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``Q`` (transient block) and rewards ``R = [P(conv), P(conv) * vbar]``."""
    q = sp.csr_matrix(probabilities[:, : n_states + 1])
    r_conv = probabilities[:, n_states + 1].toarray().ravel()
    rewards = np.column_stack((r_conv, r_conv * mean_value))
    return q, rewards


def _finite_horizon(
    q: sp.csr_matrix, rewards: np.ndarray, keep: np.ndarray, start: int, horizon: int
) -> np.ndarray:
    """Conversion prob./value within ``horizon`` channel states, all removals at once.

    ``keep`` is (n_transient, n_scenarios) of 0/1; returns (2, n_scenarios) at start.
    ``F_1 = R``, ``F_h = R + Q F_{h-1}`` with removed states held at 0; the walk needs
    ``horizon + 1`` transitions (start -> s_1 -> ... -> s_H -> conversion).
    """
    out = []
    for col in range(rewards.shape[1]):
        check_serving_deadline()
        r = rewards[:, col : col + 1] * keep
        f = r.copy()
        for _ in range(horizon):
            f = r + keep * (q @ f)
        out.append(f[start])
    return np.vstack(out)


def _solve_dense(
    q: sp.csr_matrix, rewards: np.ndarray, membership: sp.csr_matrix, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Baseline x (n, 2) and removal drops (2, C) via the dense fundamental matrix."""
    n = q.shape[0]
    m = np.eye(n) - q.toarray()
    # numpy's inverse (LAPACK gesv against I) rather than scipy's lu_solve, whose
    # per-call overhead measured 13 ms at n = 16 (100x the solve itself).
    fundamental = np.linalg.inv(m)
    check_serving_deadline()
    x = fundamental @ rewards
    n_channels = membership.shape[1]
    drops = np.zeros((2, n_channels))
    members = membership.tocsc()
    for c in range(n_channels):
        a = members.indices[members.indptr[c] : members.indptr[c + 1]]
        if a.size == 0:
            continue
        # First-passage identity: P(first hit of A at a) = N[start, A] N[A, A]^{-1}.
        first_hit = np.linalg.solve(fundamental[np.ix_(a, a)].T, fundamental[start, a])
        drops[:, c] = first_hit @ x[a]
    return x, drops


def _solve_sparse(
    q: sp.csr_matrix,
    rewards: np.ndarray,
    membership: sp.csr_matrix,
    start: int,
    method: str,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Baseline and per-channel removal solves on the kept states."""
    n = q.shape[0]
    m_full = (sp.identity(n, format="csr") - q).tocsr()
    base_x = spla.splu(m_full.tocsc()).solve(rewards) if method == "sparse_lu" else _krylov(m_full, rewards, None)
    used = {method}
    members = membership.tocsc()
    n_channels = membership.shape[1]
    drops = np.zeros((2, n_channels))
    for c in range(n_channels):
        a = members.indices[members.indptr[c] : members.indptr[c + 1]]
        if a.size == 0:
            continue
        check_serving_deadline()  # one sparse solve per channel (seconds on large chains)
        keep = np.ones(n, dtype=bool)
        keep[a] = False
        kept = np.flatnonzero(keep)
        sub = m_full[kept][:, kept]
        rhs = rewards[kept]
        if method == "sparse_lu":
            xk = spla.splu(sub.tocsc()).solve(rhs)
        else:
            xk = _krylov(sub, rhs, base_x[kept])
            if xk is None:
                used.add("sparse_lu")
                xk = spla.splu(sub.tocsc()).solve(rhs)
        start_k = int(np.searchsorted(kept, start))
        drops[:, c] = base_x[start] - xk[start_k]
    return base_x, drops, "+".join(sorted(used))


def _krylov(m: sp.csr_matrix, rhs: np.ndarray, x0: np.ndarray | None) -> np.ndarray | None:
    """GMRES per column with a verified residual; None when it does not verify.

    For the baseline (x0 None) a failed verification falls back to sparse LU here.
    """
    out = np.empty_like(rhs)
    for col in range(rhs.shape[1]):
        b = rhs[:, col]
        scale = max(float(np.abs(b).max()), 1e-300)
        guess = None if x0 is None else x0[:, col]
        x, _ = spla.gmres(
            m, b, x0=guess, rtol=1e-14, atol=RESIDUAL_TOL * scale * 1e-2, restart=80, maxiter=2000
        )
        if float(np.abs(m @ x - b).max()) > RESIDUAL_TOL * scale:
            if x0 is not None:
                return None
            x = spla.splu(m.tocsc()).solve(b)
        out[:, col] = x
    return out


def solve_removal_effects(
    probabilities: sp.csr_matrix,
    membership: sp.csr_matrix,
    mean_value: np.ndarray,
    *,
    horizon: int | None = None,
    solver: Solver = "auto",
) -> RemovalEffects:
    """Exact conversion probability and removal effects of an absorbing chain.

    ``probabilities``: (S+1, S+3) row-stochastic (or sub-stochastic) matrix in the
    :class:`MarkovChain` layout; ``membership``: (S, C) state-contains-channel;
    ``mean_value``: (S+1,) value per conversion leaving each state.
    """
    n_states = membership.shape[0]
    if probabilities.shape != (n_states + 1, n_states + 3):
        raise AttributionInputError("probabilities", f"shape must be ({n_states + 1}, {n_states + 3})")
    if mean_value.shape != (n_states + 1,):
        raise AttributionInputError("mean_value", f"shape must be ({n_states + 1},)")
    start = n_states
    n_channels = membership.shape[1]
    q, rewards = _transient_system(probabilities, n_states, mean_value)
    if horizon is not None:
        keep = np.ones((n_states + 1, n_channels + 1))
        keep[:n_states, 1:] = 1.0 - membership.toarray()
        at_start = _finite_horizon(q, rewards, keep, start, int(horizon))
        base = at_start[:, 0]
        return RemovalEffects(
            conversion_probability=float(base[0]),
            expected_value=float(base[1]),
            removal_conversion=base[0] - at_start[0, 1:],
            removal_value=base[1] - at_start[1, 1:],
            solver="finite_horizon",
        )
    n = n_states + 1
    if solver == "auto":
        solver = "dense" if n <= DENSE_LIMIT else "iterative"
    if solver == "dense":
        x, drops = _solve_dense(q, rewards, membership, start)
        used = "dense"
    else:
        x, drops, used = _solve_sparse(q, rewards, membership, start, solver)
    return RemovalEffects(
        conversion_probability=float(x[start, 0]),
        expected_value=float(x[start, 1]),
        removal_conversion=drops[0],
        removal_value=drops[1],
        solver=used,
    )


def removal_effects(chain: MarkovChain, conventions: MarkovConventions | None = None) -> RemovalEffects:
    """Removal effects of a built chain under ``conventions`` (horizon, solver)."""
    conventions = conventions or MarkovConventions(order=chain.order)
    horizon = conventions.horizon
    if horizon == "data":
        horizon = chain.max_states_per_path + 1
    return solve_removal_effects(
        chain.transition_probabilities(),
        chain.membership(),
        chain.mean_conversion_value(),
        horizon=horizon,
        solver=conventions.solver,
    )


def credit_from_removal_effects(
    effects: RemovalEffects,
    total_conversions: float,
    total_value: float,
    revenue: Revenue = "value_chain",
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise removal effects into conversions and revenue credited per channel."""
    re = np.clip(effects.removal_conversion, 0.0, None)  # clip only rounding noise (-1e-17)
    total_re = re.sum()
    conversions = total_conversions * re / total_re if total_re > 0 else np.zeros_like(re)
    if revenue == "conversion_share":
        revenue_credit = (
            total_value * conversions / total_conversions if total_conversions > 0 else np.zeros_like(re)
        )
    else:
        rev = np.clip(effects.removal_value, 0.0, None)
        total_rev = rev.sum()
        revenue_credit = total_value * rev / total_rev if total_rev > 0 else np.zeros_like(rev)
    return conversions, revenue_credit


def markov_attribution(
    paths: Paths | Iterable[Paths], conventions: MarkovConventions | None = None
) -> MarkovResult:
    """Exact Markov attribution of ``paths`` under ``conventions`` (see module doc)."""
    conventions = conventions or MarkovConventions()
    chain = build_chain(paths, conventions)
    return attribution_from_chain(chain, conventions)


def attribution_from_chain(chain: MarkovChain, conventions: MarkovConventions) -> MarkovResult:
    """Credits of a built chain (shared by the plain and persona-smoothed paths)."""
    n_channels = len(chain.channel_names)
    if chain.n_states == 0:
        zeros = np.zeros(n_channels)
        return MarkovResult(
            channel_names=chain.channel_names,
            conversions=zeros,
            revenue=zeros.copy(),
            removal_effects=zeros.copy(),
            removal_effects_value=zeros.copy(),
            conversion_probability=0.0,
            total_conversions=chain.total_conversions,
            total_value=chain.total_value,
            n_states=0,
            solver="none",
            conventions=conventions,
        )
    effects = removal_effects(chain, conventions)
    return result_from_effects(effects, chain.channel_names, chain.total_conversions, chain.total_value, chain.n_states, conventions)


def result_from_effects(
    effects: RemovalEffects,
    channel_names: tuple[str, ...],
    total_conversions: float,
    total_value: float,
    n_states: int,
    conventions: MarkovConventions,
) -> MarkovResult:
    conversions, revenue = credit_from_removal_effects(
        effects, total_conversions, total_value, conventions.revenue
    )
    p = effects.conversion_probability
    ev = effects.expected_value
    return MarkovResult(
        channel_names=channel_names,
        conversions=conversions,
        revenue=revenue,
        removal_effects=effects.removal_conversion / p if p > 0 else np.zeros_like(conversions),
        removal_effects_value=effects.removal_value / ev if ev > 0 else np.zeros_like(conversions),
        conversion_probability=p,
        total_conversions=total_conversions,
        total_value=total_value,
        n_states=n_states,
        solver=effects.solver,
        conventions=conventions,
    )
