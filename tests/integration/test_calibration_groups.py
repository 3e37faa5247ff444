"""A calibrator per calibration group, through the real apps on SQLite and PostgreSQL
(``database`` fixture; feedback on a second database of the same backend, as each
service owns its store): clustering stamps each answer with its group
(model.feedback_calibrator_rows), its prediction outbox forwards the record to the
feedback service's store, feedback fits one calibrator per group with enough feedback
(the pooled one for the rest), clustering applies the group's calibrator, and an
erasure takes the group with the rest of the prediction row."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from services.clustering.domain.model import LABEL_SHAPED_GROUP
from services.clustering.prediction_log import PredictionLog
from services.common.erasure import ErasureScope
from services.common.errors import InvalidArgument
from services.feedback.domain.recalibration import MIN_GROUP_FEEDBACK
from services.feedback.domain.signals import SignalKind
from services.feedback.servicer import prediction_from_pb
from services.feedback.store import PredictionRecord
from tests.integration.test_feedback_service import NOW, make_app
from tests.integration.test_labelled_confidence import _correction_to_a_new_person, _fitted_household

_schemas = itertools.count()


@pytest.fixture
def feedback_db(database, request, tmp_path):
    """The feedback service's own database, on the backend ``database`` runs on."""
    from services.common.storage.sql import PostgresDatabase, SqliteDatabase
    if database.dialect == "sqlite":
        db = SqliteDatabase(tmp_path / "feedback.db")
    else:
        db = PostgresDatabase(request.getfixturevalue("postgres_dsn"), f"fbg{os.getpid()}_{next(_schemas)}",
                              max_size=4)
    yield db
    db.close()


def _feedback_in_two_groups(app, n_default: int, n_labels: int, seed: int = 0) -> None:
    """Two-person answers, each confirmed or corrected: the default group right 0.10 more
    often than it says, the label-shaped group 0.25 less often (sessions 15-16's shape)."""
    rng = np.random.default_rng(seed)
    items, verdicts = [], []
    for i in range(n_default + n_labels):
        group = "" if i < n_default else LABEL_SHAPED_GROUP
        c = float(rng.uniform(0.55, 0.95))
        right = rng.random() < (min(c + 0.10, 1.0) if group == "" else c - 0.25)
        items.append(PredictionRecord(f"g{i}", f"acc-g{i % 23}-{group or 'd'}", f"s{i}", "p1",
                                      {"p1": c, "p2": 1.0 - c}, "gmm", 1, NOW - 7200, False, 2,
                                      model_sessions=400, calibration_group=group))
        verdicts.append((f"g{i}", right))
    app.intake.record_predictions(items)
    for pid, right in verdicts:
        if right:
            app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CONFIRMED, None, NOW - 60)
        else:
            app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CORRECTED, "p2", NOW - 60)


def test_the_group_travels_from_clustering_to_feedback_and_back_as_its_own_calibrator(database, feedback_db):
    feedback = make_app(feedback_db)
    clustering, _ = _fitted_household(database, "acc-c", seed=1)
    sent: list[PredictionRecord] = []
    # the outbox forwards by hand below (its background pass waits an hour)
    clustering.predictions = PredictionLog(   # what feedback's servicer reads of each forwarded request
        database, lambda request: sent.extend(prediction_from_pb(p, "p") for p in request.predictions),
        forward_interval_s=3600)

    def forwarded(session_id: str) -> PredictionRecord:
        answer = clustering.assign("acc-c", session_id=session_id)
        sent.clear()
        assert clustering.predictions.forward_once() >= 1
        feedback.intake.record_predictions(sent)   # RecordPrediction's intake, as the servicer calls it
        stored = feedback.store.prediction(answer.prediction_id)
        assert stored is not None and stored.person_id == answer.person_id
        return stored

    labels, labelled = _correction_to_a_new_person(clustering, "acc-c")
    view, _ = clustering.household("acc-c", 1000)
    other = next(s.session_id for s in view.sessions if s.session_id not in labelled and s.closed)
    assert forwarded(other).calibration_group == ""                       # a model no label shaped
    assert clustering.record_labels(labels) == (len(labels), 0)           # labels add p9
    assert forwarded(other).calibration_group == LABEL_SHAPED_GROUP

    # feedback fits a calibrator per group (opposite directions), GetCalibrator's JSON carries them
    _feedback_in_two_groups(feedback, 500, 300)
    fitted = feedback.calibration.recalibrate(["gmm"])["gmm"]
    assert set(fitted.groups) == {"", LABEL_SHAPED_GROUP}
    assert fitted.groups[""].training["shift"] > 0 > fitted.groups[LABEL_SHAPED_GROUP].training["shift"]
    version, served = feedback.calibration.calibrator_for("gmm")
    assert version == fitted.version and served.groups == fitted.groups
    report = {g.group: g.summary for g in feedback.calibration.report("calibration_group", 0).groups}
    assert report[LABEL_SHAPED_GROUP].mean_confidence - report[LABEL_SHAPED_GROUP].accuracy > 0.15
    calibrated = report[f"calibrated:{LABEL_SHAPED_GROUP}"]
    assert abs(calibrated.mean_confidence - calibrated.accuracy) < 0.08   # its own calibrator, in sample

    # clustering applies the label-shaped group's calibrator to the label-shaped model's answer
    plain = clustering.assign("acc-c", session_id=other)
    clustering.calibrator_of = lambda variant: feedback.calibration.calibrator_for(variant)[1]
    lowered = clustering.assign("acc-c", session_id=other)
    assert lowered.person_id == plain.person_id and 1.0 > plain.confidence > lowered.confidence + 0.01
    pooled_only = fitted.apply(np.array([list(plain.probabilities.values())]), [400])[0].max()
    assert lowered.confidence < pooled_only - 0.01   # not the pooled calibrator's answer

    clustering.predictions.close()
    # the export names the group; erasing the household takes it with the prediction rows
    exported = feedback.store.export_account("acc-c")["predictions"]
    assert {p["calibration_group"] for p in exported} == {"", LABEL_SHAPED_GROUP}
    outcome = feedback.intake.erase(ErasureScope("acc-c", "household"))
    assert outcome.deleted_counts["predictions"] >= 2
    with feedback_db.transaction() as tx:
        left = tx.query("SELECT COUNT(*) FROM predictions WHERE account_id = ?", ("acc-c",))[0][0]
        others = tx.query("SELECT COUNT(*) FROM predictions WHERE calibration_group = ?",
                          (LABEL_SHAPED_GROUP,))[0][0]
    assert left == 0 and others == 300            # the other households' rows stay
    assert feedback.store.export_account("acc-c")["predictions"] == []


def test_a_group_below_the_minimum_is_served_the_pooled_calibrator(feedback_db):
    feedback = make_app(feedback_db)
    _feedback_in_two_groups(feedback, 500, MIN_GROUP_FEEDBACK - 1, seed=3)
    fitted = feedback.calibration.recalibrate(["gmm"])["gmm"]
    assert set(fitted.groups) == {""} and fitted.training["groups"][LABEL_SHAPED_GROUP]["own"] is False
    answer = np.array([[0.8, 0.2]])
    assert fitted.apply(answer, [400], LABEL_SHAPED_GROUP) == pytest.approx(fitted.apply(answer, [400]))
    assert fitted.apply(answer, [400], "")[0, 0] != pytest.approx(fitted.apply(answer, [400])[0, 0])


def test_a_bad_calibration_group_is_refused_naming_the_field(feedback_db):
    feedback = make_app(feedback_db)
    bad = PredictionRecord("b1", "acc-b", "s-b1", "p1", {"p1": 0.9, "p2": 0.1}, "gmm", 1, NOW - 60, False, 2,
                           calibration_group="not a group!")
    with pytest.raises(InvalidArgument) as err:
        feedback.intake.record_predictions([bad])
    assert err.value.field == "predictions[0].calibration_group"
    assert feedback.store.prediction("b1") is None


def test_feedback_is_fitted_in_the_group_its_household_is_in_now(feedback_db):
    """Feedback on answers served before labels reshaped the household (stamped in the
    default group) is fitted in the household's group now, its newest prediction's
    (FEEDBACK_GROUP_OF "household"): those households are the over-confident ones."""
    feedback = make_app(feedback_db)
    rng = np.random.default_rng(8)
    items, verdicts = [], []
    for i in range(600):
        shaped_later = i % 2 == 1
        account = f"acc-{'r' if shaped_later else 'k'}{i % 20}"
        c = float(rng.uniform(0.55, 0.95))
        right = rng.random() < (c - 0.25 if shaped_later else min(c + 0.10, 1.0))
        items.append(PredictionRecord(f"h{i}", account, f"s{i}", "p1", {"p1": c, "p2": 1.0 - c}, "gmm", 1,
                                      NOW - 7200, False, 2, model_sessions=400))   # all answered in ""
        verdicts.append((f"h{i}", right))
    # the reshaped households' newest answers: after their labels
    items += [PredictionRecord(f"n{j}", f"acc-r{j}", f"sn{j}", "p1", {"p1": 0.7, "p2": 0.3}, "gmm", 2, NOW - 600,
                               False, 2, model_sessions=400, calibration_group=LABEL_SHAPED_GROUP)
              for j in range(1, 20, 2)]
    feedback.intake.record_predictions(items)
    for pid, right in verdicts:
        kind = SignalKind.PROFILE_CONFIRMED if right else SignalKind.PROFILE_CORRECTED
        feedback.intake.record_feedback(f"f-{pid}", pid, kind, None if right else "p2", NOW - 60)
    assert feedback.store.current_calibration_groups(["acc-r1", "acc-k0", "acc-none"]) == {
        "acc-r1": LABEL_SHAPED_GROUP, "acc-k0": ""}
    fitted = feedback.calibration.recalibrate(["gmm"])["gmm"]
    assert fitted.training["groups"] == {
        "": {"n": 300, "own": True, "shift": fitted.groups[""].training["shift"]},
        LABEL_SHAPED_GROUP: {"n": 300, "own": True, "shift": fitted.groups[LABEL_SHAPED_GROUP].training["shift"]}}
    assert fitted.groups[""].training["shift"] > 0 > fitted.groups[LABEL_SHAPED_GROUP].training["shift"]
