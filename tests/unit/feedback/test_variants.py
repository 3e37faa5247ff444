"""A/B variants: stable assignment, traffic shares, kill switch, flags JSON, significance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.variants import (
    BUCKETS,
    ExperimentFlags,
    assign_variant,
    assign_variants,
    bucket,
    compare_variants,
    two_proportion_z_test,
    variant_for_bucket,
)

ACCOUNTS = [f"acct-{i:05d}" for i in range(10_000)]


def test_bucket_is_the_documented_sha256() -> None:
    digest = hashlib.sha256("exp-1\x1facct-42".encode()).digest()
    assert bucket("exp-1", "acct-42") == int.from_bytes(digest[:8], "big") % 10_000
    assert bucket("exp-1", "acct-42") == bucket("exp-1", "acct-42")


def test_different_salts_split_independently() -> None:
    a = assign_variants(ExperimentFlags(salt="exp-a", traffic={"gmm": 30.0}), ACCOUNTS) == "gmm"
    b = assign_variants(ExperimentFlags(salt="exp-b", traffic={"gmm": 30.0}), ACCOUNTS) == "gmm"
    # Independent 30 % arms overlap on 9 % of households (sd 0.29 % at n = 10,000).
    assert abs(np.mean(a & b) - 0.09) <= 0.012


def test_assignment_is_deterministic_and_matches_scalar_path() -> None:
    flags = ExperimentFlags(salt="gmm-rollout", traffic={"gmm": 30.0})
    first = assign_variants(flags, ACCOUNTS)
    again = assign_variants(ExperimentFlags.from_json(flags.to_json()), ACCOUNTS)
    np.testing.assert_array_equal(first, again)
    assert [assign_variant(flags, a) for a in ACCOUNTS[:500]] == first[:500].tolist()


def test_traffic_share_within_tolerance() -> None:
    flags = ExperimentFlags(salt="gmm-rollout", traffic={"gmm": 30.0})
    share = float(np.mean(assign_variants(flags, ACCOUNTS) == "gmm"))
    # Binomial sd at n = 10,000, p = 0.3 is 0.46 %; 1.5 % is > 3 sd.
    assert abs(share - 0.30) <= 0.015


def test_three_way_split_and_contiguous_ranges() -> None:
    flags = ExperimentFlags(salt="s", control="kmeans", traffic={"gmm": 20.0, "dpgmm": 10.5})
    assert flags.bucket_ranges() == {"gmm": (0, 2000), "dpgmm": (2000, 3050)}
    assert variant_for_bucket(flags, 1999) == "gmm"
    assert variant_for_bucket(flags, 2000) == "dpgmm"
    assert variant_for_bucket(flags, 3050) == "kmeans"
    names = assign_variants(flags, ACCOUNTS)
    assert abs(np.mean(names == "gmm") - 0.20) <= 0.015
    assert abs(np.mean(names == "dpgmm") - 0.105) <= 0.015
    assert abs(np.mean(names == "kmeans") - 0.695) <= 0.015


def test_raising_a_share_only_moves_households_out_of_control() -> None:
    small = assign_variants(ExperimentFlags(salt="s", traffic={"gmm": 10.0}), ACCOUNTS)
    large = assign_variants(ExperimentFlags(salt="s", traffic={"gmm": 30.0}), ACCOUNTS)
    assert np.all(large[small == "gmm"] == "gmm")


def test_kill_switch_sends_everyone_to_control_and_is_reversible() -> None:
    flags = ExperimentFlags(salt="s", traffic={"gmm": 50.0}, kill_switch=True)
    assert set(assign_variants(flags, ACCOUNTS).tolist()) == {"kmeans"}
    assert all(assign_variant(flags, a) == "kmeans" for a in ACCOUNTS[:200])
    restored = ExperimentFlags.from_dict({**flags.to_dict(), "kill_switch": False})
    assert abs(np.mean(assign_variants(restored, ACCOUNTS) == "gmm") - 0.5) <= 0.015


@settings(max_examples=30, deadline=None)
@given(percent=st.integers(0, 10_000), account=st.text(min_size=1, max_size=20))
def test_scalar_and_vector_agree_on_any_share(percent: int, account: str) -> None:
    flags = ExperimentFlags(salt="prop", traffic={"gmm": percent / 100})
    assert assign_variants(flags, [account])[0] == assign_variant(flags, account)
    expected = "gmm" if bucket("prop", account) < percent else "kmeans"
    assert assign_variant(flags, account) == expected


def test_flags_json_round_trip() -> None:
    flags = ExperimentFlags(salt="x", control="kmeans", traffic={"gmm": 12.34, "b": 0.01}, kill_switch=False, version=9)
    assert ExperimentFlags.from_json(flags.to_json()) == flags
    assert list(ExperimentFlags.from_json(flags.to_json()).traffic) == ["gmm", "b"]  # order matters


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"salt": ""}, "salt"),
        ({"salt": "s", "traffic": {"gmm": 101}}, "traffic.gmm"),
        ({"salt": "s", "traffic": {"gmm": -1}}, "traffic.gmm"),
        ({"salt": "s", "traffic": {"gmm": 60, "b": 50}}, "traffic"),
        ({"salt": "s", "traffic": {"gmm": 12.345}}, "traffic.gmm"),
        ({"salt": "s", "traffic": {"kmeans": 10}}, "traffic.kmeans"),
        ({"salt": "s", "traffic": {"gmm": float("nan")}}, "traffic.gmm"),
        ({"salt": "s", "kill_switch": "yes"}, "kill_switch"),
    ],
)
def test_invalid_flags_name_the_field(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as info:
        ExperimentFlags(**kwargs)
    assert info.value.field == field


def test_invalid_flags_json() -> None:
    with pytest.raises(InvalidArgument) as info:
        ExperimentFlags.from_json('{"salt": "s", "trafic": {}}')
    assert info.value.field == "trafic"
    with pytest.raises(InvalidArgument):
        ExperimentFlags.from_json("not json")
    with pytest.raises(InvalidArgument):
        variant_for_bucket(ExperimentFlags(salt="s"), BUCKETS)


def test_two_proportion_z_test_by_hand() -> None:
    # p1 = 0.6, p2 = 0.5, n = 1000 each: pooled 0.55, se = sqrt(0.55 * 0.45 * 2/1000) = 0.022249
    # z = 0.1 / 0.022249 = 4.4947; p = 2 * sf(4.4947)
    z, p = two_proportion_z_test(0.6, 1000, 0.5, 1000)
    assert z == pytest.approx(0.1 / np.sqrt(0.55 * 0.45 * 0.002))
    assert p == pytest.approx(2 * norm.sf(z))
    assert two_proportion_z_test(1.0, 10, 1.0, 20) == (0.0, 1.0)


def test_compare_variants_detects_a_real_difference_and_not_a_fake_one() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    variants = np.where(np.arange(n) % 2 == 0, "kmeans", "gmm")
    confidence = rng.uniform(0.5, 1.0, n)
    # gmm is calibrated; kmeans is right 15 points less often than it claims.
    truth_rate = np.where(variants == "gmm", confidence, confidence - 0.15)
    correct = (rng.random(n) < truth_rate).astype(float)
    metrics, (comparison,) = compare_variants(variants, confidence, correct, n_bootstrap=500)
    assert set(metrics) == {"gmm", "kmeans"} and metrics["gmm"].n == 2000
    assert comparison.variant == "gmm" and comparison.accuracy_diff > 0.1
    assert comparison.accuracy_significant and comparison.p_value < 1e-6
    assert comparison.brier_ci_high < 0 and comparison.brier_significant
    assert comparison.brier_ci_low <= comparison.brier_diff <= comparison.brier_ci_high
    assert metrics["kmeans"].ece > metrics["gmm"].ece

    # Same generating process in both arms: no significance expected.
    same = (rng.random(n) < confidence).astype(float)
    _, (null,) = compare_variants(variants, confidence, same, n_bootstrap=500, seed=1)
    assert not null.accuracy_significant
    assert null.brier_ci_low < 0 < null.brier_ci_high


def test_compare_variants_weights_and_missing_control() -> None:
    variants = np.array(["gmm"] * 4)
    metrics, comparisons = compare_variants(variants, [0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], weights=[1, 1, 1, 1])
    assert comparisons == [] and metrics["gmm"].n_effective == pytest.approx(4.0)
    metrics, _ = compare_variants(variants, [0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], weights=[2, 0, 0, 2])
    # Kish: (2 + 2)^2 / (4 + 4) = 2
    assert metrics["gmm"].n_effective == pytest.approx(2.0) and metrics["gmm"].accuracy == pytest.approx(1.0)
    with pytest.raises(InvalidArgument) as info:
        compare_variants([], [], [])
    assert info.value.field == "variants"


def test_full_split_form_of_the_api() -> None:
    flags = ExperimentFlags.from_split("s", {"kmeans": 60.0, "gmm": 30.0, "dpgmm": 10.0}, control="kmeans", version=2)
    assert list(flags.traffic) == ["dpgmm", "gmm"]  # name order, not map order
    assert flags.shares() == {"kmeans": 60.0, "dpgmm": 10.0, "gmm": 30.0}
    killed = ExperimentFlags.from_dict({**flags.to_dict(), "kill_switch": True})
    assert killed.shares() == {"kmeans": 100.0, "dpgmm": 0.0, "gmm": 0.0}
    with pytest.raises(InvalidArgument, match="sum to 100"):
        ExperimentFlags.from_split("s", {"kmeans": 60.0, "gmm": 30.0}, control="kmeans")
    with pytest.raises(InvalidArgument, match="control"):
        ExperimentFlags.from_split("s", {"gmm": 100.0}, control="kmeans")
