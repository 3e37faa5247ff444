import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from services.clustering.domain import gmm
from services.clustering.domain.simulator import simulate_population


def blobs(rng, k, n=60, dim=3, sep=8.0):
    centers = rng.normal(size=(k, dim)) * sep
    X = np.vstack([c + rng.normal(size=(n, dim)) for c in centers])
    return X, np.repeat(np.arange(k), n)


@pytest.fixture(scope="module")
def household():
    return next(h for h in simulate_population(10, seed=4, drift_fraction=0.0) if h.n_persons >= 3)


@pytest.mark.parametrize("family", [gmm.GaussianFull(reg=1e-3), gmm.GaussianDiag(), gmm.TypedSession()])
def test_em_log_likelihood_never_decreases(family, household):
    X = household.features if isinstance(family, gmm.TypedSession) else household.features[:, :8]
    _, trace = gmm.fit_em(X, 3, family, np.random.default_rng(0), max_iter=60, tol=0.0)
    diffs = np.diff(trace)
    # Gaussian M-steps maximise exactly; the typed family smooths counts (Dirichlet
    # pseudo-counts, neighbouring hour bins), a MAP-style step that may cost a hair of
    # plain likelihood near convergence: allow 1e-5 relative there.
    tol = 1e-9 if not isinstance(family, gmm.TypedSession) else 1e-5
    assert len(trace) > 3 and np.all(diffs >= -tol * np.abs(trace[:-1]).max())
    assert trace[-1] > trace[0]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_bic_picks_true_k_on_well_separated_data(k):
    rng = np.random.default_rng(10 + k)
    X, _ = blobs(rng, k)
    sel = gmm.fit_select_k(X, 6, gmm.GaussianFull(reg=1e-3), seed=0, n_init=3)
    assert sel.k == k
    assert min(sel.scores, key=sel.scores.get) == k


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.6))
@example(seed=2023, share=0.5)  # an ill-conditioned component: W ~ 1e5
def test_unlearning_equals_model_built_without_the_sessions(seed, share):
    rng = np.random.default_rng(seed)
    X, _ = blobs(rng, 3, n=30)
    for family in (gmm.GaussianFull(reg=1e-3), gmm.GaussianDiag()):
        model, _ = gmm.fit_em(X, 3, family, np.random.default_rng(seed))
        model.partial_fit(X[:7] + 0.1, keys=np.arange(1000, 1007))  # incremental sessions too
        all_X = np.vstack((X, X[:7] + 0.1))
        keys = model.ledger_keys.copy()
        gone = rng.random(keys.size) < share
        gone[0] = True
        model.remove_sessions(keys[gone], all_X[gone])
        kept_R = model.ledger_resp
        rebuilt = gmm.Mixture.from_responsibilities(family, all_X[~gone], kept_R, keys[~gone])
        # Exact unlearning is a claim about the sufficient statistics: they equal the
        # rebuilt model's to round-off.
        np.testing.assert_allclose(model.stats, rebuilt.stats, atol=1e-9, rtol=0)
        # The parameters are re-derived from those statistics (nothing stale is kept)...
        np.testing.assert_array_equal(model.W, family.weights(model.stats))
        np.testing.assert_allclose(model.log_weights, rebuilt.log_weights, atol=1e-9)
        # ...and match the rebuilt ones up to the conditioning of the covariance inverse:
        # with few sessions left in a component (seed=2023, share=0.5) W reaches 1e5 and
        # the 1e-13 round-off of the sums becomes 1e-4 relative, so the bound scales with
        # how strongly W reacts to a relative 1e-12 change of the statistics (measured).
        signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(8, *rebuilt.stats.shape))
        sensitivity = max(np.abs(family.weights(rebuilt.stats * (1 + 1e-12 * s)) - rebuilt.W).max()
                          for s in signs) / 1e-12
        np.testing.assert_allclose(model.W, rebuilt.W, rtol=0,
                                   atol=1e-9 * np.abs(rebuilt.W).max() + 1e-10 * sensitivity)


def test_unlearning_typed_family_on_a_household(household):
    X = household.features
    sel = gmm.fit_select_k(X, 6, gmm.TypedSession(), seed=0)
    m = sel.model
    keys = m.ledger_keys.copy()
    gone = np.zeros(keys.size, dtype=bool)
    gone[::3] = True
    m.unlearn(keys[gone], X[gone])
    rebuilt = gmm.Mixture.from_responsibilities(m.family, X[~gone], m.ledger_resp, keys[~gone])
    np.testing.assert_allclose(m.W, rebuilt.W, atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(m.log_weights, rebuilt.log_weights, atol=1e-9)
    with pytest.raises(KeyError):
        m.remove_sessions(keys[:1], X[:1])  # already removed


def test_removing_every_session_of_a_component_empties_it():
    rng = np.random.default_rng(0)
    X, y = blobs(rng, 2)
    m, _ = gmm.fit_em(X, 2, gmm.GaussianDiag(), rng)
    comp = m.predict_proba(X).argmax(1)
    owned = comp == comp[0]
    m.remove_sessions(m.ledger_keys[owned], X[owned])
    # What is left of the component is the soft share of the other blob's sessions.
    assert m.counts[comp[0]] < 1.0 and m.counts.sum() == pytest.approx((~owned).sum())
    m.remove_sessions(m.ledger_keys, X[~owned])
    assert m.alive.sum() == 0 and np.all(np.isneginf(m.log_weights))


def test_singular_covariance_raises_specific_error():
    X = np.zeros((20, 3))
    X[:, 0] = np.arange(20)  # two constant columns: covariance is singular without reg
    with pytest.raises(gmm.MixtureNumericalError):
        gmm.fit_em(X, 2, gmm.GaussianFull(reg=0.0), np.random.default_rng(0))
    m, _ = gmm.fit_em(X, 1, gmm.GaussianFull(reg=1e-3), np.random.default_rng(0))
    m.stats[0, 1] = np.nan
    with pytest.raises(gmm.MixtureNumericalError):
        m.refresh()


def test_labels_are_clamped_and_bad_input_rejected():
    rng = np.random.default_rng(1)
    X, y = blobs(rng, 2)
    clamp = np.full(X.shape[0], -1)
    clamp[0] = 1
    m, _ = gmm.fit_em(X, 2, gmm.GaussianDiag(), rng, clamp=clamp)
    np.testing.assert_array_equal(m.ledger_resp[0], [0.0, 1.0])
    with pytest.raises(ValueError, match="X"):
        gmm.fit_select_k(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="criterion"):
        gmm.fit_select_k(X, criterion="aic")
    with pytest.raises(ValueError, match="k must"):
        gmm.fit_em(X, 0, gmm.GaussianDiag(), rng)


def test_effective_parameters_count_only_used_categories():
    fam = gmm.TypedSession()
    X = simulate_population(1, seed=5)[0].features.astype(np.float64)
    stats = np.ones((1, X.shape[0])) @ fam.phi(X)
    full = fam.params_per_component(X.shape[1])
    eff = fam.effective_params(stats)[0]
    assert 11 <= eff <= full
    # one session: a single category per block is used, so only the binge rate and
    # the Gaussians (mean and variance of 5 columns) are estimated
    one = fam.phi(X[:1])
    assert fam.effective_params(one)[0] == 11 + (np.count_nonzero(X[0, 10:29] >= 0.5) > 1)


def test_criterion_names_are_checked_and_bic_eff_is_not_above_bic(household):
    X = household.features
    sel = gmm.fit_select_k(X, 3, criterion="bic_eff")
    assert sel.criterion == "bic_eff" and set(sel.scores) == {1, 2, 3}
    assert sel.model.bic_effective(X) <= sel.model.bic(X) + 1e-9
    with pytest.raises(ValueError, match="criterion"):
        gmm.fit_select_k(X, 3, criterion="aic")


@pytest.fixture(scope="module")
def pooled():
    return gmm.TypedSession(binge_lengths="pooled")


def test_pooled_binge_lengths_do_not_change_who_watched_a_binge(household, pooled):
    # The lengths of a binge session follow one household-wide Gaussian, identical for
    # every component: changing them must not move the posterior (it does under the
    # joint family, where a component's length Gaussian judges them).
    X = household.features.astype(np.float64)
    binge = np.flatnonzero(X[:, 32] > 0.5)
    assert binge.size >= 2
    m, _ = gmm.fit_em(X, 3, pooled, np.random.default_rng(0))
    joint, _ = gmm.fit_em(X, 3, gmm.TypedSession(), np.random.default_rng(0))
    Y = X[binge].copy()
    Y[:, [31, 33]] += np.array([2.0, 1.0])  # much longer binges
    np.testing.assert_allclose(m.predict_proba(Y), m.predict_proba(X[binge]), atol=1e-9)
    assert not np.allclose(joint.predict_proba(Y), joint.predict_proba(X[binge]), atol=1e-3)
    # and it is a density: the binge block is not free likelihood
    assert np.all(np.isfinite(m.log_joint(X)))


def test_pooled_family_unlearning_is_exact(household, pooled):
    X = household.features.astype(np.float64)
    m, _ = gmm.fit_em(X, 3, pooled, np.random.default_rng(1))
    keep = np.ones(X.shape[0], dtype=bool)
    keep[::4] = False
    rest = gmm.Mixture.from_responsibilities(pooled, X[keep], m.ledger_resp[keep])
    m.remove_sessions(m.ledger_keys[~keep], X[~keep])
    np.testing.assert_allclose(m.stats, rest.stats, atol=1e-9)
    np.testing.assert_allclose(m.W, rest.W, atol=1e-9 * np.abs(rest.W).max())


def test_pooled_family_em_is_monotone_up_to_smoothing(household, pooled):
    _, trace = gmm.fit_em(household.features, 3, pooled, np.random.default_rng(0), max_iter=60, tol=0.0)
    assert trace[-1] > trace[0]
    assert np.all(np.diff(trace) >= -1e-5 * np.abs(trace).max())


def test_typed_family_options_are_checked():
    with pytest.raises(ValueError, match="binge_lengths"):
        gmm.TypedSession(binge_lengths="separate")
    with pytest.raises(ValueError, match="rhythm"):
        gmm.TypedSession(rhythm="hours")


def test_em_iterations_continue_fit_em_exactly_and_keep_the_clamp():
    """em_iterations(m, X, j) from a model fit_em stopped after i iterations is the model
    fit_em stops after i + j (the same E- and M-steps); clamped sessions keep their
    component; the ledger holds the last responsibilities, so unlearning stays exact;
    the model it started from is left as it was."""
    rng = np.random.default_rng(3)
    X, _ = blobs(rng, 3, sep=2.0)
    clamp = np.full(X.shape[0], -1)
    clamp[:5] = 2
    fam = gmm.GaussianDiag()
    keys = np.arange(X.shape[0])
    start, _ = gmm.fit_em(X, 3, fam, np.random.default_rng(0), clamp=clamp, max_iter=2, tol=0.0, keys=keys)
    before = start.stats.copy()
    more = gmm.em_iterations(start, X, 3, clamp=clamp, keys=keys)
    ref, _ = gmm.fit_em(X, 3, fam, np.random.default_rng(0), clamp=clamp, max_iter=5, tol=0.0, keys=keys)
    np.testing.assert_allclose(more.stats, ref.stats, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(start.stats, before)
    assert np.abs(more.stats - before).max() > 1e-6   # the iterations moved the model
    np.testing.assert_array_equal(more.ledger_resp[:5], np.tile([0.0, 0.0, 1.0], (5, 1)))
    more.remove_sessions(keys[10:], X[10:])
    np.testing.assert_allclose(more.stats, more.ledger_resp.T @ fam.phi(X[:10]), atol=1e-9)
    assert gmm.em_iterations(start, X, 0) is start


def test_em_iterations_raise_the_numerical_error_of_a_broken_model():
    rng = np.random.default_rng(1)
    X, _ = blobs(rng, 2)
    m, _ = gmm.fit_em(X, 2, gmm.GaussianDiag(), rng)
    m.W[0, 0] = np.nan
    with pytest.raises(gmm.MixtureNumericalError):
        gmm.em_iterations(m, X, 1)
