"""Feedback that confirms a household's persons (RecordLabels with the ids it answered)
refits the household with those labels; the labels only name the device-first fit's
persons, so every other session keeps the person and probability it had — the
confidence maps included, whose household shift reads the fit's personal-device groups.
Real store, the RecordLabels path (ClusteringApp.record_labels -> a full refit)."""

from __future__ import annotations

import time

import pytest

from services.clustering.app import ClusteringApp
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events

T0 = time.time() - 90 * 86400


def _fitted_household(database, account: str, seed: int):
    """A three-person household's 40 days ingested at once and fitted: (app, envelope)."""
    store = ClusteringStore(database)
    store.migrate()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)
    events, _ = household_events(account, ("kid", "parent", "teen"), days=40, start_ts=T0, seed=seed)
    store.ingest(events)
    _, envelope = app.keeper.refresh(account)
    return app, envelope


def test_confirming_feedback_leaves_the_other_answers_as_they_were(database):
    app, envelope = _fitted_household(database, "acc-l", seed=3)
    groups = envelope.model.device_group_count
    assert envelope.model.n_persons >= 2 and groups >= 1
    before, _ = app.household("acc-l", 1000)
    person_of = {s.session_id: s.person_id for s in before.sessions}
    # one session of each person confirmed with the id it was answered with
    confirmed = {}
    for s in before.sessions:
        confirmed.setdefault(s.person_id, s.session_id)
    labels = [("acc-l", sid, pid, "feedback:profile_confirmed") for pid, sid in confirmed.items()]
    assert app.record_labels(labels) == (len(labels), 0)
    _, envelope = app.keeper.load("acc-l")
    assert envelope.model.device_group_count == groups
    after, _ = app.household("acc-l", 1000)
    others = [s for s in after.sessions if s.session_id not in confirmed.values()]
    assert others and all(s.person_id == person_of[s.session_id] for s in others)
    for s in others:
        assert after.person_probability[s.session_id] == pytest.approx(before.person_probability[s.session_id],
                                                                       abs=1e-6)


def test_a_correction_to_a_person_the_model_lacks_adds_that_person_and_nothing_else(database):
    """Feedback naming a person id the household's model does not have (a correction to
    someone new) makes that person: it answers its labelled session, and every other
    session keeps the person it had — the new person starts as its labels' share of the
    person holding its labels (1 of 4 here) and takes only sessions like its labels
    (HouseholdModel._labels_add_persons), not its parent's sessions wholesale."""
    app, envelope = _fitted_household(database, "acc-n", seed=1)
    assert envelope.model.n_persons == 3
    before, _ = app.household("acc-n", 1000)
    person_of = {s.session_id: s.person_id for s in before.sessions}
    sessions_of: dict[str, list[str]] = {}
    for s in before.sessions:
        sessions_of.setdefault(s.person_id, []).append(s.session_id)
    parent = max(sessions_of, key=lambda p: len(sessions_of[p]))
    labels = [("acc-n", sids[0], pid, "feedback:profile_confirmed") for pid, sids in sessions_of.items()]
    labels += [("acc-n", sid, parent, "feedback:profile_confirmed") for sid in sessions_of[parent][1:4]]
    corrected = sessions_of[parent][4]
    labels.append(("acc-n", corrected, "p9", "feedback:profile_corrected"))
    assert app.record_labels(labels) == (len(labels), 0)
    _, envelope = app.keeper.load("acc-n")
    assert envelope.model.n_persons == 4 and "p9" in envelope.model.person_ids
    after, _ = app.household("acc-n", 1000)
    labelled = {sid for _, sid, _, _ in labels}
    assert {s.person_id for s in after.sessions if s.session_id == corrected} == {"p9"}
    others = [s for s in after.sessions if s.session_id not in labelled]
    assert len(others) > 90 and all(s.person_id == person_of[s.session_id] for s in others)


def _correction_to_a_new_person(app, account: str) -> tuple[list, set[str]]:
    """Labels confirming each person of the household once, three more of the largest
    person, and one of its sessions corrected to a person the model lacks (p9): the
    labels add a person (HouseholdModel._labels_add_persons). (labels, labelled ids)"""
    before, _ = app.household(account, 1000)
    sessions_of: dict[str, list[str]] = {}
    for s in before.sessions:
        sessions_of.setdefault(s.person_id, []).append(s.session_id)
    parent = max(sessions_of, key=lambda p: len(sessions_of[p]))
    labels = [(account, sids[0], pid, "feedback:profile_confirmed") for pid, sids in sessions_of.items()]
    labels += [(account, sid, parent, "feedback:profile_confirmed") for sid in sessions_of[parent][1:4]]
    labels.append((account, sessions_of[parent][4], "p9", "feedback:profile_corrected"))
    return labels, {sid for _, sid, _, _ in labels}


def test_answers_of_a_model_whose_persons_labels_added_skip_the_feedback_calibrator(database):
    """The feedback calibrator learnt from answers served before the labels; once labels
    add a person the model says so (persons_from_labels, stored with it and read back
    by a fresh service on the same database) and its answers are served without the
    calibrator — answers of a model the labels only named keep it. Real store, the
    RecordLabels and AssignSession paths."""
    from services.common.calibration import IDENTITY, Calibrator
    softer = Calibrator(1, "temperature", {"temperature": 3.0})   # moves every multi-person answer

    def fresh(calibrator):   # a new service process: nothing cached, the model read from the store
        store = ClusteringStore(database)
        return ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False,
                             calibrator_of=lambda _variant: calibrator)

    app, envelope = _fitted_household(database, "acc-c", seed=1)
    assert envelope.model.n_persons == 3 and not envelope.model.persons_from_labels
    labels, labelled = _correction_to_a_new_person(app, "acc-c")
    view, _ = app.household("acc-c", 1000)
    other = next(s.session_id for s in view.sessions if s.session_id not in labelled and s.closed)
    plain, calibrated = fresh(IDENTITY).assign("acc-c", session_id=other), fresh(softer).assign("acc-c", session_id=other)
    assert calibrated.person_id == plain.person_id and calibrated.confidence < plain.confidence - 0.01

    # labels that only name the model's persons: it is not shaped by them, the calibrator applies
    assert app.record_labels(labels[:3]) == (3, 0)
    assert not fresh(IDENTITY).keeper.load("acc-c")[1].model.persons_from_labels
    assert fresh(softer).assign("acc-c", session_id=other).confidence < fresh(IDENTITY).assign(
        "acc-c", session_id=other).confidence - 0.01

    # a correction to a person the model lacks adds that person: answered without the calibrator
    assert app.record_labels(labels) == (len(labels), 0)
    _, stored = fresh(IDENTITY).keeper.load("acc-c")
    assert stored.model.persons_from_labels and "p9" in stored.model.person_ids
    plain, served = fresh(IDENTITY).assign("acc-c", session_id=other), fresh(softer).assign("acc-c", session_id=other)
    assert served.probabilities == pytest.approx(plain.probabilities, abs=1e-12)
    assert max(plain.probabilities.values()) < 1.0   # an answer the calibrator would have moved
