"""Feedback that confirms a household's persons (RecordLabels with the ids it answered)
refits the household with those labels; the labels only name the device-first fit's
persons, so every other session keeps the person and probability it had — the
confidence maps included, whose household shift reads the fit's personal-device groups.
Real store, the RecordLabels path (ClusteringApp.record_labels -> a full refit)."""

from __future__ import annotations

import pytest

from services.clustering.app import ClusteringApp
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events, week_start_days_ago

T0 = week_start_days_ago(90)


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


def test_answers_of_a_model_whose_persons_labels_added_take_their_groups_calibrator(database):
    """The households labels reshape are over-confident where the rest are under-confident
    (docs/benchmarks.md, issue #10 sessions 15-16), so feedback fits a calibrator per
    calibration group. Once labels add a person the model says so (persons_from_labels,
    stored with it and read back by a fresh service on the same database) and its answers
    are served with the label-shaped group's calibrator and recorded in that group;
    answers of a model the labels only named keep the default group's. Real store, the
    RecordLabels and AssignSession paths. (Before session 16 a label-shaped model's
    answers were served without any calibrator and recorded without a group.)"""
    from services.clustering.domain.model import LABEL_SHAPED_GROUP
    from services.common.calibration import IDENTITY, Calibrator
    softer, sharper = Calibrator(1, "temperature", {"temperature": 3.0}), Calibrator(1, "temperature",
                                                                                     {"temperature": 0.5})
    grouped = Calibrator(1, "temperature", {"temperature": 3.0}, groups={LABEL_SHAPED_GROUP: sharper})

    def fresh(calibrator):   # a new service process: nothing cached, the model read from the store
        store = ClusteringStore(database)
        return ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False,
                             calibrator_of=lambda _variant: calibrator)

    def served(calibrator, session_id):   # the answer and the records its prediction outbox forwards
        from services.clustering.prediction_log import PredictionLog
        app, recorded = fresh(calibrator), []
        app.predictions = PredictionLog(database, lambda request: recorded.extend(request.predictions),
                                        forward_interval_s=3600)
        try:
            answer = app.assign("acc-c", session_id=session_id)
            app.predictions.forward_once()
        finally:
            app.predictions.close()
        return answer, [r for r in recorded if r.prediction_id == answer.prediction_id]

    app, envelope = _fitted_household(database, "acc-c", seed=1)
    assert envelope.model.n_persons == 3 and not envelope.model.persons_from_labels
    labels, labelled = _correction_to_a_new_person(app, "acc-c")
    view, _ = app.household("acc-c", 1000)
    other = next(s.session_id for s in view.sessions if s.session_id not in labelled and s.closed)
    plain, _ = served(IDENTITY, other)
    answer, recorded = served(grouped, other)
    assert answer.person_id == plain.person_id and answer.confidence < plain.confidence - 0.01
    assert answer.confidence == pytest.approx(served(softer, other)[0].confidence)   # the default group's
    assert [r.calibration_group for r in recorded] == [""]

    # labels that only name the model's persons: it is not shaped by them, still the default group
    assert app.record_labels(labels[:3]) == (3, 0)
    assert not fresh(IDENTITY).keeper.load("acc-c")[1].model.persons_from_labels
    assert served(grouped, other)[0].confidence == pytest.approx(served(softer, other)[0].confidence)

    # a correction to a person the model lacks adds that person: the label-shaped group's calibrator
    assert app.record_labels(labels) == (len(labels), 0)
    _, stored = fresh(IDENTITY).keeper.load("acc-c")
    assert stored.model.persons_from_labels and "p9" in stored.model.person_ids
    plain, _ = served(IDENTITY, other)
    answer, recorded = served(grouped, other)
    assert max(plain.probabilities.values()) < 1.0   # an answer a calibrator can move
    assert answer.person_id == plain.person_id and answer.confidence > plain.confidence + 0.01
    assert answer.confidence == pytest.approx(served(sharper, other)[0].confidence)
    assert [r.calibration_group for r in recorded] == [LABEL_SHAPED_GROUP]
    # a calibrator without that group (too little feedback in it) serves the pooled map
    assert served(softer, other)[0].confidence < plain.confidence - 0.01
