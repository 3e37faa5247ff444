"""bench/world_spread.py: a fitted person's spread judged against its world's persons
(docs/clustering.md 4o)."""

import numpy as np
import pytest

from bench import world_spread as WS
from services.clustering.domain import features as F


def _blobs(n: int, gap: float, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1], [n, n])
    Z = rng.normal(size=(2 * n, dim))
    Z[truth == 1, 0] += gap
    return Z, truth


def test_spread_features_ignore_device_type_and_lengths_but_see_hours_and_genres():
    rng = np.random.default_rng(1)
    X = rng.random((6, F.FEATURE_DIM))
    base = WS.spread_features(X)
    Y = X.copy()
    Y[:, F.DEVICE] = rng.random((6, F.DEVICE.stop - F.DEVICE.start))
    Y[:, F.LOG_MINUTES:] = rng.random((6, F.FEATURE_DIM - F.LOG_MINUTES))
    assert np.array_equal(WS.spread_features(Y), base)
    G = X.copy()
    G[:, F.GENRE.start] += 1.0
    H = X.copy()
    H[:, F.HOUR] = H[:, F.HOUR][:, ::-1]
    assert not np.array_equal(WS.spread_features(G), base)
    assert not np.array_equal(WS.spread_features(H), base)


def test_two_means_finds_two_blobs():
    Z, truth = _blobs(30, gap=8.0)
    labels, w = WS.two_means(Z)
    agree = (labels == truth).mean()
    assert max(agree, 1 - agree) == 1.0
    assert w < ((Z - Z.mean(axis=0)) ** 2).sum() / 3


def test_two_means_keeps_a_device_group_whole():
    Z, truth = _blobs(30, gap=8.0)
    group = np.full(60, -1)
    group[25:35] = 0           # one device's sessions straddle the two blobs
    labels, _ = WS.two_means(Z, group)
    assert np.unique(labels[25:35]).size == 1
    unconstrained, _ = WS.two_means(Z)
    assert np.unique(unconstrained[25:35]).size == 2


def test_two_means_of_a_single_block_is_one_part():
    Z, _ = _blobs(5, gap=8.0)
    labels, w = WS.two_means(Z, np.zeros(10, dtype=int))
    assert labels.tolist() == [0] * 10 and w == pytest.approx(((Z - Z.mean(axis=0)) ** 2).sum())


def test_split_gain_is_high_for_two_people_and_low_for_one():
    two, _ = _blobs(40, gap=8.0)
    one, _ = _blobs(40, gap=0.0)
    g2, parts = WS.split_gain(two)
    g1, _ = WS.split_gain(one)
    assert g2 > 0.6 and g1 < 0.4 and parts.shape == (80,)


def test_world_z_corrects_for_size_and_flags_the_outlier():
    n = np.array([20, 40, 80, 160, 20, 40, 80, 160], dtype=float)
    gain = 0.2 + 1.0 / np.sqrt(n) + np.array([0.01, -0.01, 0.005, -0.005, -0.01, 0.01, 0.0, 0.0])
    z = WS.world_z(gain, n, np.array([0.2 + 1 / np.sqrt(20), 0.5 + 1 / np.sqrt(160)]), np.array([20.0, 160.0]))
    assert abs(z[0]) < 1.0          # a small person's larger gain is what its size predicts
    assert z[1] > 10.0              # a large person splitting far more cleanly than the world's
    assert WS.world_z(gain[:2], n[:2], np.array([0.9]), np.array([20.0])).tolist() == [0.0]


def test_split_outliers_splits_only_far_persons_with_both_parts_large_enough():
    labels = np.repeat([0, 1, 2], [40, 40, 40])
    parts = np.repeat([0, 1], [20, 20])
    people = [WS.Person(0, 0, np.arange(0, 40), 0.5, parts, z=3.0),
              WS.Person(0, 1, np.arange(40, 80), 0.5, parts, z=1.0),                      # not far enough
              WS.Person(0, 2, np.arange(80, 120), 0.5, np.repeat([0, 1], [35, 5]), z=5.0)]  # a part too small
    out = WS.split_outliers(labels, people, min_z=2.0, min_size=10)
    assert np.unique(out).size == 4
    assert np.unique(out[:20]).size == 1 and out[0] != out[20]
    assert np.array_equal(out[40:], np.repeat([out[40], out[80]], [40, 40]))
    assert np.array_equal(WS.split_outliers(labels, people, min_z=6.0, min_size=10), labels)


def test_spread_views_are_the_hours_and_the_taste_columns():
    X = np.random.default_rng(2).random((5, F.FEATURE_DIM))
    hours, taste, both = (WS.spread_features(X, v) for v in ("hours", "taste", "all"))
    assert np.array_equal(both, np.hstack((hours, taste)))
    assert taste.shape[1] == F.GENRE.stop - F.GENRE.start + 2
    with pytest.raises(ValueError, match="view"):
        WS.spread_features(X, "device")


def _household(world: str, n: int, device_type: str, seed: int) -> WS.Household:
    rng = np.random.default_rng(seed)
    X = rng.random((n, F.FEATURE_DIM)).astype(np.float32)
    X[:, F.DEVICE] = 0.0
    X[:, F.DEVICE.start + F.DEVICE_TYPES.index(device_type)] = 1.0
    slots = np.zeros(n, dtype=np.int64)
    group = np.zeros(n, dtype=np.int64) if device_type == "mobile" else np.full(n, -1)
    return WS.Household(f"h{seed}", world, np.zeros(n, dtype=np.int64), X, group, slots,
                        {"hearth_batch": np.repeat([0, 1], [n // 2, n - n // 2])})


def test_a_world_without_personal_devices_has_no_device_reference_and_splits_nobody():
    hs = [_household("w", 60, "tv", s) for s in range(4)]
    people = WS.world_people(hs, "devices", min_sessions=20)
    flat = [p for pp in people for p in pp]
    assert len(flat) == 8 and all(p.z == 0.0 and p.references == 0 for p in flat)
    assert all(np.array_equal(WS.split_outliers(h.answers["hearth_batch"], pp, 0.5, 10), h.answers["hearth_batch"])
               for h, pp in zip(hs, people))
    phones = [_household("w", 60, "mobile", s) for s in range(4)]
    flat = [p for pp in WS.world_people(phones, "devices", min_sessions=20) for p in pp]
    assert all(p.references == 4 for p in flat)        # one reference set per phone with >= 20 sessions
