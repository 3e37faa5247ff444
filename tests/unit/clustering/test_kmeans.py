import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.clustering.domain.kmeans import IncrementalKMeans, fit_select_k_kmeans, kmeans_plus_plus


def blobs(rng, centers, n=50, sd=0.1):
    X = np.vstack([c + sd * rng.normal(size=(n, len(c))) for c in centers])
    return X, np.repeat(np.arange(len(centers)), n)


def test_kmeans_plus_plus_spreads_seeds_over_separated_clusters():
    rng = np.random.default_rng(0)
    X, y = blobs(rng, [(0, 0), (10, 0), (0, 10)])
    hits = 0
    for s in range(20):
        C = kmeans_plus_plus(X, 3, np.random.default_rng(s))
        owner = np.linalg.norm(C[:, None] - np.array([(0, 0), (10, 0), (0, 10)])[None], axis=2).argmin(1)
        hits += len(set(owner)) == 3
    # D^2 sampling picks a seed in each far cluster with probability close to 1.
    assert hits >= 19


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 1000))
def test_kmeans_plus_plus_returns_rows_of_x(k, seed):
    X = np.random.default_rng(seed).normal(size=(12, 3))
    C = kmeans_plus_plus(X, k, np.random.default_rng(seed))
    assert C.shape == (k, 3)
    assert all(np.any(np.all(X == c, axis=1)) for c in C)


def test_incremental_update_is_learning_rate_one_over_n_plus_one():
    km = IncrementalKMeans(np.array([[0.0, 0.0], [10.0, 10.0]]), np.array([4.0, 1.0]), np.ones(2), batch_size=1)
    km.partial_fit(np.array([[5.0, 0.0]]))
    np.testing.assert_allclose(km.centroids[0], [1.0, 0.0])  # 0 + (5 - 0)/(4 + 1)
    assert km.counts.tolist() == [5.0, 1.0]
    km.partial_fit(np.array([[12.0, 12.0]]))
    np.testing.assert_allclose(km.centroids[1], [11.0, 11.0])  # 10 + (12 - 10)/2


def test_micro_batch_equals_sequential_rule_and_waits_for_batch():
    rng = np.random.default_rng(1)
    C0 = np.array([[0.0, 0.0], [5.0, 5.0]])
    pts = rng.normal(size=(10, 2)) * 0.3 + np.where(rng.random((10, 1)) < 0.5, 0.0, 5.0)
    km = IncrementalKMeans(C0.copy(), np.array([3.0, 2.0]), np.ones(2), batch_size=10)
    assert km.partial_fit(pts[:9]) == 0 and np.array_equal(km.centroids, C0)  # buffered
    assert km.partial_fit(pts[9:]) == 10
    # Reference: assign all with the batch-start centroids, then c += (x - c)/(n + 1) in turn.
    C, n = C0.copy(), np.array([3.0, 2.0])
    labels = np.linalg.norm(pts[:, None] - C0[None], axis=2).argmin(1)
    for x, j in zip(pts, labels):
        C[j] += (x - C[j]) / (n[j] + 1)
        n[j] += 1
    np.testing.assert_allclose(km.centroids, C, atol=1e-12)


def test_probabilities_sum_to_one_and_prefer_nearest():
    rng = np.random.default_rng(2)
    X, y = blobs(rng, [(0, 0), (3, 3)])
    km = IncrementalKMeans.fit(X, 2, seed=0)
    P = km.predict_proba(X)
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert np.array_equal(P.argmax(1), km.predict(X))


def test_select_k_finds_three_blobs_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    X, _ = blobs(rng, [(0, 0), (6, 0), (0, 6)], n=40, sd=0.5)
    assert fit_select_k_kmeans(X, 6).n_components == 3
    with pytest.raises(ValueError, match="k must be"):
        kmeans_plus_plus(X, 0, rng)
    with pytest.raises(ValueError, match="NaN"):
        IncrementalKMeans.fit(np.array([[np.nan, 1.0]]), 1)
