"""bench/undercount_evidence.py (calib27, session 27): the evidence that a batch fit
under-counts its household, and the re-reading of a fit's answers through another shift of
the ``fitted`` confidence map. Pure pieces only; the figures are in docs/benchmarks.md."""

from __future__ import annotations

import numpy as np
import pytest

from bench import undercount_evidence as U
from bench import worlds as W
from services.clustering.domain import features as F
from services.clustering.domain import model as M


def _sessions(hours: list[float], device: str = "tv", genre: str = "drama") -> np.ndarray:
    X = np.zeros((len(hours), F.FEATURE_DIM))
    angle = 2 * np.pi * np.asarray(hours) / 24.0
    X[:, F.HOUR.start], X[:, F.HOUR.start + 1] = np.sin(angle), np.cos(angle)
    X[:, F.DEVICE.start + F.DEVICE_TYPES.index(device)] = 1.0
    X[:, F.GENRE.start + F.GENRES.index(genre)] = 1.0
    return X


def test_hour_spread_is_zero_for_one_hour_and_grows_when_two_peoples_hours_are_merged():
    evening = _sessions([21.0] * 10)
    morning = _sessions([9.0] * 10)
    X = np.vstack((evening, morning))
    assert U.hour_spread(evening, np.zeros(10)) == pytest.approx(0.0, abs=1e-12)
    # two persons, each at one hour: no spread; the same sessions as one person: opposite
    # hours cancel, the mean hour vector has length 0
    apart = U.hour_spread(X, np.r_[np.zeros(10), np.ones(10)])
    merged = U.hour_spread(X, np.zeros(20))
    assert apart == pytest.approx(0.0, abs=1e-12)
    assert merged == pytest.approx(1.0)


def test_taste_spread_is_zero_for_one_taste_and_positive_for_two_merged():
    X = np.vstack((_sessions([20.0] * 4, genre="drama"), _sessions([20.0] * 4, genre="kids")))
    assert U.taste_spread(X, np.r_[np.zeros(4), np.ones(4)]) == pytest.approx(0.0, abs=1e-12)
    # one person half drama, half kids: every session 0.5 off in two slots
    assert U.taste_spread(X, np.zeros(8)) == pytest.approx(0.5)


def test_spreads_refuse_an_empty_household():
    with pytest.raises(ValueError, match="no sessions"):
        U.hour_spread(np.zeros((0, F.FEATURE_DIM)), np.zeros(0))
    with pytest.raises(ValueError, match="no sessions"):
        U.taste_spread(np.zeros((0, F.FEATURE_DIM)), np.zeros(0))


def test_personal_excess_counts_personal_devices_beyond_the_persons_and_is_capped():
    phones = np.vstack([_sessions([20.0] * 6, device="mobile") for _ in range(5)])
    slots = np.repeat(np.arange(5), 6)
    assert U.personal_excess(phones, slots, 2) == 3.0
    assert U.personal_excess(phones, slots, 1) == U.PERSONAL_EXCESS_MAX
    assert U.personal_excess(phones, slots, 5) == 0.0
    # a TV is not a personal device, nor a phone with fewer than 5 sessions
    tv = _sessions([20.0] * 6)
    assert U.personal_excess(np.vstack((tv, phones[:4])), np.r_[np.zeros(6), np.ones(4)].astype(int), 0) == 0.0


def test_auc_separates_and_ties_count_half():
    assert U.auc(np.array([3.0, 4.0, 1.0, 2.0]), np.array([1, 1, 0, 0])) == 1.0
    assert U.auc(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 0, 0])) == 0.0
    assert U.auc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5
    assert U.auc(np.array([1.0, 2.0]), np.array([1, 1])) == 0.5


def test_reread_through_the_shipped_shift_is_the_service_answer_and_never_changes_who():
    h = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=2)[1]
    m = M.HouseholdModel().fit(h.features, device_ids=h.device_id)
    a = U._answers(m, h, labelled=False)
    assert a.shifted and a.persons == 2
    np.testing.assert_array_equal(U.reread(a, M.DEVICE_CONFIDENCE_SHIFT["fitted"], ()), a.served)
    # a candidate read with a strong negative weight: lower confidence, the same persons
    intercept, coef = M.DEVICE_CONFIDENCE_SHIFT["fitted"]
    lower = U.reread(a, (intercept, (*coef, -2.0)), ("hour_spread",))
    np.testing.assert_array_equal(lower.argmax(axis=1), a.served.argmax(axis=1))
    assert lower.max(axis=1).mean() < a.served.max(axis=1).mean() - 0.01
    np.testing.assert_allclose(lower.sum(axis=1), 1.0, atol=1e-5)
    assert U.design(a, ("hour_spread",)).shape == (h.n_sessions, 3)


def test_split_gain_is_large_when_two_groups_are_answered_as_one_person():
    from services.clustering.domain.gmm import GaussianDiag
    rng = np.random.default_rng(3)
    X = np.vstack((rng.normal(0.0, 0.3, (60, 2)), rng.normal(4.0, 0.3, (60, 2))))
    X = X[rng.permutation(X.shape[0])]
    truth = (X[:, 0] > 2.0).astype(int)
    merged = U.split_gain(X, np.zeros(X.shape[0], dtype=int), GaussianDiag())
    counted = U.split_gain(X, truth, GaussianDiag())
    assert merged > 1.0            # a second component explains the held-out sessions far better
    assert counted < merged - 1.0  # splitting a real person gains little out of sample


def test_split_gain_is_zero_when_no_person_has_enough_sessions_and_refuses_one_session():
    from services.clustering.domain.gmm import GaussianDiag
    X = np.random.default_rng(0).normal(size=(12, 2))
    assert U.split_gain(X, np.arange(12) % 4, GaussianDiag()) == 0.0
    with pytest.raises(ValueError, match="fewer than two sessions"):
        U.split_gain(X[:1], np.zeros(1), GaussianDiag())


def test_a_labelled_fit_carries_its_unlabelled_fits_evidence_only_where_the_shift_answered_for_it():
    def fit(persons, shifted, gain):
        P = np.full((3, persons), 1.0 / persons)
        return U.FitAnswers(P, P, shifted, 1, persons, {"split_gain": gain}, np.ones(3, bool), np.full(3, ""))
    labelled, unlabelled = fit(3, True, 0.1), fit(2, True, 0.9)
    c = U.carried(labelled, unlabelled)
    assert (c.persons, c.evidence["split_gain"]) == (2, 0.9)
    assert c.raw is labelled.raw and c.rows is labelled.rows
    one_person = fit(1, False, float("nan"))
    assert U.carried(labelled, one_person) is labelled
