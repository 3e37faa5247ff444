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


def test_an_open_data_dir_of_the_process_is_warned_of_and_one_kubernetes_mounts_is_only_noted(tmp_path, caplog):
    """The process's own data dir open to others gets a WARNING (chmod 700 it); a directory
    another user owns (a pod's emptyDir: root's, 0777) only an INFO — the process cannot
    chmod it, and a warning at every pod start is noise (review25)."""
    import logging
    import os
    from pathlib import Path

    from services.common.config import warn_if_shared

    ours = tmp_path / "ours"
    ours.mkdir()
    ours.chmod(0o755)
    with caplog.at_level(logging.INFO, logger="hearth.config"):
        warn_if_shared(ours)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "chmod 700" in caplog.records[0].getMessage()

    caplog.clear()
    ours.chmod(0o700)
    with caplog.at_level(logging.INFO, logger="hearth.config"):
        warn_if_shared(ours)
    assert caplog.records == []

    if os.geteuid() == 0:
        mounted = tmp_path / "mounted"
        mounted.mkdir()
        mounted.chmod(0o777)
        os.chown(mounted, 4242, 4242)
        owner = 4242
    else:   # not root: /tmp is root's and open to all
        mounted, owner = Path("/tmp"), 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hearth.config"):
        warn_if_shared(mounted)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"uid {owner}" in caplog.records[0].getMessage()
