"""Configuration validation names the variable; the error table maps every domain error."""

from __future__ import annotations

import grpc
import pytest

from services.common import config, errors


def test_invalid_variable_is_named(monkeypatch):
    monkeypatch.setenv("HEARTH_GRPC_PORT", "70000")
    with pytest.raises(config.ConfigError) as info:
        config.load()
    assert "HEARTH_GRPC_PORT" in str(info.value)


def test_postgres_requires_dsn(monkeypatch):
    monkeypatch.setenv("HEARTH_STORAGE", "postgres")
    monkeypatch.delenv("HEARTH_POSTGRES_DSN", raising=False)
    with pytest.raises(config.ConfigError) as info:
        config.load()
    assert "HEARTH_POSTGRES_DSN" in str(info.value)


def test_defaults_resolve_per_service():
    s = config.load(service_name="privacy")
    assert (s.resolved_grpc_port, s.resolved_metrics_port) == config.DEFAULT_PORTS["privacy"]


@pytest.mark.parametrize("error_type,status", [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_every_domain_error_has_its_status(error_type, status):
    assert errors.status_for(error_type("x", "f")) == status


def test_unexpected_errors_are_internal():
    assert errors.status_for(KeyError("x")) == grpc.StatusCode.INTERNAL


def test_every_hearth_error_subclass_is_in_the_table():
    mapped = {t for t, _ in errors.STATUS_BY_ERROR}
    assert set(errors.HearthError.__subclasses__()) <= mapped
