"""Bootstrap intervals, order='auto', sequence removal effects, new heuristics, value,
grouped = ungrouped -- each checked against brute force on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.attribution.domain.api import METHODS, attribute
from services.attribution.domain.bootstrap import (
    BootstrapSpec, _draw, bootstrap_replicates, group_identical_paths)
from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.heuristics import HeuristicParams, heuristic
from services.attribution.domain.markov import MarkovConventions, build_chain, markov_attribution, removal_effects
from services.attribution.domain.order_selection import choose_order, split_journeys
from services.attribution.domain.paths import Paths
from services.attribution.domain.sequences import parse_sequences, sequence_removal_effects
from services.attribution.domain.shapley import shapley_attribution

PATHS = Paths.from_lists(
    [["a", "b"], ["b", "c", "a"], ["a"], ["c", "a", "b"], ["a", "b", "b", "c"], ["b", "a"], ["a", "b"], []],
    [1, 2, 0, 1, 3, 0, 2, 1], [5, 8, 0, 2, 1, 0, 4, 3], [2, 1, 3, 0, 1, 2, 1, 0],
)


# ---- bootstrap ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("repeats", ["collapse_states", "keep"])
def test_every_replicate_equals_a_rebuild_from_the_resampled_journeys(order: int, repeats: str) -> None:
    """Brute force: each replicate's credit is the point estimate of the same draws."""
    conv = MarkovConventions(order=order, repeats=repeats)
    spec = BootstrapSpec(replicates=6, seed=11)
    methods = ["markov", "shapley", "linear", "first_touch", "position_based", "hybrid"]
    reps = bootstrap_replicates(PATHS, methods, spec, conventions=conv, alpha=0.3)
    units, _ = group_identical_paths(PATHS.select(PATHS.lengths > 0))
    c, nl, v = _draw(np.random.default_rng(11), units.conversions, units.nulls, units.values, 6)
    for j in range(6):
        q = Paths(units.channels, units.offsets, c[:, j], v[:, j], nl[:, j], units.channel_names)
        m = markov_attribution(q, conv)
        s = shapley_attribution(q)
        np.testing.assert_allclose(reps["markov"][0][j], m.conversions, atol=1e-9)
        np.testing.assert_allclose(reps["markov"][1][j], m.revenue, atol=1e-9)
        np.testing.assert_allclose(reps["shapley"][0][j], s.conversions, atol=1e-12)
        np.testing.assert_allclose(reps["hybrid"][0][j], 0.3 * m.conversions + 0.7 * s.conversions, atol=1e-9)
        for h in ("linear", "first_touch", "position_based"):
            r = heuristic(q, h)
            np.testing.assert_allclose(reps[h][0][j], r.conversions, atol=1e-12)
            np.testing.assert_allclose(reps[h][1][j], r.revenue, atol=1e-12)


def test_grouping_sums_identical_paths() -> None:
    units, group = group_identical_paths(PATHS)
    assert units.n_paths == 7  # ["a","b"] occurs twice
    assert group[0] == group[6]
    np.testing.assert_allclose(units.conversions.sum(), PATHS.conversions.sum())
    i = group[0]
    assert units.path(i) == ["a", "b"] and units.conversions[i] == 3 and units.nulls[i] == 3


def test_intervals_cover_the_point_estimate_and_shrink_with_more_data() -> None:
    spec = BootstrapSpec(replicates=200, seed=1)
    small = attribute(PATHS, "markov", bootstrap=spec)
    iv = small.intervals["markov"]
    assert set(small.intervals) == {"markov", "first_touch", "last_touch", "linear", "position_based"}
    assert np.all(iv.conversions_lower <= small.conversions + 1e-9)
    assert np.all(small.conversions <= iv.conversions_upper + 1e-9)
    big_paths = Paths(PATHS.channels, PATHS.offsets, PATHS.conversions * 100, PATHS.values * 100,
                      PATHS.nulls * 100, PATHS.channel_names)
    big = attribute(big_paths, "markov", bootstrap=spec).intervals["markov"]
    # 100x the journeys: relative width ~10x smaller.
    rel_small = (iv.share_upper - iv.share_lower).mean()
    rel_big = (big.share_upper - big.share_lower).mean()
    assert rel_big < rel_small / 5


def test_same_seed_same_intervals_other_seed_differs() -> None:
    a = attribute(PATHS, "shapley", bootstrap=BootstrapSpec(50, seed=3)).intervals["shapley"]
    b = attribute(PATHS, "shapley", bootstrap=BootstrapSpec(50, seed=3)).intervals["shapley"]
    c = attribute(PATHS, "shapley", bootstrap=BootstrapSpec(50, seed=4)).intervals["shapley"]
    np.testing.assert_array_equal(a.conversions_upper, b.conversions_upper)
    assert not np.array_equal(a.conversions_upper, c.conversions_upper)


def test_interval_columns_in_json_and_rows() -> None:
    r = attribute(PATHS, "hybrid", bootstrap=BootstrapSpec(20, seed=0))
    doc = r.to_dict()
    ch = doc["channels"][0]
    assert ch["conversions_lower"] <= ch["conversions"] + 1e-9 <= ch["conversions_upper"] + 2e-9
    assert doc["bootstrap"]["replicates"] == 20
    assert "intervals" in doc["baselines"]["linear"]
    assert "linear_conversions_lower" in r.rows()[0]


@pytest.mark.parametrize("kwargs,field", [
    ({"replicates": 1}, "bootstrap_replicates"), ({"replicates": -2}, "bootstrap_replicates"),
    ({"replicates": 10, "level": 1.0}, "confidence_level"), ({"replicates": 10, "seed": -1}, "bootstrap_seed"),
])
def test_bad_bootstrap_spec(kwargs: dict, field: str) -> None:
    with pytest.raises(AttributionInputError) as exc:
        BootstrapSpec(**kwargs)
    assert exc.value.field == field


# ---- order selection -------------------------------------------------------------------


def _second_order_world(n: int, seed: int) -> Paths:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]
    paths, conv = [], []
    for _ in range(n):
        p = list(rng.choice(names, int(rng.integers(2, 6))))
        rate = 0.8 if p[-2:] in (["a", "b"], ["c", "d"]) else 0.1
        paths.append(p)
        conv.append(float(rng.random() < rate))
    return Paths.from_lists(paths, conv, nulls=[1 - c for c in conv])


def test_auto_picks_order_two_when_conversion_depends_on_the_last_two_channels() -> None:
    sel = choose_order(_second_order_world(4000, 0))
    assert sel.chosen == 2
    assert sel.margin_vs_order1 > 5 * sel.margin_vs_order1_se
    assert sel.log_loss[2] < sel.log_loss[1] and sel.log_loss[2] < sel.log_loss[4]


def test_auto_keeps_order_one_for_first_order_data() -> None:
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d"]
    rate = {"a": 0.6, "b": 0.3, "c": 0.1, "d": 0.05}
    paths = [list(rng.choice(names, int(rng.integers(1, 6)))) for _ in range(4000)]
    conv = [float(rng.random() < rate[p[-1]]) for p in paths]
    sel = choose_order(Paths.from_lists(paths, conv, nulls=[1 - c for c in conv]))
    assert sel.chosen == 1


def test_log_loss_by_brute_force() -> None:
    """Order 1, two folds: the loss of each fold recomputed by hand."""
    p = Paths.from_lists([["a"], ["b"], ["a", "b"]], [3, 1, 2], nulls=[1, 2, 2])
    rng = np.random.default_rng(5)
    sel = choose_order(p, max_order=1, folds=2, seed=5)
    cf, nf = split_journeys(p, 2, rng)
    last = {0: "a", 1: "b", 2: "b"}
    losses = []
    for f in range(2):
        train_c = {s: sum(cf[i, g] for i in range(3) for g in range(2) if g != f and last[i] == s) for s in "ab"}
        train_n = {s: sum(nf[i, g] for i in range(3) for g in range(2) if g != f and last[i] == s) for s in "ab"}
        pi = sum(train_c.values()) / (sum(train_c.values()) + sum(train_n.values()))
        loss = w = 0.0
        for i in range(3):
            s = last[i]
            ph = (train_c[s] + pi) / (train_c[s] + train_n[s] + 1)
            loss -= cf[i, f] * np.log(ph) + nf[i, f] * np.log(1 - ph)
            w += cf[i, f] + nf[i, f]
        losses.append(loss / w)
    assert sel.log_loss[1] == pytest.approx(np.mean(losses))


def test_auto_order_through_attribute_reports_the_choice() -> None:
    r = attribute(_second_order_world(2000, 2), "markov", order="auto")
    assert r.details["order"] == r.details["order_selection"]["chosen"] == 2
    with pytest.raises(AttributionInputError) as exc:
        attribute(PATHS, order="best")
    assert exc.value.field == "order"
    no_nulls = Paths.from_lists([["a"], ["b"]], [1, 1])
    fallback = attribute(no_nulls, order="auto")
    assert fallback.details["order"] == 1 and "fallback" in fallback.details["order_selection"]
    with pytest.raises(AttributionInputError):
        choose_order(no_nulls)


# ---- sequences ---------------------------------------------------------------------------


def _brute_sequence_effect(chain, conv: MarkovConventions, q: tuple[str, ...]) -> float:
    """Forward propagation of walk mass over (chain state, last len(q) channels seen),
    dropping mass whose channel history contains q; independent of the KMP product."""
    s = chain.n_states
    probs = chain.transition_probabilities().toarray()
    tuples = [[chain.channel_names.index(c) for c in t] for t in chain.state_tuples()]
    pattern = tuple(chain.channel_names.index(c) for c in q)
    m = len(pattern)
    mass = {(s, ()): 1.0}
    kept = 0.0
    while sum(mass.values()) > 1e-13:
        nxt: dict = {}
        for (state, hist), w in mass.items():
            kept += w * probs[state, s + 1]
            for t in range(s):
                if probs[state, t] == 0:
                    continue
                seq = hist + tuple(tuples[t] if state == s else [tuples[t][-1]])
                if any(seq[i:i + m] == pattern for i in range(len(seq) - m + 1)):
                    continue
                key = (t, seq[-(m - 1):] if m > 1 else ())
                nxt[key] = nxt.get(key, 0.0) + w * probs[state, t]
        mass = nxt
    base = removal_effects(chain, conv).conversion_probability
    return (base - kept) / base


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("repeats", ["collapse_states", "keep"])
def test_sequence_effects_match_walk_enumeration(order: int, repeats: str) -> None:
    conv = MarkovConventions(order=order, repeats=repeats)
    chain = build_chain(PATHS, conv)
    seqs = [("a",), ("a", "b"), ("b", "a"), ("a", "b", "c"), ("b", "b"), ("c", "a", "b")]
    got = sequence_removal_effects(chain, seqs, conv)
    for q, e in zip(seqs, got):
        assert e.removal_effect == pytest.approx(_brute_sequence_effect(chain, conv, q), abs=1e-9)


def test_single_channel_sequence_is_the_channel_removal_effect() -> None:
    for order in (1, 2, 3):
        conv = MarkovConventions(order=order)
        m = markov_attribution(PATHS, conv)
        effects = sequence_removal_effects(PATHS, [(c,) for c in PATHS.channel_names], conv)
        np.testing.assert_allclose([e.removal_effect for e in effects], m.removal_effects, atol=1e-9)


def test_sequences_through_attribute_and_parsing() -> None:
    r = attribute(PATHS, "shapley", sequences=["a > b", "zzz"])
    seqs = {d["sequence"]: d for d in r.details["sequences"]}
    assert seqs["a > b"]["removal_effect"] > 0 and seqs["zzz"]["removal_effect"] == 0.0
    assert parse_sequences(["a>b", ["c", "d"]]) == [("a", "b"), ("c", "d")]
    with pytest.raises(AttributionInputError) as exc:
        parse_sequences(["a > > b"])
    assert exc.value.field == "sequences[0]"


# ---- heuristics and value ----------------------------------------------------------------


def test_position_based_and_time_decay_by_hand() -> None:
    p = Paths.from_lists([["a", "b", "c", "d"], ["a", "b"], ["c"]], [1.0, 1.0, 1.0], [10.0, 4.0, 2.0])
    pb = heuristic(p, "position_based")
    # 4 touches: 0.4 / 0.1 / 0.1 / 0.4; 2 touches: 0.5 / 0.5; 1 touch: 1.
    np.testing.assert_allclose(pb.conversions, [0.4 + 0.5, 0.1 + 0.5, 0.1 + 1.0, 0.4])
    np.testing.assert_allclose(pb.revenue, [4 + 2, 1 + 2, 1 + 2, 4])
    custom = heuristic(p, "position_based", HeuristicParams(position_weights=(0.6, 0.0, 0.4)))
    np.testing.assert_allclose(custom.conversions, [0.6 + 0.6, 0.4, 1.0, 0.4])
    ages = np.array([14.0, 7.0, 0.0, 0.0, 7.0, 0.0, 3.0])
    td = heuristic(p, "time_decay", touch_ages=ages)
    w = np.array([0.25, 0.5, 1.0, 1.0]) / 2.75
    np.testing.assert_allclose(td.conversions, [w[0] + 1 / 3, w[1] + 2 / 3, w[2] + 1.0, w[3]])
    slow = heuristic(p, "time_decay", HeuristicParams(half_life_days=1e9), touch_ages=ages)
    np.testing.assert_allclose(slow.conversions, heuristic(p, "linear").conversions, rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    ({"half_life_days": 0}, "half_life_days"), ({"position_weights": (0.5, 0.5, 0.5)}, "position_weights"),
    ({"position_weights": (1.0, 0.0)}, "position_weights"),
])
def test_bad_heuristic_params(kwargs: dict, field: str) -> None:
    with pytest.raises(AttributionInputError) as exc:
        HeuristicParams(**kwargs)
    assert exc.value.field == field


path_strategy = st.lists(st.sampled_from("abc"), min_size=1, max_size=4)
row_strategy = st.tuples(path_strategy, st.integers(0, 3), st.integers(0, 3), st.floats(0, 50))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(row_strategy, min_size=1, max_size=6), method=st.sampled_from(METHODS),
       order=st.integers(1, 3), split_seed=st.integers(0, 1000))
def test_grouped_and_ungrouped_journeys_give_the_same_answer(rows, method, order, split_seed) -> None:
    """A row with c conversions / n nulls / value v equals the same path written as
    c + n single-journey rows (each conversion carrying v / c)."""
    paths, conv, nulls, values = [], [], [], []
    for p, c, n, v in rows:
        paths.append(p)
        conv.append(c)
        nulls.append(n)
        values.append(v if c > 0 else 0.0)
    grouped = Paths.from_lists(paths, conv, values, nulls, channel_names=["a", "b", "c"])
    split_paths, split_conv, split_val, split_null = [], [], [], []
    for p, c, n, v in zip(paths, conv, nulls, values):
        for _ in range(c):
            split_paths.append(p), split_conv.append(1), split_val.append(v / c), split_null.append(0)
        for _ in range(n):
            split_paths.append(p), split_conv.append(0), split_val.append(0.0), split_null.append(1)
    if not split_paths:
        return
    perm = np.random.default_rng(split_seed).permutation(len(split_paths))
    ungrouped = Paths.from_lists([split_paths[i] for i in perm], [split_conv[i] for i in perm],
                                 [split_val[i] for i in perm], [split_null[i] for i in perm],
                                 channel_names=["a", "b", "c"])
    ages_g = np.zeros(grouped.n_touches)
    ages_u = np.zeros(ungrouped.n_touches)
    a = attribute(grouped, method, order=order, touch_ages=ages_g)
    b = attribute(ungrouped, method, order=order, touch_ages=ages_u)
    np.testing.assert_allclose(a.conversions, b.conversions, atol=1e-9)
    np.testing.assert_allclose(a.revenue, b.revenue, atol=1e-7)
    assert a.total_value == pytest.approx(b.total_value)
    if a.total_conversions > 0:
        assert a.revenue.sum() == pytest.approx(a.total_value) or a.revenue.sum() == pytest.approx(0.0)


# ---- persona prior served ------------------------------------------------------------------


def test_persona_prior_through_attribute_and_its_bootstrap() -> None:
    from services.attribution.domain.hybrid import smoothed_markov_attribution

    persona = Paths.from_lists([["a", "d"], ["d"], ["b", "a"]], [3, 1, 2], [9, 2, 4], [1, 4, 2])
    direct = smoothed_markov_attribution(PATHS, persona, 5.0)
    r = attribute(PATHS, "markov", prior_paths=persona, prior_strength=5.0,
                  bootstrap=BootstrapSpec(4, seed=2))
    assert r.channel_names == ("a", "b", "c", "d")  # united vocabulary
    np.testing.assert_allclose(r.conversions, direct.conversions, atol=1e-12)
    assert r.details["persona_prior"] == {"strength": 5.0, "prior_journeys": 13.0}
    # kappa = 0 is the raw chain; the prior moves credit toward the persona's channel d.
    raw = attribute(PATHS, "markov", prior_paths=persona, prior_strength=0.0)
    assert "persona_prior" not in raw.details and raw.channel_names == ("a", "b", "c")
    assert r.conversions[3] > 0.0
    # Bootstrap replicates: the person's journeys resampled, the prior fixed.
    person = PATHS.with_channel_names(r.channel_names)
    units, _ = group_identical_paths(person.select(person.lengths > 0))
    c, nl, v = _draw(np.random.default_rng(2), units.conversions, units.nulls, units.values, 4)
    reps = bootstrap_replicates(person, ["markov"], BootstrapSpec(4, seed=2),
                                prior_paths=persona.with_channel_names(r.channel_names), prior_strength=5.0)
    for j in range(4):
        q = Paths(units.channels, units.offsets, c[:, j], v[:, j], nl[:, j], units.channel_names)
        expected = smoothed_markov_attribution(q, persona.with_channel_names(r.channel_names), 5.0)
        np.testing.assert_allclose(reps["markov"][0][j], expected.conversions, atol=1e-9)
    with pytest.raises(AttributionInputError) as exc:
        attribute(PATHS, "markov", prior_paths=persona, prior_strength=-1)
    assert exc.value.field == "prior_strength"


def test_auto_order_flags_a_win_at_the_largest_candidate() -> None:
    sel = choose_order(_second_order_world(3000, 3), max_order=2)
    assert sel.chosen == 2 and sel.to_dict()["at_upper_bound"] is True
    assert choose_order(_second_order_world(3000, 3)).to_dict()["at_upper_bound"] is False


# ---- the caller's deadline -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"method": "hybrid", "bootstrap": BootstrapSpec(replicates=50, seed=1)},
    {"method": "markov", "order": "auto"},
    {"method": "markov", "order": 2},
])
def test_attribution_past_the_served_rpcs_deadline_stops_with_deadline_exceeded(kwargs) -> None:
    """Inside an RPC whose deadline has passed the work stops between steps (session 21:
    gRPC cannot interrupt a handler, so an attribution nobody waits for ran on for
    minutes); outside an RPC, or before the deadline, it runs as ever."""
    from services.common import client
    from services.common.errors import DeadlineExceeded

    token = client.set_serving_deadline(-1.0)
    try:
        with pytest.raises(DeadlineExceeded):
            attribute(PATHS, **kwargs)
    finally:
        client.reset_serving_deadline(token)
    token = client.set_serving_deadline(60.0)
    try:
        assert attribute(PATHS, **kwargs).conversions.sum() > 0
    finally:
        client.reset_serving_deadline(token)
    assert attribute(PATHS, **kwargs).conversions.sum() > 0
