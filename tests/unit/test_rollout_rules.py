"""The rollback decisions of services/rollout.py that need no process: which webhook
payloads roll back, which experiment results breach, which step lists are accepted."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from services.feedback.domain.variants import ExperimentFlags
from services.rollout import Experiment, _steps, check_guards, rollback_reason


def _alert(status="firing", action="rollback", name="HearthRollbackErrors"):
    labels = {"alertname": name, **({"action": action} if action else {})}
    return {"status": status, "labels": labels, "annotations": {"summary": "gateway: 1% 5xx"}}


def test_only_firing_rollback_alerts_roll_back():
    assert rollback_reason({"alerts": [_alert()]}) == "alert HearthRollbackErrors: gateway: 1% 5xx"
    assert rollback_reason({"alerts": [_alert(status="resolved")]}) is None
    assert rollback_reason({"alerts": [_alert(action=None)]}) is None
    assert rollback_reason({"alerts": [_alert(action="page")]}) is None
    assert rollback_reason({}) is None
    assert rollback_reason({"alerts": ["junk", None, 3]}) is None
    both = rollback_reason({"alerts": [_alert(name="B"), _alert(name="A"), _alert(status="resolved", name="C")]})
    assert both.startswith("alert A, B:")


def test_accuracy_guard_needs_enough_samples_and_names_the_challenger_only():
    results = {"results": [{"variant": "kmeans", "n": 10, "accuracy": 0.5, "brier": 0.3},
                           {"variant": "gmm", "n": 500, "accuracy": 0.4, "brier": 0.3}]}
    (breach,) = check_guards(results, "kmeans", min_samples=10, prometheus=None)
    assert breach.guard == "accuracy" and breach.value == 0.5 and breach.limit == 0.65
    assert check_guards(results, "kmeans", min_samples=11, prometheus=None) == []
    fine = {"results": [{"variant": "kmeans", "n": 900, "accuracy": 0.65, "brier": 0.1}]}
    assert check_guards(fine, "kmeans", min_samples=10, prometheus=None) == []   # at the floor: not below


@pytest.mark.parametrize("text", ["", "5,x", "0,50", "50,25", "5,101"])
def test_bad_step_lists_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _steps(text)


def test_steps_parse():
    assert _steps("5,25,50,100") == [5.0, 25.0, 50.0, 100.0]


@pytest.mark.parametrize("percent", [5.0, 25.0, 50.0, 100.0])
def test_every_step_of_the_default_rollout_is_a_split_the_experiment_api_accepts(percent):
    # The body of each PUT /v1/experiment is read as the feedback service reads it
    # (ExperimentFlags.from_split): the 100 % step sent {challenger: 100} without control
    # and was refused with 422 until session 21.
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        flags = ExperimentFlags.from_split("model-variant", body["traffic"], control="gmm")
        seen.append(flags.shares())
        return httpx.Response(200, json={"version": len(seen)})

    experiment = Experiment("http://gateway", "hk_test")
    experiment._http = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    assert experiment.set_split("gmm", "kmeans", percent, reason="step") == 1
    assert seen[0]["kmeans"] == percent and seen[0]["gmm"] == pytest.approx(100.0 - percent)
