"""Contract of the feedback service over real gRPC (in-process server built by the
production ``build``): every RPC, its errors with status code and field."""

from __future__ import annotations

import hashlib
import json
import math
import time

import grpc
import pytest

from hearth.common.v1 import common_pb2, common_pb2_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import service_principal
from services.common.pbutil import float_to_ts

from .conftest import ADMIN

# Peers on a port nothing listens on: outbound calls fail fast (UNAVAILABLE) and never
# reach a mesh another engineer may be running on the default ports.
NOWHERE = "127.0.0.1:1"


@pytest.fixture
def stub(start_service):
    privacy, _ = start_service("privacy")   # RecordFeedback checks the account's consent with it
    _, channel = start_service("feedback", clustering_addr=NOWHERE, privacy_addr=f"127.0.0.1:{privacy.port}")
    stub = fpb_grpc.FeedbackServiceStub(channel)
    stub.data = common_pb2_grpc.DataHolderStub(channel)   # the erasure contract, same port
    return stub


def call(stub, method: str, request):
    # Erase at a data holder is the privacy service's deletion fan-out (svc:privacy only).
    who = service_principal("privacy") if method == "Erase" else ADMIN
    return getattr(stub, method)(request, metadata=who.metadata("feedback"), timeout=10)


def error_of(stub, method: str, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(stub, method, request)
    return info.value.code(), dict(info.value.trailing_metadata()).get(ERROR_FIELD_KEY, "")


def prediction(pid: str, account: str = "acc-1", person: str = "p1", probs=None, variant: str = "kmeans",
               ts: float | None = None, household_size: int = 2) -> fpb.Prediction:
    return fpb.Prediction(prediction_id=pid, account_id=account, session_id=f"s-{pid}", person_id=person,
                          probabilities=probs or {"p1": 0.8, "p2": 0.2}, model_variant=variant, model_version=1,
                          ts=float_to_ts(ts or time.time() - 3600), household_size=household_size)


def feedback(fid: str, pid: str, kind=fpb.FEEDBACK_KIND_EXPLICIT_CONFIRM, true_person: str = ""):
    return fpb.RecordFeedbackRequest(feedback_id=fid, prediction_id=pid, kind=kind, true_person_id=true_person,
                                     ts=float_to_ts(time.time() - 60))


def test_record_prediction_is_idempotent_and_checks_the_predicted_person(stub):
    a = prediction("a")
    r = call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[a, prediction("b")]))
    assert (r.accepted, r.duplicates) == (2, 0)
    r = call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[a]))   # a retry: the same message
    assert (r.accepted, r.duplicates) == (0, 1)
    # the id with other content (here its time) is not a duplicate (since session 33)
    assert error_of(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[prediction("a")])) == (
        grpc.StatusCode.ALREADY_EXISTS, "predictions[0].prediction_id")
    not_top = prediction("c", person="p2")  # p2 has 0.2 < 0.8
    assert error_of(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[not_top])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "predictions[0].person_id")
    bad_variant = prediction("d", variant="k means")
    assert error_of(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[bad_variant])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "predictions[0].model_variant")
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[prediction("e", variant="")]))
    call(stub, "RecordFeedback", feedback("fe", "e"))
    groups = call(stub, "GetCalibration", fpb.GetCalibrationRequest(group_by="variant")).groups
    assert {g.group for g in groups} == {"unspecified", "calibrated:unspecified"}


def test_record_feedback_weights_duplicates_and_errors(stub):
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[prediction("a")]))
    r = call(stub, "RecordFeedback", feedback("f1", "a"))
    assert (r.duplicate, r.weight) == (False, 1.0)
    again = call(stub, "RecordFeedback", feedback("f1", "a"))
    assert (again.duplicate, again.weight) == (True, 1.0)
    switched = call(stub, "RecordFeedback", feedback("f2", "a", fpb.FEEDBACK_KIND_IMPLICIT_SWITCH_PROFILE, "p2"))
    assert switched.weight == pytest.approx(0.8)
    abandoned = call(stub, "RecordFeedback", feedback("f3", "a", fpb.FEEDBACK_KIND_IMPLICIT_ABANDON))
    assert abandoned.weight == pytest.approx(0.2)

    cases = [
        (feedback("f9", "missing"), grpc.StatusCode.NOT_FOUND, "prediction_id"),
        (feedback("f9", "a", fpb.FEEDBACK_KIND_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
        (feedback("f9", "a", fpb.FEEDBACK_KIND_EXPLICIT_CORRECT), grpc.StatusCode.INVALID_ARGUMENT,
         "true_person_id"),
        (feedback("f9", "a", fpb.FEEDBACK_KIND_EXPLICIT_CORRECT, "p1"), grpc.StatusCode.INVALID_ARGUMENT,
         "true_person_id"),  # a "correction" naming the predicted person
        (feedback("f9", "a", fpb.FEEDBACK_KIND_IMPLICIT_CONTINUE, "p2"), grpc.StatusCode.INVALID_ARGUMENT,
         "true_person_id"),
        (feedback("bad id", "a"), grpc.StatusCode.INVALID_ARGUMENT, "feedback_id"),
        # the same feedback_id for another fact
        (feedback("f1", "a", fpb.FEEDBACK_KIND_EXPLICIT_CORRECT, "p2"), grpc.StatusCode.ALREADY_EXISTS,
         "feedback_id"),
    ]
    for request, code, field in cases:
        assert error_of(stub, "RecordFeedback", request) == (code, field), request


def test_get_calibration_groups_bins_and_errors(stub):
    predictions = [prediction(f"v{i}", variant="kmeans" if i % 2 else "gmm") for i in range(8)]
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=predictions))
    for i in range(8):
        kind = fpb.FEEDBACK_KIND_EXPLICIT_CONFIRM if i < 6 else fpb.FEEDBACK_KIND_EXPLICIT_CORRECT
        call(stub, "RecordFeedback", feedback(f"f{i}", f"v{i}", kind, "p2" if i >= 6 else ""))

    overall = call(stub, "GetCalibration", fpb.GetCalibrationRequest())
    assert overall.calibrator_version == ""  # nothing fitted yet
    by_name = {g.group: g for g in overall.groups}
    assert set(by_name) == {"all", "calibrated:all"}
    everything = by_name["all"]
    assert everything.n == 8
    # Every confidence is 0.8 and 6 of 8 are right: Brier = (6 * 0.2^2 + 2 * 0.8^2) / 8, ECE = |0.75 - 0.8|.
    assert everything.brier == pytest.approx((6 * 0.04 + 2 * 0.64) / 8)
    assert everything.ece == pytest.approx(0.05)
    assert [(b.count, b.lower, b.upper) for b in everything.bins] == [(8, pytest.approx(0.7), pytest.approx(0.8))]
    assert everything.bins[0].accuracy == pytest.approx(0.75)
    assert everything.log_loss == pytest.approx(-(6 * math.log(0.8) + 2 * math.log(0.2)) / 8)

    by_variant = call(stub, "GetCalibration", fpb.GetCalibrationRequest(group_by="variant", bins=4))
    names = sorted(g.group for g in by_variant.groups)
    assert names == ["calibrated:gmm", "calibrated:kmeans", "gmm", "kmeans"]
    assert all(b.upper in (0.25, 0.5, 0.75, 1.0) for g in by_variant.groups for b in g.bins)

    assert error_of(stub, "GetCalibration", fpb.GetCalibrationRequest(group_by="country")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "group_by")
    assert error_of(stub, "GetCalibration", fpb.GetCalibrationRequest(bins=1000)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "bins")


def test_experiment_flags_versions_and_kill_switch(stub):
    start = call(stub, "GetExperiment", fpb.GetExperimentRequest(account_id="acc-1"))
    assert dict(start.traffic) == {"gmm": 100.0}
    assert start.variant == "gmm" and not start.kill_switch
    assert math.isnan(start.p_value)  # nothing to compare yet

    v1 = call(stub, "SetFlag", fpb.SetFlagRequest(traffic={"gmm": 0.0, "kmeans": 100.0}, reason="all to kmeans"))
    assert v1.version == 1
    now = call(stub, "GetExperiment", fpb.GetExperimentRequest(account_id="acc-1"))
    assert now.variant == "kmeans" and dict(now.traffic) == {"gmm": 0.0, "kmeans": 100.0}

    v2 = call(stub, "SetFlag", fpb.SetFlagRequest(kill_switch=True, reason="incident 42"))
    assert v2.version == 2
    killed = call(stub, "GetExperiment", fpb.GetExperimentRequest(account_id="acc-1"))
    assert killed.kill_switch and killed.variant == "gmm"
    assert dict(killed.traffic) == {"gmm": 0.0, "kmeans": 100.0}  # the split is kept for later

    cases = [
        (fpb.SetFlagRequest(traffic={"gmm": 50.0, "kmeans": 40.0}, reason="r"), "traffic"),
        (fpb.SetFlagRequest(traffic={"gmm": 50.0, "dbscan": 50.0}, reason="r"), "traffic.dbscan"),
        (fpb.SetFlagRequest(traffic={"kmeans": 100.0}, reason="r"), "traffic"),  # control missing
        (fpb.SetFlagRequest(traffic={"gmm": 50.0, "kmeans": 50.0}), "reason"),
    ]
    for request, field in cases:
        assert error_of(stub, "SetFlag", request) == (grpc.StatusCode.INVALID_ARGUMENT, field), request
    assert error_of(stub, "GetExperiment", fpb.GetExperimentRequest(account_id="not valid")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "account_id")


def test_experiment_results_per_variant(stub):
    predictions = [prediction(f"x{i}", variant="kmeans" if i < 10 else "gmm") for i in range(20)]
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=predictions))
    for i in range(20):
        wrong = i < 5  # kmeans: 5 of 10 right; gmm: 10 of 10 right
        call(stub, "RecordFeedback", feedback(f"f{i}", f"x{i}",
                                              fpb.FEEDBACK_KIND_EXPLICIT_CORRECT if wrong else
                                              fpb.FEEDBACK_KIND_EXPLICIT_CONFIRM, "p2" if wrong else ""))
    r = call(stub, "GetExperiment", fpb.GetExperimentRequest())
    assert r.variant == ""
    results = {v.variant: v for v in r.results}
    assert (results["kmeans"].n, results["kmeans"].accuracy) == (10, 0.5)
    assert (results["gmm"].n, results["gmm"].accuracy) == (10, 1.0)
    # Pooled two-proportion z-test by hand: p = 0.75, se = sqrt(0.75 * 0.25 * (1/10 + 1/10)).
    z = 0.5 / math.sqrt(0.75 * 0.25 * 0.2)
    assert r.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-6)


def _digest(ids: list[str]) -> bytes:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).digest()


def test_erase_counts_digest_idempotency_and_errors(stub):
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[
        prediction("e1"), prediction("e2"), prediction("o1", account="acc-other")]))
    call(stub, "RecordFeedback", feedback("g1", "e1"))
    call(stub, "RecordFeedback", feedback("g2", "o1"))
    scope = common_pb2.ErasureScope(account_id="acc-1", household=True)
    result = call(stub.data, "Erase", common_pb2.EraseRequest(scope=scope, job_id="job-1")).result
    assert result.service == "feedback" and not result.already_erased
    assert dict(result.deleted_counts) == {"predictions": 2, "feedback": 1}
    assert result.deleted_ids_sha256 == _digest(["predictions:e1", "predictions:e2", "feedback:g1"])
    repeat = call(stub.data, "Erase", common_pb2.EraseRequest(scope=scope, job_id="job-1")).result
    assert repeat.already_erased and not any(repeat.deleted_counts.values())
    # The other household is untouched: its feedback still counts.
    assert error_of(stub, "RecordFeedback", feedback("g3", "e1"))[0] == grpc.StatusCode.NOT_FOUND
    assert not call(stub, "RecordFeedback", feedback("g4", "o1")).duplicate

    assert error_of(stub.data, "Erase", common_pb2.EraseRequest()) == (grpc.StatusCode.INVALID_ARGUMENT, "scope")
    assert error_of(stub.data, "Erase", common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="acc-1"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "scope.target")


def test_export_account_over_grpc_holds_the_households_predictions_and_feedback(stub):
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[
        prediction("x1"), prediction("x2"), prediction("y1", account="acc-other")]))
    call(stub, "RecordFeedback", feedback("fx1", "x1"))
    document = json.loads(call(stub.data, "ExportAccount", common_pb2.ExportAccountRequest(account_id="acc-1")).json)
    assert sorted(p["prediction_id"] for p in document["predictions"]) == ["x1", "x2"]
    assert [f["feedback_id"] for f in document["feedback"]] == ["fx1"]
    # Everything the prediction row holds about the household is in the export (until
    # session 19 its device and session times were held but not exported).
    held = prediction("x3")
    held.device_id, held.model_sessions = "tv-x3", 42
    held.session_start.CopyFrom(float_to_ts(1_700_000_000.0))
    held.session_end.CopyFrom(float_to_ts(1_700_000_600.0))
    call(stub, "RecordPrediction", fpb.RecordPredictionRequest(predictions=[held]))
    document = json.loads(call(stub.data, "ExportAccount", common_pb2.ExportAccountRequest(account_id="acc-1")).json)
    x3 = next(p for p in document["predictions"] if p["prediction_id"] == "x3")
    assert (x3["device_id"], x3["session_start"], x3["session_end"], x3["model_sessions"]) == (
        "tv-x3", 1_700_000_000.0, 1_700_000_600.0, 42)
    assert error_of(stub.data, "ExportAccount", common_pb2.ExportAccountRequest(account_id="acc 1")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "account_id")


def test_calibrators_are_listed_and_rolled_back_over_grpc(stub):
    listed = call(stub, "ListCalibrators", fpb.ListCalibratorsRequest(variant="kmeans"))
    assert (listed.current_version, listed.held, list(listed.versions)) == (0, False, [])
    # Version 0 is "none" (identity): allowed, and holds automatic refits.
    chosen = call(stub, "ActivateCalibrator", fpb.ActivateCalibratorRequest(
        variant="kmeans", version=0, hold=True, reason="identity while the refit is checked"))
    assert (chosen.version, chosen.choice_version) == (0, 1)
    assert call(stub, "ListCalibrators", fpb.ListCalibratorsRequest(variant="kmeans")).held
    assert error_of(stub, "ActivateCalibrator", fpb.ActivateCalibratorRequest(
        variant="kmeans", version=9, hold=True, reason="no such version"))[0] == grpc.StatusCode.NOT_FOUND
    assert error_of(stub, "ActivateCalibrator", fpb.ActivateCalibratorRequest(
        variant="kmeans", version=0, hold=False, reason="")) == (grpc.StatusCode.INVALID_ARGUMENT, "reason")
