"""Trace export configuration: standard OTEL_* variables, clear errors, resources."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

from gateway.config import GatewaySettings
from services.common import config, telemetry


def test_protocol_follows_the_standard_variables():
    assert telemetry.otlp_protocol({}) == "http/protobuf"           # the spec's default
    assert telemetry.otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    # The signal-specific variable wins over the general one.
    assert telemetry.otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}) == "http/protobuf"


def test_unsupported_protocol_names_the_variable():
    with pytest.raises(SystemExit, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        telemetry.otlp_protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_exporter_class_per_protocol():
    grpc_exporter = telemetry.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    http_exporter = telemetry.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert type(grpc_exporter).__module__.endswith("grpc.trace_exporter")
    assert type(http_exporter).__module__.endswith("http.trace_exporter")


def test_otlp_is_batched_off_the_request_path_and_jsonl_is_synchronous(tmp_path):
    assert isinstance(telemetry.span_processor("otlp"), BatchSpanProcessor)
    assert isinstance(telemetry.span_processor(f"jsonl:{tmp_path}/s.jsonl"), SimpleSpanProcessor)
    assert telemetry.span_processor("none") is None


def test_resource_names_service_and_version_and_operator_overrides(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    attrs = telemetry.service_resource("feedback").attributes
    assert attrs["service.name"] == "feedback" and attrs["service.namespace"] == "hearth"
    assert attrs["service.version"] not in ("", "unknown")
    assert attrs["deployment.environment"] == "staging"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "feedback-canary")
    assert telemetry.service_resource("feedback").attributes["service.name"] == "feedback-canary"


@pytest.mark.parametrize("value", ["otlp", "none", "console", "jsonl:/tmp/x"])
def test_trace_export_values_accepted(value):
    assert config.load(service_name="clustering", trace_export=value).trace_export == value
    assert GatewaySettings(trace_export=value).trace_export == value


def test_bad_trace_export_names_the_variable():
    with pytest.raises(config.ConfigError, match="HEARTH_TRACE_EXPORT"):
        config.load(service_name="clustering", trace_export="zipkin")
    with pytest.raises(ValueError, match="otlp"):
        GatewaySettings(trace_export="jsonl:")


def test_safe_span_keeps_only_the_code_of_a_gateway_call_error():
    """The gateway's client spans (gateway/clients.py) fail with grpc.aio errors whose
    details name values; the span keeps the code (or the exception type), no text."""
    import grpc
    import pytest
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="account_id: unknown account 'acc-secret-5'")
    with pytest.raises(grpc.aio.AioRpcError), telemetry.safe_span(tracer, "clustering/GetHousehold"):
        raise error
    with pytest.raises(ValueError), telemetry.safe_span(tracer, "other"):
        raise ValueError("household acc-secret-5")
    first, second = exporter.get_finished_spans()
    assert first.status.description == "NOT_FOUND" and second.status.description == "ValueError"
    assert not first.events and not second.events
    assert "acc-secret-5" not in repr([dict(s.attributes or {}) for s in (first, second)])
