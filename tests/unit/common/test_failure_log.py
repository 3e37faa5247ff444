"""FailureLog (services/common/failure_log.py): a background loop's repeated identical
failures log one traceback, then a one-line summary with a count every summary_every_s,
and a line when the loop recovers; a different failure gets its own traceback."""

from __future__ import annotations

import logging

import pytest

from services.common.errors import Unavailable
from services.common.failure_log import FailureLog, failure_signature


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="hearth.test.failures")
    return caplog


def _records(caplog):
    return [r for r in caplog.records if r.name == "hearth.test.failures"]


def _fail(failures: FailureLog, exc: BaseException, key: str = "") -> None:
    try:
        raise exc
    except Exception:
        failures.failed(key=key)


def test_one_traceback_then_a_counted_summary_a_period_then_a_recovery_line(logged):
    clock = Clock()
    failures = FailureLog(logging.getLogger("hearth.test.failures"), "refresh", summary_every_s=60, clock=clock)
    for i in range(50):   # numbers in the message do not make a failure different
        _fail(failures, Unavailable(f"database unavailable: PoolTimeout after 3.{i} s"))
        clock.now += 1.0
    records = _records(logged)
    assert len(records) == 1 and records[0].exc_info is not None
    assert "refresh failed" in records[0].getMessage()
    # A minute after the first: one line, no traceback, with how many there were.
    clock.now += 10.0
    _fail(failures, Unavailable("database unavailable: PoolTimeout after 3.9 s"))
    records = _records(logged)
    assert len(records) == 2 and records[1].exc_info is None
    assert "still failing: 50 more times in the last 60 s (51 since 60 s ago)" in records[1].getMessage()
    assert "Unavailable" in records[1].getMessage()
    for _ in range(3):
        _fail(failures, Unavailable("database unavailable: PoolTimeout after 3.0 s"))
    assert len(_records(logged)) == 2
    failures.succeeded()
    records = _records(logged)
    assert len(records) == 3 and "refresh recovered after 54 failures" in records[2].getMessage()
    failures.succeeded()          # nothing to say while it keeps working
    assert len(_records(logged)) == 3
    _fail(failures, Unavailable("database unavailable: PoolTimeout after 3.0 s"))
    assert len(_records(logged)) == 4 and _records(logged)[3].exc_info is not None   # a new run


def test_a_different_failure_gets_its_traceback_and_keys_are_independent(logged):
    failures = FailureLog(logging.getLogger("hearth.test.failures"), "periodic step", clock=Clock())
    _fail(failures, Unavailable("database unavailable"), key="check_triggers")
    _fail(failures, Unavailable("database unavailable"), key="check_triggers")
    _fail(failures, Unavailable("database unavailable"), key="refresh_gauges")   # another step
    _fail(failures, ValueError("bad row"), key="check_triggers")                   # another failure
    records = _records(logged)
    assert [r.exc_info is not None for r in records] == [True, True, True]
    assert ["periodic step check_triggers failed", "periodic step refresh_gauges failed",
            "periodic step check_triggers failed"] == [r.getMessage().split(" (")[0] for r in records]
    failures.succeeded(key="refresh_gauges")
    assert "periodic step refresh_gauges recovered after 1 failures" in _records(logged)[-1].getMessage()


def test_the_signature_blanks_numbers_and_keeps_the_type():
    assert failure_signature(TimeoutError("no answer in 5.2 s")) == failure_signature(TimeoutError("no answer in 7 s"))
    assert failure_signature(TimeoutError("x")) != failure_signature(ValueError("x"))
