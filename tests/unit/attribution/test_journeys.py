"""Journeys per account and per person, lookback window, probabilistic splits."""

from __future__ import annotations

import numpy as np
import pytest

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.journeys import build_journeys
from services.attribution.domain.markov import markov_attribution
from services.attribution.domain.shapley import shapley_attribution

DAY = 86_400.0


def two_person_household():
    """Person 0 sees email then search and converts (value 10); person 1 sees display
    then social and converts later (value 4). One account, interleaved in time."""
    touch_account = ["acc"] * 4
    touch_ts = [0.0, 1.0 * DAY, 2.0 * DAY, 3.0 * DAY]
    touch_channel = ["email", "display", "search", "social"]
    person = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    conv_account = ["acc", "acc"]
    conv_ts = [2.5 * DAY, 3.5 * DAY]
    conv_value = [10.0, 4.0]
    conv_person = np.array([[1.0, 0.0], [0.0, 1.0]])
    return touch_account, touch_ts, touch_channel, person, conv_account, conv_ts, conv_value, conv_person


def test_two_persons_each_credited_with_their_own_conversion() -> None:
    ta, tt, tc, tp, ca, ct, cv, cp = two_person_household()
    js = build_journeys(ta, tt, tc, ca, ct, cv, lookback=30 * DAY, level="person",
                        touch_person_prob=tp, conv_person_prob=cp)
    conv_paths = js.paths.select(js.path_conversion >= 0)
    got = {tuple(conv_paths.path(i)): (conv_paths.conversions[i], conv_paths.values[i]) for i in range(conv_paths.n_paths)}
    assert got == {("email", "search"): (1.0, 10.0), ("display", "social"): (1.0, 4.0)}
    credit = dict(zip(js.paths.channel_names, shapley_attribution(js.paths).revenue))
    assert credit == pytest.approx({"display": 2.0, "email": 5.0, "search": 5.0, "social": 2.0})
    person0 = js.for_person("acc", 0)
    assert [person0.path(i) for i in range(person0.n_paths)] == [["email", "search"]]

    # At account level the first conversion also takes person 1's display touch, and
    # the reset leaves only "social" for the second conversion.
    acc = build_journeys(ta, tt, tc, ca, ct, cv, lookback=30 * DAY)
    acc_paths = {tuple(acc.paths.path(i)) for i in range(acc.paths.n_paths)}
    assert acc_paths == {("email", "display", "search"), ("social",)}
    assert np.all(acc.path_person == -1)


def test_lookback_window_and_null_journeys() -> None:
    ta = ["a"] * 4
    tt = [0.0, 1.0, 50.0, 58.0]
    tc = ["x", "y", "z", "w"]
    js = build_journeys(ta, tt, tc, ["a"], [60.0], [1.0], lookback=10.0)
    conv = js.paths.select(js.path_conversion == 0)
    assert conv.n_paths == 1 and conv.path(0) == ["z", "w"]
    nulls = js.paths.select(js.path_conversion == -1)
    assert [nulls.path(i) for i in range(nulls.n_paths)] == [["x", "y"]]
    assert nulls.nulls.tolist() == [1.0] and nulls.conversions.tolist() == [0.0]
    # The edges of the window are inclusive: a touch exactly lookback before counts.
    js2 = build_journeys(ta, tt, tc, ["a"], [60.0], lookback=10.0 + 1e-9)
    assert js2.paths.select(js2.path_conversion == 0).path(0) == ["z", "w"]
    js3 = build_journeys(ta, tt, tc, ["a"], [60.0], lookback=60.0)
    assert js3.paths.select(js3.path_conversion == 0).path(0) == ["x", "y", "z", "w"]
    # Without null journeys the old touches disappear.
    js4 = build_journeys(ta, tt, tc, ["a"], [60.0], lookback=10.0, include_nulls=False)
    assert js4.paths.n_paths == 1


def test_no_reset_lets_touches_feed_several_conversions() -> None:
    js = build_journeys(["a", "a"], [0.0, 1.0], ["x", "y"], ["a", "a"], [2.0, 3.0], lookback=10.0,
                        reset_after_conversion=False)
    assert [js.paths.path(i) for i in range(js.paths.n_paths)] == [["x", "y"], ["x", "y"]]
    js = build_journeys(["a", "a"], [0.0, 1.0], ["x", "y"], ["a", "a"], [2.0, 3.0], lookback=10.0)
    assert js.paths.n_paths == 1 and js.unattributed_conversions == 1.0


def test_uncertain_conversion_is_split_by_probability() -> None:
    ta, tt, tc, tp, ca, ct, cv, cp = two_person_household()
    cp = np.array([[0.7, 0.3], [0.0, 1.0]])
    js = build_journeys(ta, tt, tc, ca, ct, cv, lookback=30 * DAY, level="person",
                        touch_person_prob=tp, conv_person_prob=cp)
    first = js.paths.select(js.path_conversion == 0)
    by_person = {int(js.path_person[np.flatnonzero(js.path_conversion == 0)[i]]): (first.conversions[i], first.values[i], first.nulls[i]) for i in range(first.n_paths)}
    assert by_person[0] == pytest.approx((0.7, 7.0, 0.3))
    assert by_person[1] == pytest.approx((0.3, 3.0, 0.7))
    assert js.paths.conversions.sum() + js.unattributed_conversions == pytest.approx(2.0)


def test_uncertain_touches_go_to_most_probable_person_and_threshold_drops_small_shares() -> None:
    ta, tt, tc, tp, ca, ct, cv, cp = two_person_household()
    tp = np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.45, 0.55]])
    cp = np.array([[0.95, 0.05], [0.1, 0.9]])
    js = build_journeys(ta, tt, tc, ca, ct, cv, lookback=30 * DAY, level="person",
                        touch_person_prob=tp, conv_person_prob=cp, min_person_probability=0.2)
    conv_paths = js.paths.select(js.path_conversion >= 0)
    # Shares under 0.2 are dropped and the rest renormalised to the whole conversion.
    np.testing.assert_allclose(sorted(conv_paths.conversions), [1.0, 1.0])


def test_conversion_without_person_probabilities_splits_by_touch_share() -> None:
    tp = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    js = build_journeys(["a"] * 3, [0.0, 1.0, 2.0], ["x", "y", "z"], ["a"], [3.0], [9.0], lookback=10.0,
                        level="person", touch_person_prob=tp)
    np.testing.assert_allclose(sorted(js.paths.conversions), [1 / 3, 2 / 3])
    np.testing.assert_allclose(js.paths.values.sum(), 9.0)


def test_datetime_times_and_kinds_filter() -> None:
    t = np.array(["2024-01-01T00:00", "2024-01-05T00:00"], dtype="datetime64[m]")
    c = np.array(["2024-01-06T00:00", "2024-01-06T01:00"], dtype="datetime64[m]")
    js = build_journeys(["a", "a"], t, ["x", "y"], ["a", "a"], c, [5.0, 7.0], lookback=np.timedelta64(3, "D"),
                        conv_kind=["signup", "purchase"], kinds={"purchase"})
    conv = js.paths.select(js.path_conversion >= 0)
    assert conv.n_paths == 1 and conv.path(0) == ["y"] and conv.values.tolist() == [7.0]
    assert js.path_conversion.max() == 1


def test_account_level_markov_runs_on_built_journeys() -> None:
    ta, tt, tc, tp, ca, ct, cv, cp = two_person_household()
    js = build_journeys(ta, tt, tc, ca, ct, cv, lookback=30 * DAY)
    res = markov_attribution(js.paths)
    assert res.conversions.sum() == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lookback": -1.0}, "lookback"),
        ({"level": "device"}, "level"),
        ({"level": "person"}, "touch_person_prob"),
        ({"level": "person", "touch_person_prob": np.array([[0.5, 0.2]])}, "touch_person_prob"),
        ({"conv_value": [-1.0]}, "conv_value"),
        ({"kinds": {"x"}}, "conv_kind"),
        ({"use_campaign": True}, "touch_campaign"),
        ({"channel_names": ["q"]}, "touch_channel"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    args = dict(touch_account=["a"], touch_ts=[0.0], touch_channel=["x"], conv_account=["a"], conv_ts=[1.0],
                conv_value=[1.0], lookback=5.0)
    args.update(kwargs)
    with pytest.raises(AttributionInputError) as exc:
        build_journeys(**args)
    assert exc.value.field == field


def test_empty_inputs() -> None:
    js = build_journeys([], [], [], [], [], [], lookback=1.0)
    assert js.paths.n_paths == 0
    js = build_journeys([], [], [], ["a"], [1.0], [3.0], lookback=1.0)
    assert js.paths.n_paths == 0 and js.unattributed_conversions == 1.0 and js.unattributed_value == 3.0


def test_campaign_level_channels() -> None:
    js = build_journeys(["a", "a"], [0.0, 1.0], ["email", "email"], ["a"], [2.0], lookback=5.0,
                        touch_campaign=["spring", "fall"], use_campaign=True)
    assert js.paths.path(0) == ["email/spring", "email/fall"]
