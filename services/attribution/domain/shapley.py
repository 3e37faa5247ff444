r"""Exact Shapley attribution: closed form for path data, Möbius enumeration otherwise.

The path game
-------------
Players are channels. A coalition ``S`` is worth the conversions of the journeys whose
channels all belong to ``S``:

.. math::  v(S) = \sum_p w_p \, [T_p \subseteq S]

where ``T_p`` is the set of distinct channels of path ``p`` and ``w_p`` its
conversions (or value). Empty paths are never credited.

**Theorem.** The Shapley value of this game is

.. math::  \phi_i = \sum_{p:\, i \in T_p} \frac{w_p}{|T_p|} .

*Proof.* ``v = \sum_p w_p u_{T_p}`` with the unanimity game ``u_T(S) = [T \subseteq
S]``. The Shapley value is linear in the game, so ``\phi(v) = \sum_p w_p \phi(u_{T_p})``.
In ``u_T`` every player outside ``T`` is a null player (``u_T(S \cup i) = u_T(S)``),
so it gets 0 (null-player axiom); the players of ``T`` are symmetric (swapping two of
them leaves ``u_T`` unchanged) so they get equal shares, and efficiency makes the
shares sum to ``u_T(N) - u_T(\emptyset) = 1``; hence ``1/|T|`` each. ∎

So each path's conversions are split equally across its *distinct* channels: the cost
is linear in the number of touches, and the result is never negative (the game is
monotone). The ordered (per-position) variant splits each channel's share of a path
equally across the positions where it occurs, giving ``credit[c, j]`` for touch
position ``j``; summing over ``j`` gives back ``phi`` exactly.

Any other game
--------------
For a caller-supplied value function on up to ``MAX_PLAYERS`` players,
:func:`shapley_from_values` enumerates all ``2^n`` coalitions: the fast Möbius
transform gives the Harsanyi dividends ``m(T) = \sum_{S \subseteq T}
(-1)^{|T \setminus S|} v(S)`` in ``O(n 2^n)`` and ``\phi_i = \sum_{T \ni i} m(T)/|T|``.
Coalitions are bitmasks: bit ``i`` of the index is player ``i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths

MAX_PLAYERS = 20


@dataclass(frozen=True, eq=False)
class ShapleyResult:
    """Shapley credit per channel code (conversions and revenue)."""

    channel_names: tuple[str, ...]
    conversions: np.ndarray
    revenue: np.ndarray
    total_conversions: float
    total_value: float

    @property
    def shares(self) -> np.ndarray:
        total = self.conversions.sum()
        return self.conversions / total if total > 0 else np.zeros_like(self.conversions)


@dataclass(frozen=True, eq=False)
class _DistinctTouches:
    """First occurrence of each (path, channel) pair, found without a comparison sort."""

    first: np.ndarray  # bool per touch: first occurrence of its channel in its path
    row: np.ndarray  # path of every touch
    n_distinct: np.ndarray  # distinct channels per path
    multiplicity: np.ndarray  # occurrences of the touch's channel in its path


def _distinct_touches(paths: Paths) -> _DistinctTouches:
    codes = paths.channels
    row = paths.row_of_touch()
    # A stable sort by channel keeps touches in path order inside each channel, so a
    # touch is a first occurrence iff the previous one (same channel) is in another
    # path. int16 keys let numpy use a linear-time radix sort.
    key = codes.astype(np.int16) if paths.n_channels <= np.iinfo(np.int16).max else codes
    order = np.argsort(key, kind="stable")
    c_sorted, r_sorted = codes[order], row[order]
    new_group = np.ones(codes.size, dtype=bool)
    new_group[1:] = (c_sorted[1:] != c_sorted[:-1]) | (r_sorted[1:] != r_sorted[:-1])
    group = np.cumsum(new_group) - 1
    group_size = np.bincount(group)
    first = np.empty(codes.size, dtype=bool)
    first[order] = new_group
    multiplicity = np.empty(codes.size, dtype=np.int64)
    multiplicity[order] = group_size[group]
    n_distinct = np.bincount(row[first], minlength=paths.n_paths)
    return _DistinctTouches(first=first, row=row, n_distinct=n_distinct, multiplicity=multiplicity)


def shapley_touch_fractions(paths: Paths) -> np.ndarray:
    """Fraction of its path's credit each touch receives: ``1/|T_p|`` at the first
    occurrence of each distinct channel, 0 elsewhere (the closed form above)."""
    if paths.n_touches == 0:
        return np.zeros(0)
    d = _distinct_touches(paths)
    inv_size = np.divide(1.0, d.n_distinct, out=np.zeros(paths.n_paths), where=d.n_distinct > 0)
    return np.where(d.first, inv_size[d.row], 0.0)


def shapley_attribution(paths: Paths) -> ShapleyResult:
    """Exact Shapley credit of the path game (conversions and revenue), O(touches).

    Revenue splits the value of converting paths (values of paths without a conversion
    are not credited, as in every other method)."""
    n_ch = paths.n_channels
    if paths.n_touches == 0:
        zeros = np.zeros(n_ch)
        return ShapleyResult(paths.channel_names, zeros, zeros.copy(), 0.0, 0.0)
    # Only first occurrences carry credit: bincount over those touches alone (the
    # fractions of shapley_touch_fractions, without a pass over every touch).
    d = _distinct_touches(paths)
    has_touch = d.n_distinct > 0
    inv_size = np.divide(1.0, d.n_distinct, out=np.zeros(paths.n_paths), where=has_touch)
    rows = d.row[d.first]
    codes = paths.channels[d.first]
    value = np.where(paths.conversions > 0, paths.values, 0.0)
    return ShapleyResult(
        channel_names=paths.channel_names,
        conversions=np.bincount(codes, weights=(paths.conversions * inv_size)[rows], minlength=n_ch),
        revenue=np.bincount(codes, weights=(value * inv_size)[rows], minlength=n_ch),
        total_conversions=float(paths.conversions[has_touch].sum()),
        total_value=float(value[has_touch].sum()),
    )


def ordered_shapley_attribution(
    paths: Paths, max_positions: int = 10, weight: Literal["conversions", "values"] = "conversions"
) -> np.ndarray:
    """Per-position Shapley credit, shape ``(n_channels, max_positions)``.

    ``credit[c, j]`` is the conversions (or value) credited to channel ``c`` for its
    touches at position ``j`` (0 = first touch); positions ``>= max_positions - 1``
    share the last column. Each path gives ``w_p / |T_p|`` to each distinct channel,
    split equally over that channel's occurrences, so ``credit.sum(axis=1)`` equals
    :func:`shapley_attribution`'s credit.
    """
    if not isinstance(max_positions, (int, np.integer)) or max_positions < 1:
        raise AttributionInputError("max_positions", "must be an integer >= 1")
    if weight not in ("conversions", "values"):
        raise AttributionInputError("weight", "must be 'conversions' or 'values'")
    n_ch = paths.n_channels
    out = np.zeros((n_ch, int(max_positions)))
    if paths.n_touches == 0:
        return out
    d = _distinct_touches(paths)
    w = paths.conversions if weight == "conversions" else paths.values
    per_touch = w[d.row] / (d.n_distinct[d.row] * d.multiplicity)
    pos = np.arange(paths.n_touches) - paths.offsets[:-1][d.row]
    pos = np.minimum(pos, max_positions - 1)
    flat = np.bincount(
        paths.channels.astype(np.int64) * max_positions + pos, weights=per_touch,
        minlength=n_ch * max_positions,
    )
    return flat.reshape(n_ch, max_positions)


# ---- arbitrary games -------------------------------------------------------------------


def _check_values(values: np.ndarray) -> tuple[np.ndarray, int]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise AttributionInputError("values", "must be a 1-D array of 2**n coalition values")
    n = int(v.size).bit_length() - 1
    if 1 << n != v.size:
        raise AttributionInputError("values", f"length must be a power of two, got {v.size}")
    if n > MAX_PLAYERS:
        raise AttributionInputError("values", f"at most {MAX_PLAYERS} players (2**{MAX_PLAYERS} values)")
    if not np.all(np.isfinite(v)):
        raise AttributionInputError("values", "must be finite")
    return v, n


def mobius_transform(values: np.ndarray) -> np.ndarray:
    """Harsanyi dividends ``m(T)`` of a game given by its ``2**n`` coalition values."""
    v, n = _check_values(values)
    m = v.copy()
    for i in range(n):
        block = m.reshape(-1, 2, 1 << i)
        block[:, 1, :] -= block[:, 0, :]
    return m


def coalition_sizes(n: int) -> np.ndarray:
    """``|S|`` for every coalition bitmask ``S`` in ``0..2**n-1``."""
    return np.bitwise_count(np.arange(1 << n, dtype=np.uint32)).astype(np.int64)


def shapley_from_values(values: np.ndarray) -> np.ndarray:
    """Exact Shapley values of a game on ``n <= 20`` players (fast Möbius transform).

    ``values[S]`` is ``v(S)`` with coalition ``S`` as a bitmask (bit ``i`` = player
    ``i``); ``v(∅)`` is ignored (Shapley values depend on differences only).
    A player whose marginal contributions are all >= 0 gets a credit >= 0: the
    alternating sums of the transform can leave a rounding residue of order
    ``1e-16 * max|v|`` below zero, which is clipped for exactly those players.
    """
    v, n = _check_values(values)
    if n == 0:
        return np.zeros(0)
    m = mobius_transform(v)
    sizes = coalition_sizes(n)
    per_member = np.divide(m, sizes, out=np.zeros_like(m), where=sizes > 0)
    phi = np.empty(n)
    for i in range(n):
        phi[i] = per_member.reshape(-1, 2, 1 << i)[:, 1, :].sum()
        if phi[i] < 0:
            block = v.reshape(-1, 2, 1 << i)
            if np.all(block[:, 1, :] >= block[:, 0, :]):
                phi[i] = 0.0
    return phi


def shapley_from_function(
    value_function: Callable[[np.ndarray], np.ndarray], n_players: int
) -> np.ndarray:
    """Shapley values of ``value_function`` evaluated once on all ``2**n`` coalitions.

    ``value_function`` receives a boolean matrix ``(2**n, n)`` (row = coalition,
    column = player) and returns ``2**n`` values.
    """
    if not isinstance(n_players, (int, np.integer)) or not 0 <= n_players <= MAX_PLAYERS:
        raise AttributionInputError("n_players", f"must be an integer in 0..{MAX_PLAYERS}")
    masks = np.arange(1 << n_players, dtype=np.uint32)
    members = ((masks[:, None] >> np.arange(n_players, dtype=np.uint32)) & 1).astype(bool)
    values = np.asarray(value_function(members), dtype=np.float64)
    if values.shape != (1 << n_players,):
        raise AttributionInputError(
            "value_function", f"must return shape ({1 << n_players},), got {values.shape}"
        )
    return shapley_from_values(values)


def path_game_values(paths: Paths, weight: Literal["conversions", "values"] = "conversions") -> np.ndarray:
    """``v(S)`` of the path game for every coalition (``n_channels <= 20``).

    Used to cross-check the closed form and to feed custom value functions that start
    from the standard game.
    """
    n = paths.n_channels
    if n > MAX_PLAYERS:
        raise AttributionInputError("paths", f"at most {MAX_PLAYERS} channels for enumeration")
    w = paths.conversions if weight == "conversions" else paths.values
    nonempty = paths.lengths > 0
    bits = (np.uint32(1) << paths.channels.astype(np.uint32)) if paths.n_touches else np.zeros(0, np.uint32)
    masks = np.zeros(paths.n_paths, dtype=np.uint32)
    if paths.n_touches:
        masks[nonempty] = np.bitwise_or.reduceat(bits, paths.offsets[:-1][nonempty])
    # v(S) = sum of w over paths whose mask is a subset of S: a zeta transform of the
    # per-mask totals (sum over subsets), O(n 2^n).
    v = np.bincount(masks[nonempty], weights=w[nonempty], minlength=1 << n).astype(np.float64)
    for i in range(n):
        block = v.reshape(-1, 2, 1 << i)
        block[:, 1, :] += block[:, 0, :]
    return v
