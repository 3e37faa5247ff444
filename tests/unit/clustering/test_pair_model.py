"""bench/pair_model.py: the pairwise same-member features and the resolution of persons
from pair log-odds (docs/clustering.md 4m)."""

import numpy as np
import pytest

from bench import pair_model as PM, worlds as W
from services.clustering.domain import features as F


def _vector(hour: float, dow: int, device: str, genres: dict[str, float], kids: float = 0.0,
            minutes: float = 60.0, binge: bool = False) -> np.ndarray:
    x = np.zeros(F.FEATURE_DIM)
    x[F.HOUR] = np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)
    x[F.DOW] = np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)
    x[F.DEVICE.start + F.DEVICE_TYPES.index(device)] = 1.0
    for g, w in genres.items():
        x[F.GENRE.start + F.GENRES.index(g)] = w
    x[F.KIDS_SHARE] = kids
    x[F.LOG_MINUTES] = np.log1p(minutes)
    x[F.BINGE] = float(binge)
    x[F.LOG_TITLES] = np.log1p(1)
    return x


def _col(name: str, context: bool = False) -> int:
    return PM.feature_names(context).index(name)


def test_pair_features_read_hours_on_the_circle_days_devices_and_tastes():
    X = np.array([
        _vector(23.0, 5, "mobile", {"drama": 1.0}),            # Saturday 23h, phone A
        _vector(1.0, 6, "mobile", {"drama": 1.0}),             # Sunday 1h, phone A
        _vector(11.0, 1, "tv", {"kids": 0.5, "animation": 0.5}, kids=1.0),   # Tuesday 11h, TV
        _vector(23.0, 5, "mobile", {"comedy": 1.0}),           # Saturday 23h, phone B
    ])
    s = PM.sessions_of(X, np.array(["phoneA", "phoneA", "tv", "phoneB"]))
    i, j = np.array([0, 0, 0, 0]), np.array([1, 2, 3, 0])
    Z = PM.pair_features(s, i, j)
    assert Z.shape == (4, len(PM.feature_names()))
    assert Z[:, _col("hour_dist")] == pytest.approx([2.0, 12.0, 0.0, 0.0], abs=1e-6)   # 23h and 1h are 2 h apart
    assert Z[:, _col("both_weekend")].tolist() == [1, 0, 1, 1]
    assert Z[:, _col("one_weekend")].tolist() == [0, 1, 0, 0]
    assert Z[:, _col("dow_dist")].tolist() == [1, 3, 0, 0]                 # Saturday to Tuesday: 3 days round the week
    assert Z[:, _col("same_device")].tolist() == [1, 0, 0, 1]
    assert Z[:, _col("one_personal")].tolist() == [0, 1, 0, 0]
    assert Z[:, _col("two_personal_devices")].tolist() == [0, 0, 1, 0]
    assert Z[:, _col("genre_cos")] == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert Z[:, _col("kids_diff")] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    # symmetric in the two sessions
    assert PM.pair_features(s, j, i) == pytest.approx(Z)


def test_context_features_say_gap_series_and_overlap_on_two_devices():
    X = np.array([_vector(20.0, 2, "tv", {"drama": 1.0}), _vector(20.5, 2, "mobile", {"drama": 1.0}),
                  _vector(20.0, 3, "tv", {"drama": 1.0})])
    start = np.array([0.0, 1800.0, 86_400.0])
    end = start + 3600.0
    s = PM.sessions_of(X, np.array(["tv", "phone", "tv"]), start, end, (("s1",), (), ("s1", "s2")))
    Z = PM.pair_features(s, np.array([0, 0, 1]), np.array([1, 2, 2]), context=True)
    assert Z[:, _col("log_gap_hours", True)] == pytest.approx(np.log1p([0.5, 24.0, 23.5]))
    assert Z[:, _col("same_series", True)].tolist() == [0, 1, 0]
    assert Z[:, _col("overlap_two_devices", True)].tolist() == [1, 0, 0]
    with pytest.raises(ValueError):
        PM.pair_features(PM.sessions_of(X, np.array(["tv", "phone", "tv"])), np.array([0]), np.array([1]), context=True)


def _blocks(sizes: list[int], within: float, across: float) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    L = np.where(labels[:, None] == labels[None, :], within, across).astype(np.float64)
    np.fill_diagonal(L, 0.0)
    return L


def test_average_linkage_stops_at_the_threshold_and_the_count_falls_out():
    L = _blocks([6, 4, 5], within=2.0, across=-2.0)
    none = np.full(15, -1)
    labels = PM.average_linkage(L, none, threshold=0.0)
    assert np.unique(labels).size == 3
    assert all(np.unique(labels[a:b]).size == 1 for a, b in ((0, 6), (6, 10), (10, 15)))
    # above every score nothing merges; below every score everything does
    assert np.unique(PM.average_linkage(L, none, threshold=2.5)).size == 15
    assert np.unique(PM.average_linkage(L, none, threshold=-2.5)).size == 1


def test_must_link_groups_stay_together_and_join_by_their_mean_score():
    L = _blocks([4, 4], within=2.0, across=-2.0)
    group = np.full(8, -1)
    group[[0, 4]] = 0          # a device whose two sessions score apart (e.g. lent once)
    labels = PM.average_linkage(L, group, threshold=0.0)
    assert labels[0] == labels[4]
    # the group's mean score to either block is 0: it stays apart from both at threshold 0
    assert np.unique(labels).size == 3
    group_of_block = np.full(8, -1)
    group_of_block[:4] = 0
    assert np.unique(PM.average_linkage(L, group_of_block, threshold=0.0)).size == 2


def test_small_clusters_are_dissolved_into_the_cluster_they_score_highest_with():
    L = _blocks([10, 10, 2], within=2.0, across=-2.0)
    L[20:, 10:20] = L[10:20, 20:] = 1.0     # the pair is closer to the second block
    labels = PM.average_linkage(L, np.full(22, -1), threshold=1.5)
    assert np.unique(labels).size == 3
    out = PM.dissolve_small(L, labels, min_size=3, min_share=0.5)
    assert np.unique(out).size == 2
    assert (out[20:] == out[10]).all() and out[0] != out[10]
    # a cluster large enough by its share of the household is kept
    assert np.unique(PM.dissolve_small(L, labels, min_size=3, min_share=0.05)).size == 3
    # nothing large enough: one person, the largest cluster
    assert np.unique(PM.dissolve_small(L, labels, min_size=50, min_share=0.9)).size == 1


def test_training_pairs_are_labelled_by_the_true_member_and_the_model_learns_them():
    hs = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=4)
    Z, y = PM.training_pairs(hs[0], n_pairs=200)
    assert Z.shape == (200, len(PM.feature_names())) and set(np.unique(y)) <= {0, 1}
    clf = PM.train(hs[:3], n_pairs=300, rounds=40)
    s = PM.sessions_of_household(hs[3])
    L = PM.pair_logodds(clf, s)
    assert L.shape == (s.n, s.n) and np.allclose(L, L.T) and (np.abs(L) <= PM.CLIP).all()
    i, j = np.triu_indices(s.n, 1)
    same = hs[3].person[i] == hs[3].person[j]
    if 0 < same.mean() < 1:     # the pairs of one member score higher than pairs of two
        assert L[i, j][same].mean() > L[i, j][~same].mean()
    labels = PM.resolve(L, PM.must_link_groups(s), threshold=0.0, min_size=5)
    assert labels.shape == (s.n,) and labels.min() == 0


def test_must_link_groups_are_the_personal_devices_with_enough_sessions_numbered_without_gaps():
    rows = ([_vector(8.0, 1, "mobile", {"news": 1.0})] * 2 + [_vector(20.0, 1, "tv", {"drama": 1.0})] * 3
            + [_vector(21.0, 2, "tablet", {"drama": 1.0})] * 5 + [_vector(22.0, 3, "desktop", {"news": 1.0})] * 6)
    ids = np.array(["phone"] * 2 + ["tv"] * 3 + ["tablet"] * 5 + ["desk"] * 6)
    g = PM.must_link_groups(PM.sessions_of(np.array(rows), ids))
    # the phone has too few sessions and the TV carries no identity; the other two are 0 and 1
    assert g[:5].tolist() == [-1] * 5
    assert set(g[5:10]) == {g[5]} and set(g[10:]) == {g[10]} and {g[5], g[10]} == {0, 1}
    L = np.zeros((16, 16))
    X = PM.second_order(L, g, np.array([5, 0]), np.array([10, 1]))
    assert np.isfinite(X).all() and X[:, PM.STACK_FEATURES.index("groups")].tolist() == [2.0, 2.0]


def test_learned_linkage_asks_only_uncertain_merges_and_learns_from_the_truth():
    L = _blocks([5, 5, 5], within=1.0, across=0.5)     # every merge is uncertain (within +-SURE)
    truth = np.repeat([0, 1, 2], 5)
    none = np.full(15, -1)
    rows: list = []
    by_truth = PM.learned_linkage(L, none, None, truth=truth, record=rows)
    assert np.unique(by_truth).size == 3 and all(np.unique(by_truth[a:a + 5]).size == 1 for a in (0, 5, 10))
    assert rows and all(len(x) == len(PM.MERGE_FEATURES) for x, _ in rows)
    assert {ok for _, ok in rows} == {True, False}
    assert np.unique(PM.learned_linkage(L, none, lambda x: False)).size == 15    # refuses every asked merge
    assert np.unique(PM.learned_linkage(L, none, lambda x: True)).size == 1
    # sure merges are not asked: a clear block structure resolves without the rule
    sure = _blocks([5, 5], within=PM.SURE + 1, across=-PM.SURE - 1)
    assert np.unique(PM.learned_linkage(sure, np.full(10, -1), lambda x: 1 / 0)).size == 2
