"""The dependency monitor's checks are bounded (services/common/health_report.py,
DependencyMonitor): a probe that hangs — a database whose processes are stopped answers
nothing, not an error — is a failing dependency after the check's budget, the monitor
keeps publishing, and the hung probe is not started again while it is still running."""

from __future__ import annotations

import threading
import time

from grpc_health.v1 import health_pb2

from services.common import health_report
from services.common.health_report import Check, DependencyMonitor, ReportingHealthServicer


class _Monitor(DependencyMonitor):
    def __init__(self, items, timeout_s):
        super().__init__(ReportingHealthServicer(), ["hearth.x.v1.X"], 60.0, check_timeout_s=timeout_s)
        self.items = items

    def check_once(self):
        original = health_report.checks
        health_report.checks = lambda: self.items
        try:
            return super().check_once()
        finally:
            health_report.checks = original


def test_a_hung_critical_probe_sets_not_serving_after_its_budget_and_is_not_started_twice():
    release, calls = threading.Event(), []

    def hung():
        calls.append(1)
        release.wait(30)
        return ""

    monitor = _Monitor([Check("database", hung, True), Check("peer y", lambda: "", False)], timeout_s=0.3)
    try:
        started = time.monotonic()
        serving, reasons = monitor.check_once()
        assert time.monotonic() - started < 10
        assert not serving and reasons == ["database: no answer in 0 s"], reasons
        assert monitor._servicer._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
        serving, reasons = monitor.check_once()   # still hung: reported at once, not probed again
        assert not serving and reasons[0].startswith("database: no answer in") and len(calls) == 1
        release.set()
        deadline = time.monotonic() + 30
        while True:   # the hung probe returns, and its answer counts
            serving, reasons = monitor.check_once()
            if serving or time.monotonic() > deadline:
                break
        assert serving and reasons == []
        assert monitor.check_once() == (True, []) and len(calls) == 2   # then a fresh probe each time
        assert monitor._servicer._server_status[""] == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        monitor.stop()


def test_a_check_racing_stop_publishes_nothing_and_raises_nothing():
    monitor = _Monitor([Check("database", lambda: "", True)], timeout_s=1.0)
    assert monitor.check_once() == (True, [])
    monitor.stop()   # the server is stopping: the pool is gone
    assert monitor.check_once() == (True, [])
