"""Feedback labels in a streamed household (HouseholdModel.binds_labels, the cold-start
fit, update): a stream binds labels to its persons instead of refitting, keeps checking
its persons once it has labels, and a label given before the first fit reaches that fit
with the person id the caller gave."""

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


def test_a_stream_binds_labels_and_a_model_fitted_at_once_is_refitted(household):
    h, n = household, 100
    m = _streamed(h, n)
    assert m.streamed and m.binds_labels
    m.bind_id_labels([None, m.person_ids[0], "alice", "p12"])
    assert m.label_map[m.person_ids[0]] == m.person_ids[0] and m.label_map["p12"] == "p12"
    assert "alice" not in m.label_map and m.next_person >= 13     # names are not ids; ids are not reused
    m.fit(h.features[:n], device_ids=h.device_id[:n])
    assert not m.binds_labels                                      # fitted at once: labels refit it
    assert not HouseholdModel().binds_labels                      # a cold start waits for its first fit


def test_a_stream_reserves_ids_for_persons_it_lacks_and_never_answers_a_retired_one(household):
    from services.clustering.modeling import known_person
    h, n = household, 100
    m = _streamed(h, n)
    m.reserve_label_ids([None, m.person_ids[0], "bob", "p12", "alice", "bob"])
    assert m.label_map["p12"] == "p12" and m.label_map["alice"] == "p13" and m.label_map["bob"] == "p14"
    assert m.label_map[m.person_ids[0]] == m.person_ids[0] and m.next_person == 15
    assert {"p12", "p13", "p14"}.isdisjoint(m.person_ids)                    # reserved, not fitted
    assert [known_person(m, lab) for lab in ("p12", "alice", "bob", "carol", "p99")] == \
        ["p12", "p13", "p14", None, None]                                   # unlabelled ids stay unknown
    m.retire_person("p13")                                                   # an erased person's id is gone
    assert known_person(m, "alice") is None and known_person(m, "p13") is None
    m.reserve_label_ids(["p13"])                          # a label naming the erased id is a name now
    assert m.label_map["p13"] == "p15" and known_person(m, "p13") == "p15"


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


def test_a_labelled_stream_still_checks_its_persons(household):
    """update re-selects the persons (and looks for newcomers) once labels exist, as it
    does without them (it stopped once the model had labels)."""
    h, n = household, 100
    m = _streamed(h, n)
    m.label_map[m.person_ids[0]] = m.person_ids[0]
    m.since_check = 0
    m.update(h.features[n:n + M.RESELECT_EVERY], device_ids=h.device_id[n:n + M.RESELECT_EVERY])
    assert m.since_check == 0     # the check ran (it resets the count)


def test_a_streaming_refit_never_loses_a_person_a_label_names():
    """Streams re-select their persons when labels exist (session 11): a refit or
    re-selection that would merge away a person a label names (a profile hint, a
    feedback id) is skipped, as one that would drop a fresh newcomer; dropping an
    unnamed person is the refit's own call."""
    from services.clustering.domain.model import HouseholdModel
    m = HouseholdModel()
    m.label_map = {"alice": "p1", "p4": "p4"}
    assert m._drops_kept_person(["p1", "p2"], ["p2"])
    assert m._drops_kept_person(["p2", "p4"], ["p2", "p5"])
    assert not m._drops_kept_person(["p1", "p2"], ["p1"])
    assert not m._drops_kept_person(["p1", "p2"], ["p1", "p3"])


def test_a_cold_start_persons_id_named_by_a_label_is_not_reserved_again(household):
    h = household
    m = HouseholdModel()
    m.update(h.features[:3], device_ids=h.device_id[:3])
    assert m.active_variant == "cold_start"
    answered = m.assign_batch(h.features[:1], device_ids=h.device_id[:1]).person_ids[0]
    m.bind_id_labels([answered, "p9"])             # a confirmation of a cold answer, a caller's new id
    assert m.reserved_person_ids() == ["p9"]       # the confirmed person is one the model answers with
