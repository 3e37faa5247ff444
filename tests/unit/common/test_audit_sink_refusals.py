"""The audit client's answer to each status the audit log (privacy's AppendAudit) can give
(session 23, left23): an outage or a refusal of the *sender* keeps the records (retried
with backoff, spooled to the disk outbox), a batch too large for one gRPC message is
split, a record the log refuses for itself is dropped — counted and logged — and never
blocks the records behind it, and a refused record costs a few sends, not one full batch
per record before it. Until session 23: RESOURCE_EXHAUSTED (a batch over the message
limit) was retried forever from the outbox, everything later queued behind it; a record
on which the log failed INTERNAL every time did the same; UNAUTHENTICATED (a key rotation
the log has not seen yet) dropped every record as "refused", the outbox's too, one send
each, without backoff; and a refused record 400 deep in the outbox took ~800 sends of
full batches to isolate."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from services.common import audit
from services.common.audit import AuditSink, MemoryAuditTransport
from services.common.identity import Principal, Role
from tests.helpers.waiting import wait_for

ALICE = Principal("alice", Role.ANALYST)


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Log(MemoryAuditTransport):
    """An audit log answering ``answer(records)`` (a status code, or None to take them)."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.calls: list[list[str]] = []

    def send(self, records):
        self.calls.append([r.resource for r in records])
        code = self.answer(records)
        if code is not None:
            raise _Status(code, "refused by the test's log")
        super().send(records)


def _dropped(component: str, reason: str) -> float:
    return audit.DROPPED.labels(component, reason)._value.get()


def _records(names) -> list[audit.AuditRecord]:
    return [audit.make_record(audit.ASSIGN, name, principal=ALICE) for name in names]


def _sink(log: _Log, component: str, outbox=None, **kwargs) -> AuditSink:
    options = dict(max_delay_s=0.01, backoff_s=0.001, max_backoff_s=0.005, max_spool_backoff_s=0.01,
                   sleep=lambda s: None)
    options.update(kwargs)
    return AuditSink(log, component=component, outbox=outbox, **options)


def _over(limit: int):
    """RESOURCE_EXHAUSTED for a batch of more than ``limit`` records (a message over
    HEARTH_GRPC_MAX_MESSAGE_BYTES: the client's core refuses it before sending)."""
    return lambda records: grpc.StatusCode.RESOURCE_EXHAUSTED if len(records) > limit else None


@pytest.mark.parametrize("with_outbox", [False, True])
def test_a_batch_too_large_for_one_message_is_split_not_retried_as_it_is(tmp_path, with_outbox):
    log = _Log(_over(8))
    outbox = audit.AuditOutbox(tmp_path / "o.db") if with_outbox else None
    component = f"t-split-{with_outbox}"
    sink = _sink(log, component, outbox, max_delay_s=0.2)
    before = sum(_dropped(component, r) for r in audit.DROP_REASONS)
    for i in range(30):   # one batch of 30 (within the 0.2 s window)
        sink.record(audit.ASSIGN, f"r{i}", principal=ALICE)
    wait_for(lambda: len(log.records) == 30, timeout_s=30, what="every record delivered", interval_s=0.02)
    sink.close()
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(30)]
    assert sum(_dropped(component, r) for r in audit.DROP_REASONS) == before
    assert len(log.calls) < 20


def _prefilled(tmp_path, names) -> audit.AuditOutbox:
    """An outbox holding ``names`` (spooled during an earlier outage, e.g. before a restart)."""
    outbox = audit.AuditOutbox(tmp_path / "o.db")
    outbox.put(_records(names))
    return outbox


def test_a_record_too_large_even_alone_is_dropped_counted_logged_and_does_not_block_the_outbox(tmp_path, caplog):
    names = [f"r{i}" for i in range(40)]
    names[17] = "huge"
    log = _Log(lambda records: grpc.StatusCode.RESOURCE_EXHAUSTED
               if any(r.resource == "huge" for r in records) else None)
    before = _dropped("t-huge", "refused")
    with caplog.at_level(logging.ERROR, logger="hearth.audit"):
        sink = _sink(log, "t-huge", _prefilled(tmp_path, names))
        sink.record(audit.ASSIGN, "later", principal=ALICE)
        wait_for(lambda: len(log.records) == 40, timeout_s=30, what="every other record delivered", interval_s=0.02)
        sink.close()
    assert [r.resource for r in log.records] == [n for n in names if n != "huge"] + ["later"]
    assert _dropped("t-huge", "refused") == before + 1
    assert any("RESOURCE_EXHAUSTED" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    assert "huge" not in caplog.text          # a resource names a household: not in the logs
    assert len(log.calls) < 40


def test_a_record_the_log_fails_on_every_time_is_isolated_and_does_not_block_the_outbox(tmp_path, caplog):
    """INTERNAL is retried (privacy's database may be failing), but a single record on
    which the log fails ``max_attempts`` times while the record after it is accepted is
    the record's fault: dropped (counted, logged), the rest go on."""
    names = [f"r{i}" for i in range(30)]
    names[5] = "poison"
    log = _Log(lambda records: grpc.StatusCode.INTERNAL if any(r.resource == "poison" for r in records) else None)
    before = _dropped("t-poison", "refused")
    with caplog.at_level(logging.ERROR, logger="hearth.audit"):
        sink = _sink(log, "t-poison", _prefilled(tmp_path, names), max_attempts=3)
        wait_for(lambda: len(log.records) == 29, timeout_s=30, what="every other record delivered", interval_s=0.02)
        sink.close()
    assert sorted(r.resource for r in log.records) == sorted(n for n in names if n != "poison")
    assert _dropped("t-poison", "refused") == before + 1
    assert any("INTERNAL" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    assert len(log.calls) < 40


def test_a_log_failing_on_everything_drops_nothing(tmp_path):
    """The same INTERNAL on every record (privacy's database failing) is an outage: no
    record is dropped, the outbox waits with backoff, and delivers once the log is back."""
    down = threading.Event()
    down.set()
    log = _Log(lambda records: grpc.StatusCode.INTERNAL if down.is_set() else None)
    outbox = _prefilled(tmp_path, [f"r{i}" for i in range(10)])
    sink = _sink(log, "t-internal", outbox, max_attempts=2, max_spool_backoff_s=0.02)
    before = sum(_dropped("t-internal", r) for r in audit.DROP_REASONS)
    wait_for(lambda: len(log.calls) >= 4, timeout_s=30, what="the outbox retried", interval_s=0.02)
    assert outbox.pending() == 10 and not log.records
    down.clear()
    wait_for(lambda: len(log.records) == 10, timeout_s=30, what="the outbox delivered", interval_s=0.02)
    sink.close()
    assert sum(_dropped("t-internal", r) for r in audit.DROP_REASONS) == before


_KIND_OF_EVERY_CODE = {
    # the log cannot take this sender's records now: keep them
    "UNAVAILABLE": audit.OUTAGE, "DEADLINE_EXCEEDED": audit.OUTAGE, "ABORTED": audit.OUTAGE,
    "CANCELLED": audit.OUTAGE, "UNAUTHENTICATED": audit.OUTAGE, "PERMISSION_DENIED": audit.OUTAGE,
    "UNIMPLEMENTED": audit.OUTAGE, "NOT_FOUND": audit.OUTAGE, "FAILED_PRECONDITION": audit.OUTAGE,
    # over the message limit: split
    "RESOURCE_EXHAUSTED": audit.TOO_LARGE,
    # a record of the batch refused: isolate it
    "INVALID_ARGUMENT": audit.REFUSED, "OUT_OF_RANGE": audit.REFUSED, "ALREADY_EXISTS": audit.REFUSED,
    # the log failing, or failing on a record: retry with backoff, isolate
    "INTERNAL": audit.SUSPECT, "UNKNOWN": audit.SUSPECT, "DATA_LOSS": audit.SUSPECT,
}


def test_every_status_code_has_its_answer():
    codes = {code.name for code in grpc.StatusCode} - {"OK"}
    assert codes == set(_KIND_OF_EVERY_CODE)
    assert {name: audit.answer_kind(_Status(grpc.StatusCode[name])) for name in codes} == _KIND_OF_EVERY_CODE


def test_the_local_transports_errors_have_the_same_answers():
    """Inside privacy the sink appends to the log directly: its domain errors read as
    their status codes; a ValueError is a refused record, anything else suspect."""
    from services.common import errors
    assert audit.answer_kind(errors.InvalidArgument("bad", "records[0]")) == audit.REFUSED
    assert audit.answer_kind(ValueError("bad")) == audit.REFUSED
    assert audit.answer_kind(errors.FailedPrecondition("audit store is not started")) == audit.OUTAGE
    assert audit.answer_kind(errors.Conflict("moving")) == audit.OUTAGE
    assert audit.answer_kind(errors.Unavailable("database")) == audit.OUTAGE
    assert audit.answer_kind(audit.TransientAuditError("down")) == audit.OUTAGE
    assert audit.answer_kind(TimeoutError()) == audit.SUSPECT
    assert audit.answer_kind(RuntimeError("a bug")) == audit.SUSPECT


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.FAILED_PRECONDITION])
def test_a_log_that_refuses_the_sender_keeps_the_records(tmp_path, code):
    """A refusal of the sender, not of a record (a key rotation the log has not seen yet,
    an address pointing at another service, a log not started): the records wait in the
    outbox, with backoff, and are delivered once the log takes them."""
    refusing = threading.Event()
    refusing.set()
    log = _Log(lambda records: code if refusing.is_set() else None)
    component = f"t-sender-{code.name}"
    outbox = _prefilled(tmp_path, [f"old{i}" for i in range(20)])
    sink = _sink(log, component, outbox, max_spool_backoff_s=0.02)
    before = sum(_dropped(component, r) for r in audit.DROP_REASONS)
    for i in range(5):
        sink.record(audit.ASSIGN, f"new{i}", principal=ALICE)
    wait_for(lambda: len(log.calls) >= 4, timeout_s=30, what="the log refused a few times", interval_s=0.02)
    assert sink.flush(10)
    calls = len(log.calls)
    time.sleep(0.2)
    assert len(log.calls) - calls < 40       # backoff, not a loop
    assert outbox.pending() == 25 and not log.records
    refusing.clear()
    wait_for(lambda: len(log.records) == 25, timeout_s=30, what="every record delivered", interval_s=0.02)
    sink.close()
    assert [r.resource for r in log.records] == [f"old{i}" for i in range(20)] + [f"new{i}" for i in range(5)]
    assert sum(_dropped(component, r) for r in audit.DROP_REASONS) == before


def test_a_refused_record_deep_in_the_outbox_costs_a_few_sends(tmp_path):
    """INVALID_ARGUMENT (the log's validation) refuses a record: it is dropped, the others
    delivered, in a number of sends that grows with the log of the batch, not its size."""
    names = [f"r{i}" for i in range(500)]
    names[400] = "bad"
    log = _Log(lambda records: grpc.StatusCode.INVALID_ARGUMENT if any(r.resource == "bad" for r in records)
               else None)
    before = _dropped("t-deep", "refused")
    sink = _sink(log, "t-deep", _prefilled(tmp_path, names))
    wait_for(lambda: len(log.records) == 499, timeout_s=60, what="every other record delivered", interval_s=0.02)
    # The outbox empty again, the sink's thread waits for records (it does not loop).
    rounds, take = [], sink._take_batch
    sink._take_batch = lambda *args: rounds.append(1) or take(*args)
    time.sleep(0.3)
    assert len(rounds) < 30, len(rounds)
    sink.close()
    assert [r.resource for r in log.records] == [n for n in names if n != "bad"]
    assert _dropped("t-deep", "refused") == before + 1
    assert len(log.calls) < 40, len(log.calls)


def test_the_outbox_is_bounded_and_what_it_cannot_hold_is_counted(tmp_path, caplog):
    """The outbox shares the data directory with the service's own store: past
    ``max_outbox`` records a batch is dropped as ``outbox_full`` (counted, logged), not
    written until the disk is full. The oldest records are kept."""
    log = _Log(lambda records: grpc.StatusCode.UNAVAILABLE)
    outbox = _prefilled(tmp_path, [f"old{i}" for i in range(4)])
    before = _dropped("t-bound", "outbox_full")
    with caplog.at_level(logging.ERROR, logger="hearth.audit"):
        sink = _sink(log, "t-bound", outbox, max_outbox=6)
        for i in range(5):
            sink.record(audit.ASSIGN, f"new{i}", principal=ALICE)
        assert sink.flush(10)
        sink.close()
    assert [r.resource for _, r in audit.AuditOutbox(tmp_path / "o.db").oldest(10)] == \
        [f"old{i}" for i in range(4)] + ["new0", "new1"]
    assert _dropped("t-bound", "outbox_full") == before + 3
    assert "audit outbox full" in caplog.text
