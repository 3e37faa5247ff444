import numpy as np
import pytest

from bench import worlds as W
from bench.evidence_probe import series_links
from services.clustering.domain.model import HouseholdModel
from services.clustering.domain.series import check_links, linked_posterior


def test_chains_tell_apart_persons_the_features_cannot():
    # Two persons whose sessions look the same (equal log joints): only the series
    # chains, each starting at a session whose person is known, say who is who.
    n = 20
    lj = np.zeros((n, 2))
    chain_a, chain_b = np.arange(0, n, 2), np.arange(1, n, 2)
    links = np.vstack([np.c_[chain_a[:-1], chain_a[1:]], np.c_[chain_b[:-1], chain_b[1:]]])
    clamp = np.full(n, -1)
    clamp[0], clamp[1] = 0, 1
    R = linked_posterior(lj, links, 1.27, clamp)
    truth = np.arange(n) % 2
    assert (R.argmax(axis=1) == truth).all()
    without = linked_posterior(lj, links[:0], 1.27, clamp)
    assert np.allclose(without[2:], 0.5)  # no links: a coin toss


def test_bad_links_name_the_argument():
    with pytest.raises(ValueError, match="series_links"):
        check_links(np.array([[0, 5]]), 5)
    with pytest.raises(ValueError, match="series_links"):
        check_links(np.array([[1, 1]]), 5)
    with pytest.raises(ValueError, match="series_links"):
        check_links(np.array([0, 1]), 5)


def test_no_links_leave_the_fit_and_answers_unchanged_and_links_move_them():
    h = [h for h in W.generate(W.TUNING, families=("living_room",), worlds_per_family=1, households_per_world=4)
         if h.n_persons >= 2][0]
    plain = HouseholdModel().fit(h.features, device_ids=h.device_id)
    none = HouseholdModel().fit(h.features, device_ids=h.device_id, series_links=None)
    a = plain.assign_batch(h.features, device_ids=h.device_id)
    b = none.assign_batch(h.features, device_ids=h.device_id, series_links=None)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    links = series_links(h)
    linked = HouseholdModel().fit(h.features, device_ids=h.device_id, series_links=links)
    c = linked.assign_batch(h.features, device_ids=h.device_id, series_links=links)
    assert not np.array_equal(a.probabilities, c.probabilities)
