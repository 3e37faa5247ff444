"""Exact Markov attribution against an independent brute-force computation.

The reference below builds the chain with Python dicts straight from the definition
(states, transitions, removal = rows of states containing the channel redirected to
null) and solves it with a dense fundamental matrix N = (I - Q)^-1. It shares no code
with services.attribution.domain.markov.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.markov import (
    MarkovConventions,
    build_chain,
    markov_attribution,
)
from services.attribution.domain.paths import Paths, iter_path_chunks, write_paths

# ---- independent reference ------------------------------------------------------------


def reference_states(path: list[str], order: int, repeats: str, warmup: bool) -> list[tuple[str, ...]]:
    if repeats == "collapse_channels":
        path = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    if warmup or order == 1:
        states = [tuple(path[max(0, t - order + 1) : t + 1]) for t in range(len(path))]
    elif len(path) < order:
        states = [tuple(path)]
    else:
        states = [tuple(path[t : t + order]) for t in range(len(path) - order + 1)]
    if repeats != "keep":
        states = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    return states


def reference_attribution(
    paths: list[list[str]],
    conv: list[float],
    value: list[float],
    nulls: list[float],
    channels: list[str],
    order: int = 1,
    repeats: str = "collapse_states",
    warmup: bool = False,
    include_nulls: bool = True,
    horizon: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Conversions and revenue (value-chain convention) credited per channel."""
    counts: dict[tuple[object, object], float] = {}
    conv_value: dict[object, float] = {}

    def add(a: object, b: object, w: float) -> None:
        if w > 0:
            counts[(a, b)] = counts.get((a, b), 0.0) + w

    for p, c, v, n in zip(paths, conv, value, nulls):
        if not p:
            continue
        n = n if include_nulls else 0.0
        w = c + n
        states = reference_states(p, order, repeats, warmup)
        walk = ["START"] + states
        for a, b in zip(walk[:-1], walk[1:]):
            add(a, b, w)
        add(states[-1], "CONV", c)
        add(states[-1], "NULL", n)
        if c > 0:
            conv_value[states[-1]] = conv_value.get(states[-1], 0.0) + v
    transient = ["START"] + sorted({s for (a, b) in counts for s in (a, b) if isinstance(s, tuple)})
    idx = {s: i for i, s in enumerate(transient)}
    n = len(transient)
    Q = np.zeros((n, n))
    r = np.zeros(n)
    conv_out = np.zeros(n)
    for (a, b), w in counts.items():
        if b == "CONV":
            conv_out[idx[a]] += w
        if isinstance(b, tuple):
            Q[idx[a], idx[b]] += w
    row_tot = np.zeros(n)
    for (a, b), w in counts.items():
        row_tot[idx[a]] += w
    Q = Q / np.where(row_tot > 0, row_tot, 1)[:, None]
    r = conv_out / np.where(row_tot > 0, row_tot, 1)
    vbar = np.array([conv_value.get(s, 0.0) for s in transient]) / np.where(conv_out > 0, conv_out, 1)
    rv = r * vbar

    def absorb(keep: np.ndarray) -> tuple[float, float]:
        Qk = Q * keep[:, None]
        if horizon is None:
            N = np.linalg.inv(np.eye(n) - Qk)
            return (N @ (r * keep))[0], (N @ (rv * keep))[0]
        # Conversion after exactly m channel states: (Q^m r)[start], m = 1..H.
        total_c = total_v = 0.0
        M = np.eye(n)
        for _ in range(horizon):
            M = M @ Qk
            total_c += (M @ (r * keep))[0]
            total_v += (M @ (rv * keep))[0]
        return total_c, total_v

    base_c, base_v = absorb(np.ones(n))
    re_c = np.zeros(len(channels))
    re_v = np.zeros(len(channels))
    for j, ch in enumerate(channels):
        keep = np.array([1.0 if s == "START" or ch not in s else 0.0 for s in transient])
        pc, pv = absorb(keep)
        re_c[j] = base_c - pc
        re_v[j] = base_v - pv
    total_c = sum(c for p, c in zip(paths, conv) if p)
    total_v = sum(v for p, c, v in zip(paths, conv, value) if p and c > 0)
    credit = total_c * re_c / re_c.sum() if re_c.sum() > 0 else re_c
    revenue = total_v * re_v / re_v.sum() if re_v.sum() > 0 else re_v
    return credit, revenue


def random_paths(seed: int, n_paths: int, channels: list[str], max_len: int = 7):
    rng = np.random.default_rng(seed)
    paths = []
    for _ in range(n_paths):
        length = int(rng.integers(1, max_len + 1))
        # A skewed channel mix makes repeats, loops and rare channels likely.
        paths.append(list(rng.choice(channels, size=length, p=np.linspace(1, 2, len(channels)) / np.linspace(1, 2, len(channels)).sum())))
    conv = np.round(rng.random(n_paths) * rng.integers(0, 3, n_paths), 3)  # fractional
    value = np.round(conv * rng.gamma(2.0, 5.0, n_paths), 3)
    nulls = np.round(rng.random(n_paths) * 3, 2)
    return paths, conv.tolist(), value.tolist(), nulls.tolist()


CHANNELS = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_bruteforce_fundamental_matrix(order: int, seed: int) -> None:
    paths, conv, value, nulls = random_paths(seed, 60, CHANNELS)
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS)
    got = markov_attribution(p, MarkovConventions(order=order))
    want_c, want_v = reference_attribution(paths, conv, value, nulls, CHANNELS, order=order)
    np.testing.assert_allclose(got.conversions, want_c, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.revenue, want_v, rtol=0, atol=1e-9)
    assert got.conversions.sum() == pytest.approx(sum(conv), abs=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repeats": "keep"},
        {"repeats": "collapse_channels"},
        {"warmup_states": True},
        {"include_nulls": False},
        {"repeats": "keep", "warmup_states": True},
    ],
)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_conventions_match_bruteforce(kwargs: dict, order: int) -> None:
    paths, conv, value, nulls = random_paths(7, 50, CHANNELS[:4])
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS[:4])
    got = markov_attribution(p, MarkovConventions(order=order, **kwargs))
    ref_kwargs = {
        "repeats": kwargs.get("repeats", "collapse_states"),
        "warmup": kwargs.get("warmup_states", False),
        "include_nulls": kwargs.get("include_nulls", True),
    }
    want_c, want_v = reference_attribution(paths, conv, value, nulls, CHANNELS[:4], order=order, **ref_kwargs)
    np.testing.assert_allclose(got.conversions, want_c, atol=1e-9)
    np.testing.assert_allclose(got.revenue, want_v, atol=1e-9)


@pytest.mark.parametrize("order,horizon", [(1, 1), (1, 3), (2, 4), (3, 6)])
def test_finite_horizon_matches_bruteforce(order: int, horizon: int) -> None:
    paths, conv, value, nulls = random_paths(3, 40, CHANNELS[:4])
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS[:4])
    got = markov_attribution(p, MarkovConventions(order=order, horizon=horizon))
    want_c, want_v = reference_attribution(paths, conv, value, nulls, CHANNELS[:4], order=order, horizon=horizon)
    np.testing.assert_allclose(got.conversions, want_c, atol=1e-9)
    np.testing.assert_allclose(got.revenue, want_v, atol=1e-9)


def test_long_horizon_converges_to_exact_answer() -> None:
    paths, conv, value, nulls = random_paths(4, 40, CHANNELS[:4])
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS[:4])
    exact = markov_attribution(p, MarkovConventions(order=1))
    long = markov_attribution(p, MarkovConventions(order=1, horizon=400))
    np.testing.assert_allclose(long.conversions, exact.conversions, atol=1e-9)


def test_hand_computed_two_path_example() -> None:
    # start->a (w=1), start->b (w=1), a->b (w=1), b->conv 1, b->null 1.
    # P(conv)=1/2; without a: 1/4 (only start->b->conv); without b: 0.
    # RE_a = 1/4, RE_b = 1/2 -> credit a = 1/3, b = 2/3 of the one conversion.
    p = Paths.from_lists([["a", "b"], ["b"]], [1.0, 0.0], [9.0, 0.0], [0.0, 1.0])
    res = markov_attribution(p)
    assert res.conversion_probability == pytest.approx(0.5)
    np.testing.assert_allclose(res.conversions, [1 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(res.revenue, [3.0, 6.0], atol=1e-12)
    np.testing.assert_allclose(res.removal_effects, [0.5, 1.0], atol=1e-12)


def test_revenue_conventions_differ_when_values_differ_by_last_state() -> None:
    # Conversions ending in "b" are worth 10, in "c" worth 1.
    p = Paths.from_lists([["a", "b"], ["a", "c"], ["c"]], [1, 1, 1], [10, 1, 1], [1, 1, 1])
    chain = markov_attribution(p, MarkovConventions(revenue="value_chain"))
    share = markov_attribution(p, MarkovConventions(revenue="conversion_share"))
    np.testing.assert_allclose(share.revenue, 12 * share.conversions / 3, atol=1e-12)
    assert chain.revenue[1] > share.revenue[1]  # b earns more under the value chain
    assert chain.revenue.sum() == pytest.approx(12)


@pytest.mark.parametrize("order", [2, 3])
def test_solvers_agree(order: int) -> None:
    paths, conv, value, nulls = random_paths(11, 400, CHANNELS, max_len=9)
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS)
    results = {s: markov_attribution(p, MarkovConventions(order=order, solver=s)) for s in ("dense", "sparse_lu", "iterative")}
    for s in ("sparse_lu", "iterative"):
        np.testing.assert_allclose(results[s].conversions, results["dense"].conversions, atol=1e-9)
        np.testing.assert_allclose(results[s].revenue, results["dense"].revenue, atol=1e-8)


def test_chunked_build_equals_whole(tmp_path) -> None:
    paths, conv, value, nulls = random_paths(5, 300, CHANNELS)
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS)
    f = tmp_path / "p.csv"
    write_paths(p, f)
    chunks = list(iter_path_chunks(f, chunk_bytes=1024))
    assert len(chunks) > 3
    for order in (1, 3):
        whole = markov_attribution(p, MarkovConventions(order=order))
        streamed = markov_attribution(iter(chunks), MarkovConventions(order=order))
        names = streamed.channel_names
        by_name = dict(zip(whole.channel_names, whole.conversions))
        np.testing.assert_allclose(streamed.conversions, [by_name[n] for n in names], atol=1e-9)


def test_deterministic_bits() -> None:
    paths, conv, value, nulls = random_paths(9, 200, CHANNELS)
    p = Paths.from_lists(paths, conv, value, nulls, channel_names=CHANNELS)
    a = markov_attribution(p, MarkovConventions(order=3, solver="iterative"))
    b = markov_attribution(p, MarkovConventions(order=3, solver="iterative"))
    assert np.array_equal(a.conversions, b.conversions)
    assert np.array_equal(a.revenue, b.revenue)


def test_chain_states_follow_channelattribution_windows() -> None:
    p = Paths.from_lists([["a", "a", "b"], ["a", "b", "a", "b", "c"], ["c"]], [1, 1, 1], nulls=[0, 0, 0])
    chain = build_chain(p, MarkovConventions(order=2))
    assert set(chain.state_tuples()) == {("a", "a"), ("a", "b"), ("b", "a"), ("b", "c"), ("c",)}
    chain3 = build_chain(p, MarkovConventions(order=3, warmup_states=True))
    assert ("a",) in chain3.state_tuples() and ("a", "b") in chain3.state_tuples()


def test_edge_cases() -> None:
    empty = Paths.from_lists([], [])
    res = markov_attribution(empty)
    assert res.conversions.size == 0 and res.conversion_probability == 0.0
    no_conv = Paths.from_lists([["a"], ["b", "a"]], [0, 0], nulls=[1, 2])
    res = markov_attribution(no_conv)
    np.testing.assert_array_equal(res.conversions, [0.0, 0.0])
    only_empty_path = Paths.from_lists([[], ["a"]], [5, 1], nulls=[0, 0])
    res = markov_attribution(only_empty_path)
    np.testing.assert_allclose(res.conversions, [1.0])  # the empty path has nothing to credit
    single = Paths.from_lists([["a"]], [2.0], [4.0], [0.0])
    res = markov_attribution(single, MarkovConventions(order=4))
    np.testing.assert_allclose(res.conversions, [2.0])
    np.testing.assert_allclose(res.revenue, [4.0])


@pytest.mark.parametrize(
    "kwargs,field",
    [({"order": 0}, "order"), ({"order": 5}, "order"), ({"repeats": "x"}, "repeats"),
     ({"horizon": 0}, "horizon"), ({"revenue": "y"}, "revenue"), ({"solver": "z"}, "solver")],
)
def test_bad_conventions_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(AttributionInputError) as exc:
        MarkovConventions(**kwargs)
    assert exc.value.field == field
    assert isinstance(exc.value, ValueError)


def test_many_channels_order_one() -> None:
    rng = np.random.default_rng(0)
    n_ch = 500
    lengths = rng.integers(1, 6, 20_000)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    p = Paths(rng.integers(0, n_ch, offsets[-1]), offsets, rng.integers(0, 2, lengths.size).astype(float),
              np.zeros(lengths.size), rng.integers(0, 3, lengths.size).astype(float))
    res = markov_attribution(p)
    assert res.conversions.shape == (n_ch,)
    assert res.conversions.sum() == pytest.approx(p.conversions.sum())
    assert np.all(res.conversions >= 0)


def test_chunks_with_growing_vocabulary_are_re_encoded() -> None:
    # The second chunk introduces channel "c": keys built in base 3 must be re-encoded
    # into base 4 before merging; the result must equal the one-shot build.
    first = Paths.from_lists([["a", "b"], ["b", "a", "b"]], [1, 0], [2, 0], [1, 2], channel_names=["a", "b"])
    second = Paths.from_lists([["c", "a"], ["a", "b", "c"]], [2, 1], [3, 1], [0, 1], channel_names=["a", "b", "c"])
    whole = Paths.from_lists(
        [["a", "b"], ["b", "a", "b"], ["c", "a"], ["a", "b", "c"]], [1, 0, 2, 1], [2, 0, 3, 1], [1, 2, 0, 1],
        channel_names=["a", "b", "c"],
    )
    for order in (1, 2, 3):
        streamed = markov_attribution(iter([first, second]), MarkovConventions(order=order))
        direct = markov_attribution(whole, MarkovConventions(order=order))
        np.testing.assert_allclose(streamed.conversions, direct.conversions, atol=1e-12)
        np.testing.assert_allclose(streamed.revenue, direct.revenue, atol=1e-12)
    with pytest.raises(AttributionInputError):
        markov_attribution(iter([second, first]))  # vocabularies must extend each other
