"""Shapley: closed form vs enumeration over all coalitions, Möbius, ordered variant."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.paths import Paths
from services.attribution.domain.shapley import (
    mobius_transform,
    ordered_shapley_attribution,
    path_game_values,
    shapley_attribution,
    shapley_from_function,
    shapley_from_values,
)


def classical_shapley(v, n: int) -> np.ndarray:
    """phi_i = sum_{S not containing i} |S|!(n-|S|-1)!/n! (v(S+i) - v(S)), v a callable on frozensets."""
    phi = np.zeros(n)
    players = range(n)
    for i in players:
        others = [j for j in players if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in itertools.combinations(others, size):
                s = frozenset(s)
                phi[i] += weight * (v(s | {i}) - v(s))
    return phi


def path_game(paths: list[list[int]], conv: list[float]):
    sets = [frozenset(p) for p in paths]

    def v(s: frozenset) -> float:
        return sum(c for t, c in zip(sets, conv) if t and t <= s)

    return v


def random_path_data(seed: int, n_channels: int, n_paths: int):
    rng = np.random.default_rng(seed)
    paths = [list(rng.integers(0, n_channels, rng.integers(0, 6))) for _ in range(n_paths)]
    conv = (rng.random(n_paths) * 3).round(3).tolist()
    value = (rng.random(n_paths) * 50).round(2).tolist()
    return paths, conv, value


def to_paths(paths: list[list[int]], conv, value=None, n_channels: int | None = None) -> Paths:
    n_channels = n_channels or (max((max(p) for p in paths if p), default=-1) + 1)
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in paths]))).astype(np.int64)
    flat = np.array([c for p in paths for c in p], dtype=np.int32)
    n = len(paths)
    return Paths(flat, offsets, np.asarray(conv, float), np.zeros(n) if value is None else np.asarray(value, float),
                 np.zeros(n), tuple(f"c{i}" for i in range(n_channels)))


@pytest.mark.parametrize("n_channels,seed", [(3, 0), (5, 1), (8, 2)])
def test_closed_form_equals_permutation_formula(n_channels: int, seed: int) -> None:
    paths, conv, value = random_path_data(seed, n_channels, 40)
    p = to_paths(paths, conv, value, n_channels)
    got = shapley_attribution(p)
    want = classical_shapley(path_game(paths, conv), n_channels)
    np.testing.assert_allclose(got.conversions, want, atol=1e-9)
    want_v = classical_shapley(path_game(paths, value), n_channels)
    np.testing.assert_allclose(got.revenue, want_v, atol=1e-9)


def test_closed_form_equals_enumeration_twelve_channels() -> None:
    paths, conv, value = random_path_data(12, 12, 300)
    p = to_paths(paths, conv, value, 12)
    got = shapley_attribution(p)
    # Enumerate all 4096 coalitions with the closed-form-free Möbius route and also the
    # standard formula on the game values computed by brute force in the test.
    v_all = np.zeros(1 << 12)
    sets = [sum(1 << c for c in set(q)) for q in paths]
    for mask in range(1 << 12):
        v_all[mask] = sum(c for m, c in zip(sets, conv) if m and (m & ~mask) == 0)
    np.testing.assert_allclose(path_game_values(p), v_all, atol=1e-9)
    np.testing.assert_allclose(shapley_from_values(v_all), got.conversions, atol=1e-9)
    assert got.conversions.sum() == pytest.approx(sum(c for q, c in zip(paths, conv) if q), abs=1e-9)


@given(
    st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=6), min_size=1, max_size=25),
    st.data(),
)
@settings(max_examples=60, deadline=None)
def test_path_shapley_nonnegative_and_efficient(paths, data) -> None:
    conv = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(paths), max_size=len(paths)))
    p = to_paths(paths, conv, n_channels=6)
    got = shapley_attribution(p)
    assert np.all(got.conversions >= 0)
    assert got.conversions.sum() == pytest.approx(sum(c for q, c in zip(paths, conv) if q), abs=1e-9)


@pytest.mark.parametrize("max_positions", [1, 3, 12])
def test_ordered_variant_sums_back(max_positions: int) -> None:
    paths, conv, value = random_path_data(3, 6, 200)
    p = to_paths(paths, conv, value, 6)
    ordered = ordered_shapley_attribution(p, max_positions=max_positions)
    assert ordered.shape == (6, max_positions)
    np.testing.assert_allclose(ordered.sum(axis=1), shapley_attribution(p).conversions, atol=1e-9)
    ordered_v = ordered_shapley_attribution(p, max_positions=max_positions, weight="values")
    np.testing.assert_allclose(ordered_v.sum(axis=1), shapley_attribution(p).revenue, atol=1e-9)


def test_ordered_variant_splits_repeated_channel_over_positions() -> None:
    # Path a > b > a with 1 conversion: a gets 1/2 split 1/4 at position 0 and 1/4 at 2.
    p = to_paths([[0, 1, 0]], [1.0], n_channels=2)
    ordered = ordered_shapley_attribution(p, max_positions=3)
    np.testing.assert_allclose(ordered, [[0.25, 0.0, 0.25], [0.0, 0.5, 0.0]])


@pytest.mark.parametrize("n,seed", [(1, 0), (4, 1), (7, 2), (9, 3)])
def test_mobius_route_equals_permutation_formula_on_random_games(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=1 << n)

    def v(s: frozenset) -> float:
        return values[sum(1 << i for i in s)]

    np.testing.assert_allclose(shapley_from_values(values), classical_shapley(v, n), atol=1e-9)


def test_mobius_dividends_rebuild_the_game() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(size=1 << 6)
    m = mobius_transform(values)
    for mask in range(1 << 6):
        subsets = [t for t in range(1 << 6) if t & ~mask == 0]
        assert sum(m[t] for t in subsets) == pytest.approx(values[mask], abs=1e-12)


def test_custom_value_function_known_answers() -> None:
    # Glove game: players 0,1 hold left gloves, 2 a right glove; v = number of pairs.
    def glove(members: np.ndarray) -> np.ndarray:
        return np.minimum(members[:, :2].sum(axis=1), members[:, 2]).astype(float)

    np.testing.assert_allclose(shapley_from_function(glove, 3), [1 / 6, 1 / 6, 2 / 3], atol=1e-12)
    # Symmetric game v = |S|^2: every player gets v(N)/n.
    np.testing.assert_allclose(
        shapley_from_function(lambda m: m.sum(axis=1).astype(float) ** 2, 5), [5.0] * 5, atol=1e-12
    )


@given(st.integers(1, 7), st.data())
@settings(max_examples=80, deadline=None)
def test_no_negative_credit_in_monotone_games(n: int, data) -> None:
    raw = np.array(data.draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1 << n, max_size=1 << n)))
    # Monotone closure: v(S) = max over subsets T of raw(T) (a zeta transform with max).
    v = raw.copy()
    for i in range(n):
        block = v.reshape(-1, 2, 1 << i)
        block[:, 1, :] = np.maximum(block[:, 1, :], block[:, 0, :])
    phi = shapley_from_values(v)
    assert np.all(phi >= 0)
    assert phi.sum() == pytest.approx(v[-1] - v[0], rel=1e-9, abs=1e-6)


def test_enumeration_limits_and_validation() -> None:
    with pytest.raises(AttributionInputError) as exc:
        shapley_from_values(np.zeros(3))
    assert exc.value.field == "values"
    with pytest.raises(AttributionInputError):
        shapley_from_values(np.array([0.0, np.nan]))
    with pytest.raises(AttributionInputError):
        shapley_from_function(lambda m: np.zeros(1 << 21), 21)
    with pytest.raises(AttributionInputError) as exc:
        shapley_from_function(lambda m: np.zeros(3), 2)
    assert exc.value.field == "value_function"
    assert shapley_from_values(np.array([4.0])).size == 0


def test_twenty_players_runs() -> None:
    rng = np.random.default_rng(0)
    weights = rng.random(20)
    # Additive game: phi_i = w_i exactly.
    masks = np.arange(1 << 20, dtype=np.uint32)
    bits = ((masks[:, None] >> np.arange(20, dtype=np.uint32)) & 1).astype(float)
    values = bits @ weights
    np.testing.assert_allclose(shapley_from_values(values), weights, atol=1e-9)


def test_empty_inputs() -> None:
    p = to_paths([[], []], [1.0, 2.0], n_channels=2)
    got = shapley_attribution(p)
    np.testing.assert_array_equal(got.conversions, [0.0, 0.0])
    assert got.total_conversions == 0.0
