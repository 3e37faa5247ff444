import numpy as np
import pytest

from services.clustering.domain import features as F
from services.clustering.domain.simulator import (
    DRIFT_TYPES, simulate_household, simulate_population,
)


def test_same_seed_same_population_and_prefix_stable():
    a = simulate_population(4, seed=11)
    b = simulate_population(6, seed=11)
    for ha, hb in zip(a, b):  # household i depends only on (seed, i)
        np.testing.assert_array_equal(ha.features, hb.features)
        np.testing.assert_array_equal(ha.person, hb.person)
    c = simulate_population(4, seed=12)
    assert any(x.n_sessions != y.n_sessions or not np.array_equal(x.features, y.features) for x, y in zip(a, c))


def test_ground_truth_shapes_and_ranges():
    for h in simulate_population(8, seed=3):
        n = h.n_sessions
        assert h.features.shape == (n, F.FEATURE_DIM) and h.features.dtype == np.float32
        for arr in (h.person, h.timestamps, h.binge, h.nested, h.travel, h.co_viewer):
            assert arr.shape == (n,)
        assert np.all(np.diff(h.timestamps) >= 0)
        # persons are dense 0..n_persons-1 and one persona per person
        assert set(np.unique(h.person)) == set(range(h.n_persons)) and len(h.personas) == h.n_persons
        assert 1 <= h.n_persons <= 7  # 6 + a joiner
        # binge tag agrees with the binge feature; nested sessions have a co-viewer
        np.testing.assert_array_equal(h.binge, h.features[:, F.BINGE] == 1.0)
        assert np.all(h.co_viewer[h.nested] >= 0) and np.all(h.co_viewer[~h.nested] == -1)
        assert np.all(h.features[h.nested][:, F.DEVICE.start + F.DEVICE_TYPES.index("tv")] == 1.0)


@pytest.mark.parametrize("drift_type", DRIFT_TYPES)
def test_drift_event_points_at_first_session_after_change(drift_type):
    h = simulate_household(np.random.default_rng(5), drift_type=drift_type, n_persons=3)
    assert not h.stable and h.drift[0].type == drift_type
    d = h.drift[0]
    assert h.timestamps[d.session_index] >= d.ts
    assert d.session_index == 0 or h.timestamps[d.session_index - 1] < d.ts


def test_stable_households_have_no_drift_and_small_accounts_are_small():
    assert all(h.stable for h in simulate_population(5, seed=1, drift_fraction=0.0))
    small = simulate_population(30, seed=2, small_accounts=True)
    assert all(3 <= h.n_sessions <= 9 for h in small)


def test_difficulty_raises_overlap():
    # Mean distance between persons' average feature vectors shrinks with difficulty.
    def spread(level):
        out = []
        for h in simulate_population(15, seed=9, difficulty=level, drift_fraction=0.0):
            if h.n_persons > 1:
                means = np.array([h.features[h.person == p].mean(axis=0) for p in range(h.n_persons)])
                out.append(np.mean(np.linalg.norm(means[:, None] - means[None], axis=2)))
        return np.mean(out)
    assert spread(0.0) > spread(1.0)


def test_bad_arguments_raise_value_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="difficulty"):
        simulate_household(rng, difficulty=1.5)
    with pytest.raises(ValueError, match="drift_type"):
        simulate_household(rng, drift_type="weird")
    with pytest.raises(ValueError, match="n_persons"):
        simulate_household(rng, n_persons=0)
    with pytest.raises(ValueError, match="n_households"):
        simulate_population(-1)
