"""The mixture fits (gmm.fit_select_k / fit_em: the drift detector's reference mixture and
the household model's own fits) without scipy's logsumexp dispatch, with the sessions'
phi and seeding features computed once per selection and no key check of keys the fit
makes itself (session 26, docs/clustering.md "A fold's cost, and the detector's mixture
fit"): the same fits to the bit
as main's (d3fbe5f) — main's path is rebuilt below by putting scipy's logsumexp back and
computing phi and the seeding in every fit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp

from services.clustering.domain import drift as D
from services.clustering.domain import gmm
from services.clustering.domain.simulator import DRIFT_TYPES, simulate_household

_values = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from((0.0, -0.0, 1.0, -745.0, 709.0, 1e308, -1e308, np.inf, -np.inf, np.nan)))



def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(
        np.where(nan, 0.0, a).view(np.int64), np.where(nan, 0.0, b).view(np.int64))


@settings(max_examples=400, deadline=None)
@given(a=hnp.arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 7)), elements=_values),
       ties=st.booleans())
@example(a=np.array([[1e308, -1e308]]), ties=False)   # scipy's a - a_max overflows to -inf (exp: 0)
def test_the_row_logsumexp_is_scipy_s_to_the_bit(a, ties):
    if ties and a.shape[1] > 1:
        a[:, -1] = a[:, 0]   # a row's maximum twice
    # The values drawn include +-1e308, where scipy's own a - a_max overflows to -inf on the
    # way to the right answer (its exp is 0) and numpy warns (RuntimeWarning, the run's one
    # warning in session 30); gmm.logsumexp_rows takes the same steps under np.errstate. The
    # bits are what this test compares, not the floating-point flags the reference raises.
    with np.errstate(over="ignore"):
        want = logsumexp(a, axis=1, keepdims=True)
    got = gmm.logsumexp_rows(a)
    assert _same_bits(got, want), (a, got, want)


def _main_path(monkeypatch) -> None:
    """gmm as main ran it: scipy's logsumexp, phi and the seeding computed by every fit."""
    monkeypatch.setattr(gmm, "logsumexp_rows", lambda a: logsumexp(a, axis=1, keepdims=True))
    fit_em = gmm.fit_em
    monkeypatch.setattr(gmm, "fit_em", lambda *a, phi=None, seeding=None, **kw: fit_em(*a, **kw))


def _same_mixture(a: gmm.Mixture, b: gmm.Mixture) -> None:
    assert np.array_equal(a.stats, b.stats)
    assert np.array_equal(a.W, b.W)
    assert np.array_equal(a.log_weights, b.log_weights)
    assert np.array_equal(a.ledger_keys, b.ledger_keys)
    assert np.array_equal(a.ledger_resp, b.ledger_resp)


def _households():
    return st.tuples(st.integers(0, 10_000), st.sampled_from((None, *DRIFT_TYPES)), st.integers(20, 70))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=_households(), k_max=st.integers(1, 6), labelled=st.booleans(), keyed=st.booleans())
def test_fit_select_k_is_main_s_fit_to_the_bit(monkeypatch, case, k_max, labelled, keyed):
    seed, drift, days = case
    h = simulate_household(np.random.default_rng(seed), difficulty=0.4, drift_type=drift, days=days)
    X = h.features.astype(np.float64)
    rng = np.random.default_rng(seed)
    clamp = np.where(rng.random(len(X)) < 0.1, rng.integers(0, k_max, len(X)), -1) if labelled else None
    keys = rng.permutation(10 * len(X))[:len(X)] if keyed else None
    extra = [rng.integers(0, 2, len(X))] if k_max >= 2 else None

    def select():
        return gmm.fit_select_k(X, k_max, seed=seed, clamp=clamp, keys=keys, extra_inits=extra,
                                k_min=int(clamp.max()) + 1 if labelled else 1)

    new = select()
    with monkeypatch.context() as m:
        _main_path(m)
        old = select()
    assert new.k == old.k and new.scores == old.scores
    _same_mixture(new.model, old.model)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=_households(), ref_share=st.floats(0.4, 0.8))
def test_the_drift_detector_is_built_as_main_built_it_to_the_bit(monkeypatch, case, ref_share):
    seed, drift, days = case
    h = simulate_household(np.random.default_rng(seed), difficulty=0.3, drift_type=drift, days=max(days, 40))
    X, ts = h.features.astype(np.float64), np.asarray(h.timestamps, dtype=np.float64)
    ref = max(30, int(ref_share * len(X)))
    new = D.build_detector(X[:ref], seed=seed)
    with monkeypatch.context() as m:
        _main_path(m)
        old = D.build_detector(X[:ref], seed=seed)
    _same_mixture(new.reference, old.reference)
    assert (new.mu, new.sigma, new.agree_mu, new.agree_sigma) == (old.mu, old.sigma, old.agree_mu, old.agree_sigma)
    assert new.mmd.null() == old.mmd.null()
    assert [vars(e) for e in new.update(X[ref:], ts[ref:])] == [vars(e) for e in old.update(X[ref:], ts[ref:])]
    assert new.maxima() == old.maxima()


def test_fit_em_with_the_callers_phi_and_seeding_is_the_same_fit():
    h = simulate_household(np.random.default_rng(7), difficulty=0.4, days=60)
    X = h.features.astype(np.float64)
    family = gmm.TypedSession()
    a, trace_a = gmm.fit_em(X, 3, family, np.random.default_rng(1))
    b, trace_b = gmm.fit_em(X, 3, family, np.random.default_rng(1), phi=family.phi(X),
                            seeding=gmm._seeding(family, X))
    assert trace_a == trace_b
    _same_mixture(a, b)


def test_a_mixture_still_refuses_keys_it_already_holds():
    h = simulate_household(np.random.default_rng(3), difficulty=0.4, days=30)
    X = h.features.astype(np.float64)
    m, _ = gmm.fit_em(X, 2, gmm.TypedSession(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unique"):
        m._ledger_add(m.ledger_keys[:2], np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="unique"):
        m._ledger_add(np.array([10**9, 10**9]), np.full((2, 2), 0.5))
    m._ledger_add(None, np.full((2, 2), 0.5))   # new keys after the largest
    assert np.unique(m.ledger_keys).size == m.ledger_keys.size
