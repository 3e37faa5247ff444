"""Per service: health, reflection, an error mapped to its status code with the field,
calls without a principal refused, and per-RPC metrics recorded."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.attribution.v1 import attribution_pb2_grpc as apb_grpc
from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.pbutil import float_to_ts

from tests.conftest import ADMIN

# (service, full gRPC service name, a call that must fail with (code, field))
CASES = {
    "clustering": ("hearth.clustering.v1.ClusteringService",
                   lambda ch: cpb_grpc.ClusteringServiceStub(ch).GetHousehold(
                       cpb.GetHouseholdRequest(account_id="unknown-acc"), metadata=ADMIN.metadata("clustering"), timeout=30),
                   grpc.StatusCode.NOT_FOUND, "account_id"),
    "attribution": ("hearth.attribution.v1.AttributionService",
                    lambda ch: apb_grpc.AttributionServiceStub(ch).RecordTouchpoints(
                        apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
                            touchpoint_id="tp 1", account_id="a", device_id="d", channel="search",
                            ts=float_to_ts(1.7e9))]), metadata=ADMIN.metadata("attribution"), timeout=30),
                    grpc.StatusCode.INVALID_ARGUMENT, "touchpoints[0].touchpoint_id"),
    "privacy": ("hearth.privacy.v1.Consent",
                lambda ch: ppb_grpc.ConsentStub(ch).GetConsent(
                    ppb.GetConsentRequest(account_id=""), metadata=ADMIN.metadata("privacy"), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "account_id"),
    "feedback": ("hearth.feedback.v1.FeedbackService",
                 lambda ch: fpb_grpc.FeedbackServiceStub(ch).RecordPrediction(
                     fpb.RecordPredictionRequest(predictions=[fpb.Prediction(
                         prediction_id="p1", account_id="a", session_id="s", person_id="p1",
                         probabilities={"p1": 0.5, "p2": 0.2}, ts=float_to_ts(1.7e9))]),
                     metadata=ADMIN.metadata("feedback"), timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, "predictions[0].probabilities"),
}


# Every gRPC service each process serves (the privacy process: one per room; the data
# holders: their own API and the DataHolder erasure contract).
SERVED = {
    "clustering": {"hearth.clustering.v1.ClusteringService", "hearth.common.v1.DataHolder"},
    "attribution": {"hearth.attribution.v1.AttributionService", "hearth.common.v1.DataHolder"},
    "feedback": {"hearth.feedback.v1.FeedbackService", "hearth.common.v1.DataHolder"},
    "privacy": {"hearth.privacy.v1.Deletion", "hearth.privacy.v1.Consent", "hearth.privacy.v1.AuditLog",
                "hearth.privacy.v1.Keys"},
}


@pytest.mark.parametrize("name", sorted(SERVED))
def test_each_process_serves_exactly_its_services_and_health_for_each(start_service, name):
    _, channel = start_service(name)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed, = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert names - {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                    "grpc.reflection.v1.ServerReflection"} == SERVED[name]
    health = health_pb2_grpc.HealthStub(channel)
    for service in SERVED[name]:
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", sorted(CASES))
def test_health_is_serving(start_service, name):
    _, channel = start_service(name)
    stub = health_pb2_grpc.HealthStub(channel)
    full_name = CASES[name][0]
    for service in ("", full_name):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", sorted(CASES))
def test_reflection_lists_and_describes_the_service(start_service, name):
    _, channel = start_service(name)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    full_name = CASES[name][0]
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=full_name)]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {full_name, "grpc.health.v1.Health"} <= names
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0])
    assert full_name.rsplit(".", 1)[1] in [s.name for s in proto.service]


@pytest.mark.parametrize("name", sorted(CASES))
def test_domain_error_maps_to_status_with_field(start_service, name):
    _, channel = start_service(name)
    _, call, code, field = CASES[name]
    with pytest.raises(grpc.RpcError) as info:
        call(channel)
    assert info.value.code() == code
    assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == field
    errors = REGISTRY.get_sample_value(
        "hearth_rpc_errors_total",
        {"service": name, "method": _method(name), "code": code.name})
    assert errors and errors >= 1


def _method(name: str) -> str:
    return {"clustering": "GetHousehold", "attribution": "RecordTouchpoints",
            "privacy": "GetConsent", "feedback": "RecordPrediction"}[name]


def test_call_without_principal_is_refused(start_service):
    _, channel = start_service("clustering")
    stub = cpb_grpc.ClusteringServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetHousehold(cpb.GetHouseholdRequest(account_id="a"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.GetHousehold(cpb.GetHouseholdRequest(account_id="a"), timeout=30,
                          metadata=[("x-hearth-principal", "x"), ("x-hearth-role", "superuser")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_latency_histogram_per_rpc(start_service):
    privacy, _ = start_service("privacy")   # clustering checks consent and data keys with it
    _, channel = start_service("clustering", privacy_addr=f"127.0.0.1:{privacy.port}")
    stub = cpb_grpc.ClusteringServiceStub(channel)
    labels = {"service": "clustering", "method": "IngestEvents"}
    before = REGISTRY.get_sample_value("hearth_rpc_duration_seconds_count", labels) or 0
    event = cpb.ViewingEvent(event_id="e1", account_id="acc", device_id="tv", ts=float_to_ts(1.76e9),
                             device_type=cpb.DEVICE_TYPE_TV, kind=cpb.EVENT_KIND_PLAY_START, duration_s=10)
    response = stub.IngestEvents(iter([cpb.IngestEventsRequest(events=[event])]),
                                 metadata=ADMIN.metadata("clustering"), timeout=30)
    assert response.accepted == 1
    assert REGISTRY.get_sample_value("hearth_rpc_duration_seconds_count", labels) == before + 1


def test_bad_event_in_stream_rejects_whole_stream(start_service):
    _, channel = start_service("clustering")
    stub = cpb_grpc.ClusteringServiceStub(channel)
    good = cpb.ViewingEvent(event_id="ok1", account_id="acc", device_id="tv", ts=float_to_ts(1.76e9),
                            device_type=cpb.DEVICE_TYPE_TV, kind=cpb.EVENT_KIND_PLAY_START)
    bad = cpb.ViewingEvent(event_id="bad1", account_id="acc", device_id="tv", ts=float_to_ts(1.76e9),
                           kind=cpb.EVENT_KIND_PLAY_START)  # device_type missing
    with pytest.raises(grpc.RpcError) as info:
        stub.IngestEvents(iter([cpb.IngestEventsRequest(events=[good]), cpb.IngestEventsRequest(events=[bad])]),
                          metadata=ADMIN.metadata("clustering"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())[ERROR_FIELD_KEY] == "events[1].device_type"
    with pytest.raises(grpc.RpcError) as info:
        stub.GetHousehold(cpb.GetHouseholdRequest(account_id="acc"), metadata=ADMIN.metadata("clustering"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing of the stream was stored
