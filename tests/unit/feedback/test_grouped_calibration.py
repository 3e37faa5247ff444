"""Calibrators per calibration group (services/common/calibration.py "Groups",
fit_grouped_calibrator / feedback_groups in services/feedback/domain/recalibration.py):
one group over-confident and the other under-confident cannot share one calibrator;
each group with enough feedback gets its own, the rest the pooled one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.common.calibration import IDENTITY, Calibrator
from services.common.errors import InvalidArgument
from services.feedback.domain.recalibration import (
    MIN_GROUP_FEEDBACK,
    FeedbackSample,
    feedback_groups,
    fit_feedback_calibrator,
    fit_grouped_calibrator,
)

LABELS = "persons_from_labels"
AGE = 400


def _two_groups(n_default: int, n_labels: int, seed: int = 0):
    """Two-person answers in [0.55, 0.95]: the default group right 0.10 more often than it
    says (under-confident), the label-shaped group right 0.20 less often (over-confident)."""
    rng = np.random.default_rng(seed)
    n = n_default + n_labels
    conf = rng.uniform(0.55, 0.95, n)
    groups = np.array([""] * n_default + [LABELS] * n_labels, dtype=object)
    rate = np.where(groups == LABELS, conf - 0.20, np.minimum(conf + 0.10, 1.0))
    right = rng.random(n) < rate
    probs = np.stack([conf, 1.0 - conf], axis=1)
    labels = np.where(right, 0, 1)
    sample = FeedbackSample.create(probs, labels=labels, correct=right.astype(float))
    return sample, groups, np.full(n, AGE)


def _gap(calibrator, sample, groups, name):
    rows = groups == name
    out = calibrator.apply(sample.probs[rows], np.full(int(rows.sum()), AGE), groups[rows])
    return float(out.max(axis=1).mean() - sample.correct[rows].mean())


def test_each_group_with_enough_feedback_gets_its_own_calibrator_in_its_own_direction():
    sample, groups, ages = _two_groups(600, 400)
    grouped = fit_grouped_calibrator(sample, ages, groups, min_group=100)
    assert set(grouped.groups) == {"", LABELS}
    pooled = fit_feedback_calibrator(sample, ages)
    # the pooled calibrator (the top level) is the one fitted on every answer
    assert grouped.parameters == pooled.parameters and grouped.one_person == pooled.one_person
    shift = {name: part.training["shift"] for name, part in grouped.groups.items()}
    assert shift[""] > 0.05 and shift[LABELS] < -0.1, shift   # opposite directions
    for name in ("", LABELS):
        # each group's answers end nearer their accuracy than under the pooled calibrator
        assert abs(_gap(grouped, sample, groups, name)) < abs(_gap(pooled, sample, groups, name)) - 0.03
    assert grouped.training["groups"][LABELS] == {"n": 400, "own": True, "shift": shift[LABELS]}


def test_a_group_with_too_little_feedback_falls_back_to_the_pooled_calibrator():
    sample, groups, ages = _two_groups(600, MIN_GROUP_FEEDBACK - 1)
    grouped = fit_grouped_calibrator(sample, ages, groups)
    assert set(grouped.groups) == {""}
    assert grouped.training["groups"][LABELS] == {"n": MIN_GROUP_FEEDBACK - 1, "own": False}
    rows = groups == LABELS
    pooled = fit_feedback_calibrator(sample, ages)
    assert grouped.apply(sample.probs[rows], ages[rows], groups[rows]) == pytest.approx(
        pooled.apply(sample.probs[rows], ages[rows]))
    # so does a group the calibrator has never heard of, and rows given no group at all
    assert grouped.apply(sample.probs[:5], ages[:5], "a_new_group") == pytest.approx(
        pooled.apply(sample.probs[:5], ages[:5]))
    assert grouped.apply(sample.probs[:5], ages[:5]) == pytest.approx(pooled.apply(sample.probs[:5], ages[:5]))


def test_one_group_only_stores_no_group_calibrator():
    sample, groups, ages = _two_groups(500, 0)
    assert fit_grouped_calibrator(sample, ages, groups, min_group=10).groups == {}


def test_rows_of_several_groups_in_one_call_each_take_their_groups_calibrator():
    sample, groups, ages = _two_groups(300, 300)
    grouped = fit_grouped_calibrator(sample, ages, groups, min_group=50)
    mixed = np.array([[0.8, 0.2], [0.8, 0.2]])
    out = grouped.apply(mixed, [AGE, AGE], np.array(["", LABELS], dtype=object))
    assert out[0, 0] > 0.8 > out[1, 0]       # the same answer: raised in one group, lowered in the other
    assert out.sum(axis=1) == pytest.approx([1.0, 1.0])
    with pytest.raises(InvalidArgument) as err:
        grouped.apply(mixed, [AGE, AGE], np.array([""], dtype=object))
    assert err.value.field == "groups"


def test_groups_survive_json_and_an_older_reader_applies_the_pooled_map():
    sample, groups, ages = _two_groups(300, 300)
    grouped = fit_grouped_calibrator(sample, ages, groups, min_group=50, version=7)
    back = Calibrator.from_json(grouped.to_json())
    assert back == grouped and back.groups[LABELS].version == 7
    data = json.loads(grouped.to_json())
    assert data["schema"] == 1 and set(data["groups"]) == {"", LABELS}
    del data["groups"]   # what a reader that predates groups keeps
    older = Calibrator.from_dict(data)
    assert older.apply(sample.probs[:3], ages[:3], groups[:3]) == pytest.approx(
        fit_feedback_calibrator(sample, ages).apply(sample.probs[:3], ages[:3]))


def test_bad_groups_are_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as err:
        Calibrator.from_dict({**IDENTITY.to_dict(), "groups": {"x": {"method": "identity", "groups": {}}}})
    assert err.value.field == "groups"
    with pytest.raises(InvalidArgument) as err:
        Calibrator.from_dict({**IDENTITY.to_dict(), "groups": []})
    assert err.value.field == "groups"
    sample, groups, ages = _two_groups(10, 10)
    with pytest.raises(InvalidArgument) as err:
        fit_grouped_calibrator(sample, ages, groups[:5])
    assert err.value.field == "groups"


def test_feedback_groups_answered_or_the_households_group_now():
    answered = np.array(["", "", LABELS], dtype=object)
    accounts = np.array(["a", "b", "b"], dtype=object)
    assert feedback_groups(answered, accounts, {"a": LABELS}, "answered").tolist() == ["", "", LABELS]
    assert feedback_groups(answered, accounts, {"a": LABELS}, "household").tolist() == [LABELS, "", LABELS]
    with pytest.raises(InvalidArgument) as err:
        feedback_groups(answered, accounts, None, "nearest")
    assert err.value.field == "group_of"
