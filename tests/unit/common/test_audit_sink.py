"""The audit client: batching, bounded queue, retries, flush, the RPC -> event table."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common import audit, identity
from services.common.audit import AuditSink, MemoryAuditTransport, TransientAuditError
from services.common.identity import Principal, Role

ALICE = Principal("alice", Role.ANALYST)


class _Recording(MemoryAuditTransport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def send(self, records):
        self.calls.append(len(records))
        super().send(records)


def _dropped(component: str, reason: str) -> float:
    return audit.DROPPED.labels(component, reason)._value.get()


def test_records_arrive_in_bounded_batches_and_flush_waits_for_them():
    transport = _Recording()
    sink = AuditSink(transport, component="t-batch", max_batch=100, max_delay_s=0.01)
    for i in range(1050):
        assert sink.record(audit.READ_HOUSEHOLD, f"household:a{i}", principal=ALICE)
    assert sink.flush(10)
    sink.close()
    assert len(transport.records) == 1050
    assert max(transport.calls) <= 100
    assert [r.resource for r in transport.records] == [f"household:a{i}" for i in range(1050)]
    assert len({r.record_id for r in transport.records}) == 1050


def test_records_of_one_window_go_in_one_batch_and_a_full_batch_does_not_wait():
    # The sink thread is woken when a record reaches an empty queue or a batch fills,
    # not per record: what arrives during the max_delay_s window is one send.
    transport = _Recording()
    sink = AuditSink(transport, component="t-window", max_batch=50, max_delay_s=0.5)
    try:
        for i in range(20):
            sink.record(audit.READ_HOUSEHOLD, f"household:w{i}", principal=ALICE)
        assert sink.flush(5)
        assert transport.calls == [20]
        # A full batch is sent at once, long before a 30 s window would end.
        slow = AuditSink(transport, component="t-window-full", max_batch=10, max_delay_s=30)
        started = time.monotonic()
        for i in range(10):
            slow.record(audit.READ_HOUSEHOLD, f"household:f{i}", principal=ALICE)
        assert slow.flush(5) and time.monotonic() - started < 5
        assert transport.calls == [20, 10]
        slow.close()
        # And a lone record waits at most about the window.
        started = time.monotonic()
        sink.record(audit.READ_HOUSEHOLD, "household:lone", principal=ALICE)
        assert sink.flush(5) and time.monotonic() - started < 2.5
        assert transport.calls == [20, 10, 1]
    finally:
        sink.close()


def test_principal_and_trace_come_from_the_context():
    transport = MemoryAuditTransport()
    sink = AuditSink(transport, component="t-ctx", max_delay_s=0)
    token = identity.set_current(ALICE)
    try:
        sink.record(audit.EXPORT, "household:h1", details={"record_count": 3})
    finally:
        identity.reset_current(token)
    sink.record(audit.KEY_ROTATION, "kek:k2")  # outside an RPC: the service itself
    sink.close()
    first, second = transport.records
    assert (first.principal, first.role) == ("alice", "analyst")
    assert json.loads(first.details_json) == {"record_count": 3}  # types kept
    assert (second.principal, second.role) == ("svc:t-ctx", "service")


def test_details_are_frozen_when_recorded():
    transport = MemoryAuditTransport()
    sink = AuditSink(transport, component="t-freeze", max_delay_s=0.05)
    details = {"n": 1}
    sink.record(audit.FEEDBACK, details=details, principal=ALICE)
    details["n"] = 2
    sink.close()
    assert json.loads(transport.records[0].details_json) == {"n": 1}


@pytest.mark.parametrize("kwargs, field", [
    ({"event_type": "nope"}, "event_type"),
    ({"event_type": audit.ASSIGN, "outcome": "maybe"}, "outcome"),
    ({"event_type": audit.ASSIGN, "details": {"x": float("nan")}}, "details"),
    ({"event_type": audit.ASSIGN, "details": {"x": object()}}, "details"),
    ({"event_type": audit.ASSIGN, "details": ["not", "a", "mapping"]}, "details"),
])
def test_bad_records_are_refused_naming_the_argument(kwargs, field):
    sink = AuditSink(MemoryAuditTransport(), component="t-bad")
    try:
        with pytest.raises(ValueError, match=f"^{field}"):
            sink.record(principal=ALICE, **kwargs)
    finally:
        sink.close()


def test_ok_is_accepted_for_success_and_long_text_is_truncated():
    record = audit.make_record(audit.ASSIGN, "r" * 5000, "ok", principal=ALICE)
    assert record.outcome == "success"
    assert len(record.resource) == audit.MAX_TEXT


def test_full_queue_drops_and_counts():
    release = threading.Event()

    class Blocking(MemoryAuditTransport):
        def send(self, records):
            release.wait(10)
            super().send(records)

    transport = Blocking()
    sink = AuditSink(transport, component="t-full", max_batch=1, max_queue=5, max_delay_s=0)
    before = _dropped("t-full", "queue_full")
    results = [sink.record(audit.INGEST, principal=ALICE) for _ in range(50)]
    # one record may be in the blocked send, five in the queue: the rest are refused
    assert results.count(True) <= 6 and results.count(False) >= 44
    assert _dropped("t-full", "queue_full") - before == results.count(False)
    release.set()
    sink.close()
    assert len(transport.records) == results.count(True)


def test_transient_failures_are_retried_with_the_same_record_ids():
    sleeps: list[float] = []

    class Flaky(MemoryAuditTransport):
        attempts: list[list[str]] = []

        def send(self, records):
            self.attempts.append([r.record_id for r in records])
            if len(self.attempts) <= 2:
                raise TransientAuditError("log unavailable")
            super().send(records)

    transport = Flaky()
    sink = AuditSink(transport, component="t-retry", max_delay_s=0.02, backoff_s=0.1, sleep=sleeps.append)
    for _ in range(3):
        sink.record(audit.ASSIGN, principal=ALICE)
    assert sink.flush(5)
    sink.close()
    assert len(transport.records) == 3
    assert transport.attempts[0] == transport.attempts[1] == transport.attempts[2]
    assert sleeps == [0.1, 0.2]


def test_a_refused_record_does_not_take_its_batch_down():
    class Picky(MemoryAuditTransport):
        def send(self, records):
            if any(r.resource == "bad" for r in records):
                raise ValueError("refused")
            super().send(records)

    transport = Picky()
    sink = AuditSink(transport, component="t-picky", max_delay_s=0.05)
    before = _dropped("t-picky", "refused")
    for resource in ["a", "bad", "c"]:
        sink.record(audit.ASSIGN, resource, principal=ALICE)
    sink.close()
    assert [r.resource for r in transport.records] == ["a", "c"]
    assert _dropped("t-picky", "refused") - before == 1


def test_giving_up_after_max_attempts_counts_the_loss():
    # A log failing on the batch (INTERNAL, a local error: SUSPECT) max_attempts times:
    # dropped, counted. (A log that cannot take records now, an OUTAGE, keeps them in
    # memory instead: test_a_log_that_cannot_take_records_keeps_them_in_memory_...)
    class Failing(MemoryAuditTransport):
        def send(self, records):
            raise RuntimeError("the log fails on it")

    sink = AuditSink(Failing(), component="t-down", max_attempts=3, sleep=lambda s: None, max_delay_s=0)
    before = _dropped("t-down", "send_failed")
    sink.record(audit.ASSIGN, principal=ALICE)
    assert sink.flush(5)
    sink.close()
    assert _dropped("t-down", "send_failed") - before == 1
    assert sink.dropped == 1 and sink.sent == 0


def test_close_flushes_what_is_queued_and_later_records_are_dropped():
    transport = MemoryAuditTransport()
    sink = AuditSink(transport, component="t-close", max_delay_s=1.0, max_batch=10_000)
    for _ in range(20):
        sink.record(audit.ASSIGN, principal=ALICE)
    sink.close()
    assert len(transport.records) == 20
    assert sink.record(audit.ASSIGN, principal=ALICE) is False


# ------------------------------------------------------------------------- the table


def _all_rpcs() -> set[str]:
    from hearth.attribution.v1 import attribution_pb2
    from hearth.clustering.v1 import clustering_pb2
    from hearth.common.v1 import common_pb2
    from hearth.feedback.v1 import feedback_pb2
    from hearth.privacy.v1 import privacy_pb2

    return {f"/{service.full_name}/{method.name}"
            for module in (clustering_pb2, attribution_pb2, privacy_pb2, feedback_pb2, common_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods}


def test_every_rpc_has_an_audit_decision():
    rpcs = _all_rpcs()
    assert rpcs - set(audit.RPC_EVENTS) == set(), "new RPCs need an entry in audit.RPC_EVENTS"
    for method, spec in audit.RPC_EVENTS.items():
        for event in (spec if isinstance(spec, tuple) else (spec,)):
            assert event is None or event in audit.EVENT_TYPES, method


def test_vocabulary_matches_the_log_domain():
    from services.privacy.audit.domain import EventType, Outcome

    assert audit.EVENT_TYPES == {e.value for e in EventType}
    assert audit.OUTCOMES == {o.value for o in Outcome}
    assert len(audit.EVENT_TYPES) >= 15


@pytest.mark.parametrize("method, code, expected", [
    ("/hearth.clustering.v1.ClusteringService/GetHousehold", grpc.StatusCode.OK, "read_household"),
    ("/hearth.clustering.v1.ClusteringService/GetHousehold", grpc.StatusCode.PERMISSION_DENIED,
     "permission_denied"),
    ("/hearth.privacy.v1.AuditLog/AppendAudit", grpc.StatusCode.UNAUTHENTICATED,
     "authentication_failure"),
    ("/hearth.privacy.v1.AuditLog/AppendAudit", grpc.StatusCode.OK, None),
    ("/hearth.privacy.v1.AuditLog/QueryAudit", grpc.StatusCode.OK, "audit_export"),
    ("/hearth.common.v1.DataHolder/Erase", grpc.StatusCode.OK, "deletion_completed"),
    ("/hearth.common.v1.DataHolder/Erase", grpc.StatusCode.UNAVAILABLE, "deletion_failed"),
    ("/unknown.Service/Method", grpc.StatusCode.OK, None),
])
def test_event_for(method, code, expected):
    assert audit.event_for(method, code) == expected


@pytest.fixture
def memory_sink():
    transport = MemoryAuditTransport()
    sink = AuditSink(transport, component="t-rpc", max_delay_s=0)
    previous = audit.install(sink)
    yield transport, sink
    audit.install(previous)
    sink.close()


def test_record_rpc_takes_resource_from_the_request_and_outcome_from_the_status(memory_sink):
    from hearth.clustering.v1 import clustering_pb2 as cpb
    from hearth.common.v1 import common_pb2

    transport, sink = memory_sink
    audit.record_rpc("clustering", "/hearth.clustering.v1.ClusteringService/GetHousehold",
                     cpb.GetHouseholdRequest(account_id="acc-9"), ALICE, [], grpc.StatusCode.NOT_FOUND, "ab" * 16)
    erase = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="acc-3", household=True))
    audit.record_rpc("clustering", "/hearth.common.v1.DataHolder/Erase", erase,
                     identity.service_principal("privacy"), [], grpc.StatusCode.OK, "")
    audit.record_rpc("clustering", "/hearth.clustering.v1.ClusteringService/IngestEvents",
                     iter([]), ALICE, [], grpc.StatusCode.INTERNAL, "")
    sink.flush(5)
    read, erased, ingest = transport.records
    assert (read.event_type, read.resource, read.outcome, read.trace_id) == (
        "read_household", "household:acc-9", "failure", "ab" * 16)
    assert (erased.event_type, erased.resource, erased.principal) == (
        "deletion_completed", "household:acc-3", "svc:privacy")
    assert (ingest.resource, ingest.outcome) == ("", "error")


def test_a_handlers_details_go_to_its_own_rpcs_record_only(memory_sink):
    """``add_rpc_details`` (SetConsent's flags): merged into the record of the call being
    served, never over rpc / code / component, and gone for the thread's next call —
    audited or not."""
    from hearth.privacy.v1 import privacy_pb2 as ppb

    transport, sink = memory_sink
    set_consent = "/hearth.privacy.v1.Consent/SetConsent"
    request = ppb.SetConsentRequest(account_id="acc-5")
    audit.add_rpc_details(processing=False, attribution=True, rpc="forged")
    audit.record_rpc("privacy", set_consent, request, ALICE, [], grpc.StatusCode.OK, "")
    audit.add_rpc_details(processing=True)
    audit.record_rpc("privacy", "/hearth.privacy.v1.Consent/GetConsent", request, ALICE, [], grpc.StatusCode.OK, "")
    audit.record_rpc("privacy", set_consent, request, ALICE, [], grpc.StatusCode.OK, "")
    sink.flush(5)
    first, second = (json.loads(r.details_json) for r in transport.records)
    assert first == {"processing": False, "attribution": True, "rpc": set_consent.lstrip("/"), "code": "OK",
                     "component": "privacy"}
    assert second == {"rpc": set_consent.lstrip("/"), "code": "OK", "component": "privacy"}


def test_unauthenticated_calls_record_the_claimed_principal(memory_sink):
    transport, sink = memory_sink
    metadata = [(identity.PRINCIPAL_KEY, "mallory"), (identity.ROLE_KEY, "admin")]
    audit.record_rpc("privacy", "/hearth.privacy.v1.AuditLog/QueryAudit", None, None, metadata,
                     grpc.StatusCode.UNAUTHENTICATED, "")
    audit.record_rpc("privacy", "/hearth.privacy.v1.AuditLog/QueryAudit", None, None,
                     [(identity.PRINCIPAL_KEY, "bad id with spaces")], grpc.StatusCode.UNAUTHENTICATED, "")
    sink.flush(5)
    claimed, anonymous = transport.records
    assert (claimed.event_type, claimed.principal, claimed.outcome) == (
        "authentication_failure", "mallory", "denied")
    details = json.loads(claimed.details_json)
    assert details["authenticated"] == "false" and details["claimed_role"] == "admin"
    assert claimed.role == audit.UNAUTHENTICATED_ROLE  # never the claimed admin role
    assert anonymous.principal == audit.ANONYMOUS


def test_security_listener_records_gateway_refusals_only(memory_sink):
    transport, sink = memory_sink
    listener = audit.security_listener("gateway")
    listener(identity.SecurityEvent("authentication_failed", "gateway", "unknown_api_key",
                                    target="GET /v1/household/{account_id}"))
    listener(identity.SecurityEvent("permission_denied", "gateway", "not_in_matrix", "ana", "analyst",
                                    "GET /v1/audit"))
    listener(identity.SecurityEvent("rate_limited", "gateway", "bucket", "ana", "analyst", "POST /v1/events"))
    listener(identity.SecurityEvent("authentication_failed", "clustering", "bad_token"))
    sink.flush(5)
    failure, denial = transport.records
    assert (failure.event_type, failure.principal, failure.resource) == (
        "authentication_failure", "anonymous", "route:GET /v1/household/{account_id}")
    assert (denial.event_type, denial.principal, denial.role, denial.outcome) == (
        "permission_denied", "ana", "analyst", "denied")


def test_record_rpc_is_a_no_op_without_a_sink():
    assert not audit.installed()
    audit.record_rpc("x", "/hearth.clustering.v1.ClusteringService/GetHousehold", None, ALICE, [],
                     grpc.StatusCode.OK, "")  # must not raise


class _Switch(MemoryAuditTransport):
    """An audit log that is down until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()

    def send(self, records):
        if not self.up.is_set():
            raise TransientAuditError("log unavailable")
        super().send(records)


def test_an_unreachable_log_loses_nothing_records_wait_in_the_disk_outbox_across_a_restart(tmp_path):
    outbox_path = tmp_path / "audit-outbox-t.db"
    down = _Switch()
    sink = AuditSink(down, component="t-outbox", max_delay_s=0.01, backoff_s=0.01, max_spool_backoff_s=0.05,
                     outbox=audit.AuditOutbox(outbox_path))
    before = _dropped("t-outbox", "send_failed")
    for i in range(300):   # far longer than the retries of a sink without outbox
        sink.record(audit.ASSIGN, f"household:h{i}", principal=ALICE)
    assert sink.flush(10)
    sink.close()           # the process stops while the log is still down
    assert sink.dropped == 0 and _dropped("t-outbox", "send_failed") == before
    assert audit.AuditOutbox(outbox_path).pending() == 300

    log = _Switch()
    log.up.set()           # next start: the log answers again
    again = AuditSink(log, component="t-outbox", max_delay_s=0.01, outbox=audit.AuditOutbox(outbox_path))
    again.record(audit.ASSIGN, "household:after", principal=ALICE)
    deadline = threading.Event()
    for _ in range(200):
        if len(log.records) == 301:
            break
        deadline.wait(0.05)
    again.close()
    resources = [r.resource for r in log.records]
    assert resources[:300] == [f"household:h{i}" for i in range(300)]   # in order, once each
    assert resources[300] == "household:after"
    assert audit.AuditOutbox(outbox_path).pending() == 0
    assert b"household:h1" not in outbox_path.read_bytes()   # delivered records are wiped


def test_records_are_delivered_once_the_log_returns_while_the_process_runs(tmp_path):
    log = _Switch()
    sink = AuditSink(log, component="t-outbox2", max_delay_s=0.01, backoff_s=0.01, max_spool_backoff_s=0.05,
                     outbox=audit.AuditOutbox(tmp_path / "o.db"))
    for i in range(50):
        sink.record(audit.ASSIGN, f"r{i}", principal=ALICE)
    assert sink.flush(10) and sink.spooled == 50 and not log.records
    log.up.set()
    for i in range(50, 60):
        sink.record(audit.ASSIGN, f"r{i}", principal=ALICE)
    for _ in range(200):
        if len(log.records) == 60:
            break
        threading.Event().wait(0.05)
    sink.close()
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(60)]


def test_authentication_failures_are_coalesced_per_reason_and_route(memory_sink):
    transport, sink = memory_sink
    now = [1000.0]
    listener = audit.security_listener("gateway", clock=lambda: now[0])
    flood = identity.SecurityEvent("authentication_failed", "gateway", "unknown_api_key",
                                   target="GET /v1/household/{account_id}")
    for _ in range(audit.AUTH_FAILURE_AUDIT_BURST + 25):
        listener(flood)
    # Another reason or route has its own budget, and so have denials (below).
    listener(identity.SecurityEvent("authentication_failed", "gateway", "jwt_expired",
                                    target="GET /v1/household/{account_id}"))
    for _ in range(audit.AUTH_FAILURE_AUDIT_BURST + 5):
        listener(identity.SecurityEvent("permission_denied", "gateway", "not_in_matrix", "ana", "analyst",
                                        "GET /v1/audit"))
    now[0] += 1.0 / audit.AUTH_FAILURE_AUDIT_PER_S
    listener(flood)
    sink.flush(5)
    records = [r for r in transport.records if r.event_type == "authentication_failure"]
    flooded = [json.loads(r.details_json) for r in records if json.loads(r.details_json)["reason"] == "unknown_api_key"]
    assert len(flooded) == audit.AUTH_FAILURE_AUDIT_BURST + 1
    assert flooded[-1]["suppressed"] == "25" and "suppressed" not in flooded[0]
    assert sum(1 for r in records if json.loads(r.details_json)["reason"] == "jwt_expired") == 1
    # The denials' own budget: an anonymous flood does not use it up.
    assert sum(1 for r in transport.records if r.event_type == "permission_denied") == audit.AUTH_FAILURE_AUDIT_BURST


def test_permission_denials_are_coalesced_per_principal_reason_and_route(memory_sink):
    """Until session 19 every 403 was one audit record: an authenticated principal calling
    a route it may not grew the tamper-evident log without bound. Now each (principal,
    reason, route) keeps its first AUTH_FAILURE_AUDIT_BURST records whole, then one per
    1 / AUTH_FAILURE_AUDIT_PER_S saying how many it stands for; the metric counts each."""
    transport, sink = memory_sink
    now = [5000.0]
    listener = audit.security_listener("gateway", clock=lambda: now[0])

    def denial(principal="ana", target="GET /v1/audit", reason="not_in_matrix"):
        return identity.SecurityEvent("permission_denied", "gateway", reason, principal, "analyst", target)

    labels = {"component": "gateway", "role": "analyst", "target": "GET /v1/audit"}
    counted = REGISTRY.get_sample_value("hearth_access_denied_total", labels) or 0.0
    flood = audit.AUTH_FAILURE_AUDIT_BURST + 40
    remove = identity.add_security_listener(listener)
    try:
        for _ in range(flood):
            identity.report_security_event(denial())
        # Another principal, route or reason has a budget of its own: a flood hides no one else.
        identity.report_security_event(denial(principal="bob"))
        identity.report_security_event(denial(target="GET /v1/calibrators/{variant}"))
        identity.report_security_event(denial(reason="unmapped_target"))
        now[0] += 1.0 / audit.AUTH_FAILURE_AUDIT_PER_S
        identity.report_security_event(denial())
    finally:
        remove()
    sink.flush(5)
    # The metric counts every refusal, the log holds the first ones and a count.
    assert REGISTRY.get_sample_value("hearth_access_denied_total", labels) == counted + flood + 3
    records = [(r.principal, r.resource, json.loads(r.details_json)) for r in transport.records
               if r.event_type == "permission_denied"]
    flooded = [d for p, res, d in records if p == "ana" and res == "route:GET /v1/audit" and d["reason"] == "not_in_matrix"]
    assert len(flooded) == audit.AUTH_FAILURE_AUDIT_BURST + 1
    assert all("suppressed" not in d for d in flooded[:-1]) and flooded[-1]["suppressed"] == "40"
    assert len(records) == audit.AUTH_FAILURE_AUDIT_BURST + 1 + 3
    assert {(p, res, d["reason"]) for p, res, d in records} >= {
        ("bob", "route:GET /v1/audit", "not_in_matrix"), ("ana", "route:GET /v1/calibrators/{variant}", "not_in_matrix"),
        ("ana", "route:GET /v1/audit", "unmapped_target")}
