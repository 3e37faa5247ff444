"""bench.feedback_decompose: ECE after feedback taken apart by bin and covariate, and its noise
over households (issue #10, ece35; docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np

from bench import feedback_decompose as D
from bench._clustering_eval import ece, ece_floor


def _households(n_house: int, per: int, spread: float, seed: int = 0):
    """Confidences and outcomes of ``n_house`` households of ``per`` answers each, every
    household right with probability its confidence + an offset of its own (s.d. ``spread``,
    zero on average: the population is calibrated, the households are not)."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0.0, spread, n_house)
    conf = rng.uniform(0.4, 0.95, n_house * per)
    account = np.repeat(np.arange(n_house).astype(str), per)
    truth = np.clip(conf + np.repeat(offset, per), 0.0, 1.0)
    return conf, (rng.random(conf.size) < truth).astype(float), account


def test_the_cells_parts_sum_to_the_pooled_ece_and_a_cell_that_cancels_is_negative():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 0.9, 6000)
    over = np.arange(conf.size) % 3 == 0          # a third over-confident by 0.15, the rest by 0.03
    right = (rng.random(conf.size) < np.clip(conf - np.where(over, 0.15, -0.03), 0, 1)).astype(float)
    cell = np.where(over, "over", "under")
    parts = D.parts_by(conf, right, cell)
    assert abs(sum(p["part"] for p in parts.values()) - ece(conf, right)) < 1e-4
    assert parts["over"]["part"] > 0 > parts["under"]["part"]
    # the bins' parts are the ECE too
    assert abs(sum(b["part"] for b in D.bin_table(conf, right)) - ece(conf, right)) < 1e-4


def test_the_household_bootstrap_floor_sees_what_independent_draws_do_not():
    # calibrated households: the clustered floor is the Bernoulli floor
    conf, right, account = _households(60, 120, 0.0)
    calm = D.household_bootstrap(conf, right, account, reps=100)
    assert abs(calm["clustered_floor"] - ece_floor(conf)) < 0.006, calm
    # 20 households off by 0.15 each way (zero on average): independent draws still say ~0.012,
    # the households' own spread makes a calibrated population read about twice that
    floors, bernoulli, sds = [], [], []
    for seed in range(3):
        conf, right, account = _households(20, 360, 0.15, seed=seed)
        spread = D.household_bootstrap(conf, right, account, reps=100)
        floors.append(spread["clustered_floor"])
        bernoulli.append(ece_floor(conf))
        sds.append(spread["boot_sd"])
    assert np.mean(floors) > 1.5 * np.mean(bernoulli), (floors, bernoulli)
    assert np.mean(sds) > calm["boot_sd"]


def test_its_ece_is_the_whole_loops_figure_in_batch_and_in_streams():
    from bench.feedback_shipped import draws_of
    from tests.helpers.feedback_loop import whole_loop_cases
    for mode, hs, outs, loop in whole_loop_cases():
        scored = [D.score_draw(hs, d, mode, seed=i) for i, d in enumerate(draws_of("tuning", hs, outs, 2, mode))]
        assert [s["ece"] for s in scored] == [round(x, 4) for x in loop["per_draw"]["mesh"]], mode
        for s in scored:
            for cells in s["by"].values():
                assert abs(sum(p["part"] for p in cells.values()) - s["ece"]) < 1e-3


def test_the_parametric_floor_agrees_with_the_bootstrap_on_households_that_differ():
    calm, spread = [], []
    for seed in range(3):
        conf, right, account = _households(20, 360, 0.0, seed=seed)
        calm.append(D.household_offset_floor(conf, right, account, reps=20)["floor"])
        conf, right, account = _households(20, 360, 0.15, seed=seed)
        out = D.household_offset_floor(conf, right, account, reps=20)
        spread.append(out["floor"])
        assert 0.08 < out["offset_sd"] < 0.22, out
    assert np.mean(calm) < 0.016 and np.mean(spread) > 1.5 * np.mean(calm), (calm, spread)


def test_the_clustered_floor_falls_with_more_households_like_these():
    conf, right, account = _households(20, 360, 0.15, seed=1)
    at = D.household_bootstrap(conf, right, account, reps=80, sizes=D.FLOOR_SIZES)["clustered_floor_at_households"]
    sizes = sorted(at, key=int)
    assert [at[m] for m in sizes] == sorted((at[m] for m in sizes), reverse=True), at
    assert at[sizes[-1]] < at[sizes[0]] / 2.5, at
