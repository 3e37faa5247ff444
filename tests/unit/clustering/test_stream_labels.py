"""Feedback labels in a streamed household (HouseholdModel.refit_for_labels, the
cold-start fit): a label refit of a stream leaves it a stream's, and a label given
before the first fit reaches that fit with the person id the caller gave."""

from __future__ import annotations

import numpy as np
import pytest

from services.clustering.domain import model as M
from services.clustering.domain.model import MIN_SESSIONS, HouseholdModel


@pytest.fixture(scope="module")
def household():
    from bench import worlds as W
    hs = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=4)
    return next(h for h in hs if h.n_persons >= 2 and h.n_sessions >= 120)


def _streamed(h, upto: int, batch: int = 5) -> HouseholdModel:
    m = HouseholdModel()
    for a in range(0, upto, batch):
        m.update(h.features[a:a + batch], device_ids=h.device_id[a:a + batch])
    return m


def test_a_label_refit_of_a_stream_keeps_it_streamed(household):
    h, n = household, 100
    m = _streamed(h, n)
    assert m.streamed
    labels: list[str | None] = [None] * n
    labels[n - 1] = m.person_ids[0]
    m.label_map[labels[n - 1]] = labels[n - 1]     # ModelKeeper.fit: an id label keeps its id
    m.refit_for_labels(h.features[:n], labels=labels, device_ids=h.device_id[:n])
    assert m.streamed and m.n_sessions == n
    assert m.label_map[labels[n - 1]] in m.person_ids
    # and a plain refit is still a fit on every session (answered as fitted)
    m.fit(h.features[:n], labels=labels, device_ids=h.device_id[:n])
    assert not m.streamed


def test_a_label_refit_of_a_model_fitted_at_once_is_a_batch_fit(household):
    h = household
    labels = [None] * h.n_sessions
    labels[3] = "p1"
    a = HouseholdModel().fit(h.features, device_ids=h.device_id)
    b = HouseholdModel().fit(h.features, device_ids=h.device_id)
    a.label_map["p1"] = b.label_map["p1"] = "p1"
    a.refit_for_labels(h.features, labels=labels, device_ids=h.device_id)
    b.fit(h.features, labels=labels, device_ids=h.device_id)
    assert not a.streamed
    np.testing.assert_array_equal(a.assign_batch(h.features, device_ids=h.device_id).probabilities,
                                  b.assign_batch(h.features, device_ids=h.device_id).probabilities)


def test_a_label_before_the_first_fit_names_a_person_of_that_fit(household):
    h = household
    first = MIN_SESSIONS // 2
    m = HouseholdModel()
    m.update(h.features[:first], device_ids=h.device_id[:first])
    assert m.active_variant == "cold_start"
    # the caller confirms session 0 as "p7" (RecordLabels -> a refit, still cold)
    labels: list[str | None] = [None] * first
    labels[0] = "p7"
    m.label_map["p7"] = "p7"
    m.next_person = 8
    m.fit(h.features[:first], labels=labels, device_ids=h.device_id[:first])
    assert m.active_variant == "cold_start"
    m.update(h.features[first:MIN_SESSIONS], device_ids=h.device_id[first:MIN_SESSIONS])
    assert m.active_variant == "gmm"
    assert m.label_map.get("p7") == "p7" and "p7" in m.person_ids
    # the labelled session's person is the one the caller named
    b = m.assign_batch(h.features[:1], device_ids=h.device_id[:1])
    assert b.person_ids[int(b.person_index[0])] == "p7"


def test_cold_labels_survive_a_round_trip_through_bytes(household):
    h = household
    m = HouseholdModel()
    labels: list[str | None] = [None] * 4
    labels[2] = "p3"
    m.label_map["p3"] = "p3"
    m.fit(h.features[:4], labels=labels, device_ids=h.device_id[:4])
    r = HouseholdModel.from_bytes(m.to_bytes())
    assert r.cold_labels == labels
    r.update(h.features[4:MIN_SESSIONS], device_ids=h.device_id[4:MIN_SESSIONS])
    assert "p3" in r.person_ids


def test_the_cold_fit_without_the_switch_drops_the_label(household, monkeypatch):
    """What COLD_FIT_KEEPS_LABELS repairs (the old behaviour, kept as a switch for the
    TUNING comparison)."""
    monkeypatch.setattr(M, "COLD_FIT_KEEPS_LABELS", False)
    h = household
    m = HouseholdModel()
    labels: list[str | None] = [None] * 4
    labels[0] = "p7"
    m.label_map["p7"] = "p7"
    m.fit(h.features[:4], labels=labels, device_ids=h.device_id[:4])
    m.update(h.features[4:MIN_SESSIONS], device_ids=h.device_id[4:MIN_SESSIONS])
    assert "p7" not in m.label_map
