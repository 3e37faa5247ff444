"""The "security event" log lines are coalesced (services/common/identity.py,
``SecurityEventLog``): a flood of refusals of one kind from one principal is its first line
and then one line a window with the count, while the Prometheus counters and the listeners
(the audit log) still see every event. Until session 34 each refusal was a line of its own:
thousands of forged tokens wrote thousands of lines."""

from __future__ import annotations

import logging

import pytest

from services.common import identity
from services.common.identity import SecurityEvent, SecurityEventLog

WINDOW = identity.SECURITY_LOG_WINDOW_S


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[tuple[str, dict]]:
    return [(r.getMessage(), r.fields) for r in caplog.records if r.name == "hearth.identity"]


def _bad_token(principal: str = "", reason: str = "invalid_token") -> SecurityEvent:
    return SecurityEvent("authentication_failed", "clustering", reason, principal, "service" if principal else "")


def _sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_flood_of_forged_tokens_is_two_lines_and_every_event_is_counted(caplog, monkeypatch):
    """5,000 bad tokens within a window: the first logged whole at once, the other 4,999 as one
    line with their count when the window ends; hearth_auth_failures_total counts every one and the
    listener hears every one. Another principal's (or reason's) first refusal is not hidden by the
    flood: it has its own first line."""
    clock = Clock()
    monkeypatch.setattr(identity, "_security_log", SecurityEventLog(identity.log, clock=clock, background=False))
    heard: list[SecurityEvent] = []
    remove = identity.add_security_listener(heard.append)
    labels = {"component": "clustering", "reason": "invalid_token"}
    before = _sample("hearth_auth_failures_total", labels)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    try:
        for i in range(5000):
            clock.now = 1000.0 + i * (WINDOW - 1) / 5000
            identity.report_security_event(_bad_token())
        identity.report_security_event(_bad_token(principal="svc:mallory"))
        identity.report_security_event(_bad_token(reason="expired_token"))
        assert [(m, f["principal"], f["reason"]) for m, f in _lines(caplog)] == [
            ("security event", "", "invalid_token"), ("security event", "svc:mallory", "invalid_token"),
            ("security event", "", "expired_token")]
        clock.now = 1000.0 + WINDOW
        identity._security_log.flush()
    finally:
        remove()
    lines = _lines(caplog)
    assert len(lines) == 4, lines
    message, fields = lines[3]
    assert message == "security event repeated"
    assert (fields["event"], fields["component"], fields["reason"], fields["principal"], fields["repeats"],
            fields["window_s"]) == ("authentication_failed", "clustering", "invalid_token", "", 4999, WINDOW)
    assert _sample("hearth_auth_failures_total", labels) - before == 5001   # svc:mallory's too: every one
    assert len(heard) == 5002


def test_a_steady_flood_is_one_line_a_window_and_a_quiet_window_forgets_the_key(caplog):
    clock = Clock()
    events = SecurityEventLog(logging.getLogger("hearth.identity"), window_s=10, clock=clock, background=False)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    for second in range(35):   # one a second for 35 s: first, then windows of 9, 10, 10 repeats
        clock.now = 1000.0 + second
        events.event(_bad_token())
    clock.now = 1000.0 + 40
    events.flush()   # the last window (30-39 s): its 5 repeats
    assert [(m, f.get("repeats")) for m, f in _lines(caplog)] == [
        ("security event", None), ("security event repeated", 9), ("security event repeated", 10),
        ("security event repeated", 10), ("security event repeated", 5)]
    clock.now = 1000.0 + 50
    events.flush()   # a window without a repeat: nothing written, the key forgotten
    assert len(_lines(caplog)) == 5
    clock.now = 1000.0 + 51
    events.event(_bad_token())   # the flood's next event after the quiet window is logged whole
    assert _lines(caplog)[-1][0] == "security event"


def test_a_single_event_is_logged_at_once_and_never_summarised(caplog):
    clock = Clock()
    events = SecurityEventLog(logging.getLogger("hearth.identity"), clock=clock, background=False)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    events.event(SecurityEvent("permission_denied", "gateway", "not_in_matrix", "alice", "analyst",
                               "DELETE /v1/household/{account_id}"))
    clock.now += 10 * WINDOW
    events.flush()
    assert [(m, f["principal"], f["target"]) for m, f in _lines(caplog)] == [
        ("security event", "alice", "DELETE /v1/household/{account_id}")]


def test_the_keys_held_are_bounded_and_the_overflow_is_still_counted(caplog):
    """An attacker varying the claimed principal cannot grow the table, nor the log: past
    ``max_keys`` new keys share one per (kind, component, reason) with principal "*"."""
    clock = Clock()
    events = SecurityEventLog(logging.getLogger("hearth.identity"), max_keys=3, clock=clock, background=False)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    for i in range(100):
        events.event(_bad_token(principal=f"svc:forged{i}"))
    clock.now += WINDOW
    events.flush()
    assert [(m, f["principal"], f.get("repeats")) for m, f in _lines(caplog)] == [
        ("security event", "svc:forged0", None), ("security event", "svc:forged1", None),
        ("security event", "svc:forged2", None), ("security event", "*", None),
        ("security event repeated", "*", 96)]


def test_the_background_thread_writes_the_count_after_the_flood_stops(caplog):
    """Nobody calls flush: the log's own thread writes the count when the window ends."""
    import time

    events = SecurityEventLog(logging.getLogger("hearth.identity"), window_s=0.2)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    for _ in range(50):
        events.event(_bad_token())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_lines(caplog)) < 2:
        time.sleep(0.05)
    assert [(m, f.get("repeats")) for m, f in _lines(caplog)] == [
        ("security event", None), ("security event repeated", 49)]


def test_a_window_must_be_positive():
    with pytest.raises(ValueError, match="window_s"):
        SecurityEventLog(logging.getLogger("x"), window_s=0)


def test_a_table_full_of_ended_windows_makes_room_for_a_new_principals_first_refusal(caplog):
    """One-off refusals, none repeated within its window, start no background thread (it
    starts at a first repeat): until review34 nothing forgot their keys, so once the table
    was full a new principal's first refusal — hours later, no flood under way — was logged
    as principal "*" with no role and no target. A full table now first closes the windows
    that have ended; a table full of windows still open overflows as before."""
    clock = Clock()
    events = SecurityEventLog(logging.getLogger("hearth.identity"), max_keys=3, clock=clock, background=False)
    caplog.set_level(logging.WARNING, logger="hearth.identity")
    for i in range(3):
        events.event(SecurityEvent("permission_denied", "gateway", "not_in_matrix", f"user{i}", "analyst", "GET /x"))
        clock.now += 2 * WINDOW
    clock.now += 3600
    events.event(SecurityEvent("permission_denied", "gateway", "not_in_matrix", "mallory", "analyst",
                               "DELETE /v1/household/{account_id}"))
    assert [(f["principal"], f["role"], f["target"]) for _, f in _lines(caplog)][-1] == (
        "mallory", "analyst", "DELETE /v1/household/{account_id}")
    for i in range(3):   # mallory's window and two new ones fill the table, all still open
        events.event(SecurityEvent("permission_denied", "gateway", "not_in_matrix", f"new{i}", "analyst", "GET /x"))
    assert [f["principal"] for _, f in _lines(caplog)][-3:] == ["new0", "new1", "*"]
