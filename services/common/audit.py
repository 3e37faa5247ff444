"""The audit CLIENT every service and the gateway use: ``AuditSink``.

Who writes what
---------------
* Every RPC is audited in ONE place, the server interceptor (``server.py``), which
  calls ``record_rpc`` after the call with the status; ``RPC_EVENTS`` below is the one
  table from full gRPC method to audit event type.
* The gateway records refused HTTP requests (authentication failures, permission
  denials) through ``security_listener`` (hooked on ``identity.add_security_listener``).
* Domain code records its own events (deletion completed/failed, retention purge, key
  rotation, ...) with ``audit.record(event_type, resource, outcome, details)``; principal,
  role and trace id come from the current context (the RPC's principal, else the
  process's service principal; the current OpenTelemetry span).

Delivery and its loss window
----------------------------
``record`` never blocks on I/O: it validates, freezes ``details`` to JSON and puts the
record on a bounded in-memory queue (``max_queue``); a background thread sends batches
of up to ``max_batch`` records, at most ``max_delay_s`` after the first one queued, to
the privacy service's ``AppendAudit`` (or, inside the privacy service, straight to the
local durable log: no self-RPC). AppendAudit is durable when it returns, and every
record carries a ``record_id`` so a retried batch is not appended twice; failed sends
are retried with exponential backoff (``max_attempts``); what each answer of the log does
(an outage or a refusal of the sender keeps the records, a batch over the message limit is
split, a record refused for itself is isolated and dropped): ``answer_kind``. What can be
lost:

* records still queued (not yet acknowledged) when a process crashes or is killed
  with SIGKILL: at most ``max_delay_s`` worth of records in normal operation, more while
  the privacy service is unreachable (up to the queue bound);
* records refused when the queue is full, or after ``max_attempts`` sends the log failed
  on (not an outage: those are kept, below);
* a record the log refuses for itself (its validation, or one too large for a message).

With a disk outbox (``AuditOutbox``: what every service and the gateway use, a SQLite
file in the data directory) an unreachable audit log loses nothing: a batch that cannot
be sent after ``spool_after`` attempts is written to the outbox (durable, fsynced) and
counts as handed over; while the outbox holds records every new batch goes there too (the
order of the log is kept), and the sink thread keeps delivering the oldest records with
backoff (at most ``max_spool_backoff_s`` apart) until the log answers, across restarts
of the process. Only records still in memory at a crash (at most ``max_delay_s`` worth)
can be lost, and batches past the outbox's bound (``MAX_OUTBOX_RECORDS``).

When neither takes a batch — the outbox's write fails (its disk full), or, without an
outbox (the privacy service's own sink), the log still answers with an outage after
``max_attempts`` — the batch is kept in memory (session 24): back at the head of the
queue in order, retried after a backoff (``_keep``), counted in the gauge
``hearth_audit_records_held``. The queue's bound is its bound (new records past
``max_queue`` are dropped as ``queue_full``); ``close`` gives them one last try. Held
records, and those queued behind them, are also written into a reserve file allocated at
start (``AuditReserve``, session 25), so a kill while holding loses none of them (up to the
file's room): the next start queues them first. docs/privacy.md, "The client".

Every loss is counted: ``hearth_audit_records_dropped_total{component,reason}``. A
clean shutdown (SIGTERM) flushes the queue (``close``) after the server has stopped.
Code that must not proceed unless its audit record is durable (none today) should
call ``AppendAudit`` synchronously instead.
"""

from __future__ import annotations

import contextvars
import fcntl
import itertools
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client import Counter, Gauge

from services.common import identity, telemetry
from services.common.audit_events import EventType
from services.common.errors import HearthError, status_for

log = logging.getLogger("hearth.audit")

# ---------------------------------------------------------------------------------------
# vocabulary: module-level names for services.common.audit_events.EventType
# ---------------------------------------------------------------------------------------

ASSIGN = EventType.ASSIGN
INGEST = EventType.INGEST
READ_HOUSEHOLD = EventType.READ_HOUSEHOLD
EXPORT = EventType.EXPORT
ATTRIBUTION_RUN = EventType.ATTRIBUTION_RUN
DELETION_REQUESTED = EventType.DELETION_REQUESTED
DELETION_COMPLETED = EventType.DELETION_COMPLETED
DELETION_FAILED = EventType.DELETION_FAILED
CONSENT_CHANGE = EventType.CONSENT_CHANGE
RETENTION_PURGE = EventType.RETENTION_PURGE
AUTHENTICATION_FAILURE = EventType.AUTHENTICATION_FAILURE
PERMISSION_DENIED = EventType.PERMISSION_DENIED
KEY_ROTATION = EventType.KEY_ROTATION
KEY_DESTROYED = EventType.KEY_DESTROYED
FLAG_CHANGE = EventType.FLAG_CHANGE
MODEL_REFIT = EventType.MODEL_REFIT
FEEDBACK = EventType.FEEDBACK
SECURITY_ALERT = EventType.SECURITY_ALERT
RECEIPT_VERIFIED = EventType.RECEIPT_VERIFIED
AUDIT_EXPORT = EventType.AUDIT_EXPORT

EVENT_TYPES = frozenset(EventType)

SUCCESS, FAILURE, DENIED, ERROR = "success", "failure", "denied", "error"
OUTCOMES = frozenset({SUCCESS, FAILURE, DENIED, ERROR})
# Accepted on input for compatibility with callers written against the first contract.
OUTCOME_ALIASES = {"ok": SUCCESS}

# An unauthenticated caller holds no role, but every entry must name one of the five.
# It is recorded under the least-privileged role, with details.authenticated = "false"
# and the role it claimed (if any) in details.claimed_role.
UNAUTHENTICATED_ROLE = identity.Role.ANALYST.value
ANONYMOUS = "anonymous"
MAX_TEXT = 1024  # the log's limit for principal / resource / trace id

# ---------------------------------------------------------------------------------------
# THE table: full gRPC method -> event type
# ---------------------------------------------------------------------------------------

# A value is an event type, a pair (event type when OK, event type otherwise), or None
# for "deliberately not audited" (with the reason next to it). Whatever the table says,
# a PERMISSION_DENIED status is recorded as permission_denied and UNAUTHENTICATED as
# authentication_failure. A test checks that every RPC of every proto is listed, so a
# new RPC cannot escape the audit log by omission.
_CLU, _ATT = "/hearth.clustering.v1.ClusteringService/", "/hearth.attribution.v1.AttributionService/"
_FEE = "/hearth.feedback.v1.FeedbackService/"
_DEL, _CON = "/hearth.privacy.v1.Deletion/", "/hearth.privacy.v1.Consent/"
_LOG, _KEY = "/hearth.privacy.v1.AuditLog/", "/hearth.privacy.v1.Keys/"
_DATA = "/hearth.common.v1.DataHolder/"
_ERASE = (DELETION_COMPLETED, DELETION_FAILED)

RPC_EVENTS: dict[str, str | tuple[str, str] | None] = {
    _DATA + "Erase": _ERASE,                   # served by clustering, attribution and feedback
    _DATA + "ExportAccount": READ_HOUSEHOLD,   # one part of a privacy ExportHousehold
    _DATA + "ExportAccountStream": READ_HOUSEHOLD,   # the same part, streamed (since session 26)
    _DATA + "Rekey": None,                     # one step of a privacy RotateDataKey, audited there
                                               # (key_rotation with the operator's principal)
    _CLU + "IngestEvents": INGEST,
    _CLU + "AssignSession": ASSIGN,
    _CLU + "AssignSessions": ASSIGN,
    _CLU + "GetHousehold": READ_HOUSEHOLD,
    _CLU + "GetEventStatus": READ_HOUSEHOLD,   # which of a household's events are held: household data
    _CLU + "Refit": MODEL_REFIT,
    _CLU + "ResolvePersons": READ_HOUSEHOLD,   # who watched on which device: household data
    _CLU + "GetPersonDevices": READ_HOUSEHOLD,   # which devices are a person's: household data
    _CLU + "RecordLabels": FEEDBACK,          # known persons of sessions, from feedback
    _ATT + "RecordTouchpoints": INGEST,
    _ATT + "RecordConversions": INGEST,
    _ATT + "Attribute": ATTRIBUTION_RUN,
    _DEL + "RequestDeletion": DELETION_REQUESTED,
    _DEL + "GetDeletion": None,                # job status, no personal data
    _DEL + "VerifyReceipt": RECEIPT_VERIFIED,
    _DEL + "ExportHousehold": EXPORT,
    _DEL + "ExportHouseholdStream": EXPORT,
    _CON + "SetConsent": CONSENT_CHANGE,
    _CON + "GetConsent": None,                 # read by services on every write they audit already
    _CON + "GetConsents": None,                # the same read for a write's many accounts
    _CON + "ListWithdrawnConsent": None,       # read by attribution for an Attribute it audits already
    _LOG + "AppendAudit": None,                # the log itself: auditing it would recurse
    _LOG + "QueryAudit": AUDIT_EXPORT,         # reads of the audit log ARE audited
    _LOG + "GetAuditProof": AUDIT_EXPORT,
    _LOG + "VerifyAudit": AUDIT_EXPORT,
    _KEY + "GetDataKey": None,                 # stores fetch keys per household every <= 60 s; the
                                               # key's creation/destruction is what is audited
    _KEY + "GetDataKeys": None,                # the same fetch for many households (a store's warming)
    _KEY + "RotateKeys": KEY_ROTATION,
    _KEY + "RotateDataKey": KEY_ROTATION,
    _KEY + "RotateDataKeys": KEY_ROTATION,
    _KEY + "RequestDataKeyRotations": KEY_ROTATION,   # each household rotated is recorded by the job
    _KEY + "GetDataKeyRotations": None,        # a batch job's state (account ids, outcomes): no household data
    _FEE + "RecordPrediction": INGEST,
    _FEE + "RecordFeedback": FEEDBACK,
    _FEE + "GetCalibration": None,             # aggregates over all households, no household data
    _FEE + "GetExperiment": None,              # the split and aggregate results
    _FEE + "GetVariants": None,                # the same split for many accounts (a model refresh's batch)
    _FEE + "GetCalibrator": None,              # model calibration map, no household data
    _FEE + "SetFlag": FLAG_CHANGE,
    _FEE + "ListCalibrators": None,            # calibrator versions, no household data
    _FEE + "ActivateCalibrator": FLAG_CHANGE,  # a calibrator rollback / hold is a model flag change
}

# Status -> outcome: the caller was refused / the request was wrong or the state did not
# allow it / the service failed.
_DENIED_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
_FAILURE_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
})

DROPPED = Counter("hearth_audit_records_dropped_total",
                  "Audit records that were never acknowledged by the audit log",
                  ["component", "reason"])
SENT = Counter("hearth_audit_records_sent_total",
               "Audit records acknowledged (durable) by the audit log", ["component"])
SPOOLED = Counter("hearth_audit_records_spooled_total",
                  "Audit records written to the disk outbox while the audit log was unreachable", ["component"])
OUTBOX_DEPTH = Gauge("hearth_audit_outbox_depth", "Audit records in the disk outbox, not yet delivered",
                     ["outbox"])
SEND_FAILURES = Counter("hearth_audit_send_failures_total",
                        "Sends to the audit log that failed, by status code (retried, split or refused)",
                        ["component", "code"])
HELD = Gauge("hearth_audit_records_held",
             "Audit records kept in memory because neither the audit log nor the disk outbox took them "
             "(retried with backoff; 0 once delivered)", ["component"])
DROP_REASONS = ("closed", "queue_full", "send_failed", "refused", "outbox_failed", "outbox_full")
# Records the disk outbox holds at most (~0.4 GB at ~410 bytes a record); past it a batch is dropped as
# ``outbox_full`` (counted, logged) instead of filling the data directory the service's
# own store writes to.
MAX_OUTBOX_RECORDS = 1_000_000


def outcome_for(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.OK:
        return SUCCESS
    if code in _DENIED_CODES:
        return DENIED
    if code in _FAILURE_CODES:
        return FAILURE
    return ERROR


def household_resource(account_id: str) -> str:
    return f"household:{account_id}" if account_id else ""


# ---------------------------------------------------------------------------------------
# records, transports, the sink
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record on its way to the log (``seq`` is assigned by the log).

    ``ts``: Unix seconds (UTC). ``details_json``: the details as a JSON object, frozen
    when recorded. ``record_id``: idempotency key (a retried send is not appended twice).
    """

    ts: float
    event_type: str
    principal: str
    role: str
    resource: str
    outcome: str
    trace_id: str
    details_json: str
    record_id: str


class AuditTransport(Protocol):
    def send(self, records: Sequence[AuditRecord]) -> None:
        """Make the records durable or raise. ``TransientAuditError`` (or a retryable
        gRPC status) means "try again"; anything else means these records are refused."""

    def close(self) -> None: ...


class TransientAuditError(Exception):
    """A send failed in a way that may succeed later (log unavailable)."""


# What a failed send says (docs/privacy.md, "The client (AuditSink)"; session 23):
# OUTAGE — the log cannot take records from this sender now: it is down or slow, or it
#   refuses the sender itself (a key rotation it has not seen yet, an address pointing at
#   another service, a log not started). Nothing is wrong with the records: they are kept
#   (retried with backoff, spooled to the outbox), never dropped for it.
# TOO_LARGE — RESOURCE_EXHAUSTED: the request is over the gRPC message limit (the client's
#   core refuses it before sending, or the log's): the batch is split; one record alone
#   over it can never be sent and is dropped as refused.
# REFUSED — the log refuses a record of the batch (its validation): the batch is split
#   until the record is alone, then it is dropped.
# SUSPECT — INTERNAL, UNKNOWN, DATA_LOSS, or a local failure: the log failing (its
#   database) or failing on one record. Retried with backoff and split; one record
#   failing ``max_attempts`` times while the next record is accepted is dropped.
OUTAGE, TOO_LARGE, REFUSED, SUSPECT = "outage", "too_large", "refused", "suspect"
_ANSWER_OF_CODE = {
    **dict.fromkeys((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                     grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.FAILED_PRECONDITION), OUTAGE),
    grpc.StatusCode.RESOURCE_EXHAUSTED: TOO_LARGE,
    **dict.fromkeys((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                     grpc.StatusCode.ALREADY_EXISTS), REFUSED),
}


def _status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None


def answer_kind(exc: BaseException) -> str:
    """OUTAGE, TOO_LARGE, REFUSED or SUSPECT (above) for a failed send: a gRPC status
    (the remote log) or the domain error the local transport raises (privacy's own)."""
    if isinstance(exc, TransientAuditError):
        return OUTAGE
    code = _status_of(exc)
    if code is None:
        if isinstance(exc, ValueError) and not isinstance(exc, HearthError):
            return REFUSED
        if not isinstance(exc, HearthError):
            return SUSPECT
        code = status_for(exc)
    return _ANSWER_OF_CODE.get(code, SUSPECT)


def _text(value: object, name: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name}: must not be empty")
    if not value.isprintable():
        # A refused request's own id lands here (``household:<account_id>``): a NUL failed
        # PostgreSQL's group commit and every honest record of the batch was dropped with it,
        # and AppendAudit refuses one. Written escaped, so the attempt is still on record.
        value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"


def details_to_json(details: Mapping[str, Any] | None) -> str:
    """``details`` frozen as the record stores them (sorted keys, compact, no NaN);
    ValueError naming ``details`` when they are not a JSON-serialisable mapping."""
    if details is None:
        details = {}
    if not isinstance(details, Mapping):
        raise ValueError(f"details: expected a mapping, got {type(details).__name__}")
    try:
        return json.dumps(dict(details), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"details: not JSON-serialisable ({exc})") from None


def make_record(event_type: str, resource: str = "", outcome: str = SUCCESS,
                details: Mapping[str, Any] | None = None, *,
                principal: identity.Principal | None = None, trace_id: str | None = None,
                ts: float | None = None, fallback_service: str = "unknown",
                details_json: str | None = None) -> AuditRecord:
    """Validate and build a record; principal and trace id default to the current
    context. Raises ValueError naming the argument (a programming error: audit calls
    are written in code, not taken from requests). ``details_json``: the details already
    frozen by ``details_to_json`` (then ``details`` is ignored)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event_type: {event_type!r} is not one of {sorted(EVENT_TYPES)}")
    outcome = OUTCOME_ALIASES.get(outcome, outcome)
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome: {outcome!r} is not one of {sorted(OUTCOMES)}")
    if details_json is None:
        details_json = details_to_json(details)
    if principal is None:
        try:
            principal = identity.current_principal()
        except Exception:  # noqa: BLE001 - outside an RPC: the process acts as itself
            principal = identity.service_principal(fallback_service)
    if trace_id is None:
        trace_id = telemetry.current_trace_id()
    return AuditRecord(
        ts=time.time() if ts is None else float(ts), event_type=event_type,
        principal=_text(principal.id, "principal", allow_empty=False),
        role=identity.Role(principal.role).value, resource=_text(resource, "resource"),
        outcome=outcome, trace_id=_text(trace_id, "trace_id"), details_json=details_json,
        record_id=os.urandom(16).hex())   # 128 random bits like uuid4, at a fifth of its cost


class AuditSink:
    """Asynchronous, batched, bounded audit writer (see the module docstring).

    ``record(...)`` returns True when queued, False when dropped (queue full or closed).
    ``flush(timeout_s)`` waits until every record queued before the call is sent or
    dropped. ``close()`` flushes, then stops the thread and closes the transport.
    """

    def __init__(self, transport: AuditTransport, *, component: str, max_batch: int = 500,
                 max_delay_s: float = 0.05, max_queue: int = 50_000, max_attempts: int = 6,
                 backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep, outbox: "AuditOutbox | None" = None,
                 spool_after: int = 2, max_spool_backoff_s: float = 5.0,
                 max_outbox: int = MAX_OUTBOX_RECORDS, reserve: "AuditReserve | None" = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_attempts < 1:
            raise ValueError("max_batch, max_queue, max_attempts: must be >= 1")
        if not max_delay_s >= 0 or not backoff_s >= 0:
            raise ValueError("max_delay_s, backoff_s: must be >= 0")
        self.component = component
        # Series at 0 from the start, so the first drop is an increase the alert sees.
        SENT.labels(component)
        for reason in DROP_REASONS:
            DROPPED.labels(component, reason)
        self._transport = transport
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._max_attempts = max_attempts
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._sleep = sleep
        self._outbox = outbox
        self._spool_after = max(1, spool_after)
        self._max_spool_backoff = max_spool_backoff_s
        self._spool_failures = 0
        self._next_drain = 0.0
        self._max_outbox = max_outbox
        self._drain_size = max_batch   # halved while a batch is refused, doubled back on success
        self._head_failures = 0        # consecutive SUSPECT failures of the outbox's oldest record alone
        self.spooled = 0
        # Records neither the log nor the outbox took (a full disk under both: session 23)
        # go back to the head of the queue, in order, and are retried after a backoff
        # (``_keep``): the queue's bound is their bound. ``_held`` collects a round's.
        self._held: list[AuditRecord] = []
        # The newest outbox key whose record the log took (or refused for good), every older
        # one too, though its delete may have failed (the outbox's disk full): the drain
        # goes on past it, and the outbox holds nothing to deliver once the rest is sent
        # (review24: the drain sent its oldest batch again and again, and every new record
        # went to the outbox behind it and was held, with the log up). 0: none.
        self._delivered_through = 0
        self._hold_rounds = 0          # consecutive rounds that kept records in memory
        self._hold_reason = ""
        self._retry_at = 0.0
        self._closing = threading.Event()   # wakes a thread waiting to retry held records
        self._unlogged_full = 0        # queue_full drops not logged yet (logged at most every 5 s)
        self._full_logged_at = -1e9
        HELD.labels(component).set(0)
        # The queue is a deque under the sink's lock, not a queue.Queue: Queue.put wakes
        # the waiting sink thread on every record (a thread switch per audited RPC, the
        # largest item of the server interceptor's cost); here the thread is woken only
        # when a record arrives at an empty queue or a batch fills, and otherwise
        # collects what arrived during its max_delay_s window.
        self._items: deque[AuditRecord] = deque()
        self._max_queue = max_queue
        mutex = threading.RLock()
        self._lock = threading.Condition(mutex)      # counters; flush() waits on it
        self._arrived = threading.Condition(mutex)   # the sink thread waits on it
        self._accepted = 0      # records put on the queue
        self._finished = 0      # records sent or dropped by the thread
        self.sent = 0
        self.dropped = 0
        self._closed = False
        # Records held in memory are also written into a file pre-allocated at start
        # (``AuditReserve``), so a process killed while it holds them loses none: the next
        # start puts them first in the queue (session 25).
        self._reserve = reserve
        if reserve is not None:
            replayed = reserve.replay()
            if replayed:
                self._items.extend(replayed)
                self._accepted += len(replayed)
                log.warning("%d audit records held by an earlier run of %s (kept in %s) queued again",
                            len(replayed), component, reserve.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audit-sink-{component}", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------

    def record(self, event_type: str, resource: str = "", outcome: str = SUCCESS,
               details: Mapping[str, Any] | None = None, *,
               principal: identity.Principal | None = None, trace_id: str | None = None,
               ts: float | None = None) -> bool:
        """Queue one audit record (never blocks on I/O). ValueError on bad arguments."""
        return self.submit(make_record(event_type, resource, outcome, details, principal=principal,
                                       trace_id=trace_id, ts=ts, fallback_service=self.component))

    def submit(self, record: AuditRecord) -> bool:
        if self._closed:
            self._drop(1, "closed")
            return False
        with self._lock:
            queued = len(self._items)
            full = queued >= self._max_queue
            if not full:
                self._items.append(record)
                self._accepted += 1
                if queued == 0 or queued + 1 >= self._max_batch:
                    self._arrived.notify()
        if full:
            self._drop(1, "queue_full")
            self._log_queue_full(record)
            return False
        return True

    def _log_queue_full(self, record: AuditRecord) -> None:
        """One line per 5 s at most, with the count since the last (a full queue during
        an outage refuses every record: a line each was a flood)."""
        now = time.monotonic()
        with self._lock:
            self._unlogged_full += 1
            if now - self._full_logged_at < 5.0:
                return
            n, self._unlogged_full, self._full_logged_at = self._unlogged_full, 0, now
        log.warning("audit queue full (%d records): %d record(s) dropped", self._max_queue, n,
                    extra={"fields": {"event_type": record.event_type, "component": self.component}})

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until all records queued so far are sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            target = self._accepted
            while self._finished < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued (bounded by ``timeout_s``), stop, close the transport."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()   # records held in memory get their last try now, not after a backoff
        if not self.flush(timeout_s):
            log.warning("audit sink closed with %d records unsent", self.pending)
        self._stop.set()
        self._thread.join(timeout_s)
        try:
            self._transport.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the audit transport failed")
        if self._reserve is not None and not self._thread.is_alive():
            self._reserve.close()
        if self._outbox is not None:
            if self._outbox.pending():
                log.warning("%d audit records stay in the disk outbox until the next start",
                            self._outbox.pending())
            if not self._thread.is_alive():
                self._outbox.close()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._accepted - self._finished

    # -- consumer side -------------------------------------------------------------------

    def _drop(self, n: int, reason: str) -> None:
        DROPPED.labels(self.component, reason).inc(n)
        with self._lock:
            self.dropped += n

    def _finish(self, n: int) -> None:
        with self._lock:
            self._finished += n
            self._lock.notify_all()

    def _take_batch(self, idle_wait_s: float = 0.1) -> list[AuditRecord]:
        """Up to ``max_batch`` records: waits up to ``idle_wait_s`` for a first one, then
        up to ``max_delay_s`` for the batch to fill (not while stopping)."""
        with self._lock:
            if not self._items:
                if idle_wait_s > 0:
                    self._arrived.wait(idle_wait_s)
                if not self._items:
                    return []
            deadline = time.monotonic() + self._max_delay
            while len(self._items) < self._max_batch and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
            items = self._items
            return [items.popleft() for _ in range(min(len(items), self._max_batch))]

    def _run(self) -> None:
        while not (self._stop.is_set() and not self._items):
            if self._hold_rounds and not self._closed and self._wait_to_retry():
                continue
            # While the outbox isolates a refused record (its batches halved, then grown
            # back), the next round does not wait for new records: a few sends in a row.
            isolating = (self._outbox is not None and self._outbox_undelivered() > 0
                         and self._drain_size < self._max_batch and time.monotonic() >= self._next_drain)
            batch = self._take_batch(0.0 if isolating else 0.1)
            if batch:
                try:
                    if self._outbox is not None and self._outbox_undelivered():
                        self._spool(batch)   # an outage is on: behind the older records
                    else:
                        self._deliver(batch)
                finally:
                    held, self._held = self._held, []
                    if held:
                        self._keep(held)
                    elif self._hold_rounds:
                        self._release()
                    self._unreserve(batch, held)
                    self._finish(len(batch) - len(held))
            if self._outbox is not None and not self._stop.is_set():
                self._drain_outbox_safely()

    def _wait_to_retry(self) -> bool:
        """Records are held: True after waiting (part of) the backoff before their retry
        (the outbox keeps draining meanwhile); False when the retry is due."""
        wait = self._retry_at - time.monotonic()
        if wait <= 0:
            return False
        if self._outbox is not None and self._outbox.pending():
            wait = min(wait, max(0.0, self._next_drain - time.monotonic()))
        # With a reserve file, records arriving behind the held ones are written into it
        # at least every max_delay_s (the loss window of normal operation).
        self._closing.wait(min(wait, 1.0, max(self._max_delay, 0.01)) if self._reserve is not None else min(wait, 1.0))
        self._reserve_queued()
        if self._outbox is not None and not self._stop.is_set():
            self._drain_outbox_safely()
        return True

    def _hold(self, batch: list[AuditRecord], exc: BaseException, where: str) -> None:
        """Keep ``batch`` for a retry (``_keep`` at the end of the round), after what this
        round already kept: the order of the records is the order they were recorded."""
        if not self._held and not self._hold_rounds:
            self._hold_reason = f"{where}: {_describe(exc)}"
        self._held.extend(batch)

    def _keep(self, held: list[AuditRecord]) -> None:
        """Put a round's held records back at the head of the queue and back off. The
        queue may then hold up to ``max_queue + max_batch`` records (the batch was taken
        out, new ones filled its room); ``submit`` refuses while it holds ``max_queue``."""
        with self._lock:
            self._items.extendleft(reversed(held))
            queued = len(self._items)
        self._reserve_queued()
        self._hold_rounds += 1
        self._retry_at = time.monotonic() + min(self._max_spool_backoff,
                                                self._backoff * (2 ** min(self._hold_rounds, 16)))
        HELD.labels(self.component).set(queued)
        if self._hold_rounds == 1:
            log.warning("audit records kept in memory (%d queued): %s; retried with backoff, records past "
                        "%d queued are dropped (queue_full)", queued, self._hold_reason, self._max_queue)

    def _release(self) -> None:
        """A round after held records delivered (or spooled) them: no more backoff."""
        log.info("audit records kept in memory are delivered again (after %d retries)", self._hold_rounds)
        self._hold_rounds = 0
        HELD.labels(self.component).set(0)

    def _reserve_queued(self) -> None:
        """Write the queued records the reserve file does not hold yet into it (the held
        records are the head of the queue, those that arrived behind them its tail: the
        ones not in the file are a tail, found from the end)."""
        reserve = self._reserve
        if reserve is None or reserve.full:
            return
        with self._lock:
            new: list[AuditRecord] = []
            for record in reversed(self._items):
                if reserve.holds(record.record_id):
                    break
                new.append(record)
        if new:
            new.reverse()
            reserve.write(new)

    def _unreserve(self, batch: list[AuditRecord], held: list[AuditRecord]) -> None:
        """The records of a round that are no longer in memory (delivered, spooled or
        dropped) leave the reserve file's count; once none is left it is emptied."""
        reserve = self._reserve
        if reserve is None or not reserve.count:
            return
        kept = {r.record_id for r in held} if held else ()
        reserve.forget([r.record_id for r in batch if r.record_id not in kept])

    def _drop_unreserved(self, batch: list[AuditRecord], reason: str) -> None:
        """Count as dropped the records of ``batch`` the reserve file does not hold; those
        it holds stay there for the next start (closing with a full disk)."""
        reserve = self._reserve
        kept = [r for r in batch if reserve is not None and reserve.holds(r.record_id)]
        if kept:
            log.warning("%d audit records stay in the reserve file %s until the next start", len(kept),
                        reserve.path)
            reserve.keep_at_close([r.record_id for r in kept])
        if len(batch) > len(kept):
            self._drop(len(batch) - len(kept), reason)

    def _drain_outbox_safely(self) -> None:
        """``_drain_outbox``; a failing outbox (its disk full: the delete after a delivery,
        a read) backs off instead of ending the sink's thread. Records delivered whose
        delete failed are sent again later: the log appends a record_id once."""
        try:
            self._drain_outbox()
        except Exception as exc:  # noqa: BLE001 - the outbox's own disk
            log.warning("audit outbox failed (%s): retried with backoff", _describe(exc))
            self._back_off_drain(exc)

    def _spool(self, batch: list[AuditRecord]) -> None:
        if self._held:   # an earlier part of this round is held: keep the order
            self._held.extend(batch)
            return
        room = max(0, self._max_outbox - self._outbox.pending())
        if room < len(batch):
            log.error("audit outbox full (%d records): %d records dropped", self._outbox.pending(),
                      len(batch) - room)
            self._drop(len(batch) - room, "outbox_full")
            batch = batch[:room]
            if not batch:
                return
        try:
            self._outbox.put(batch)
        except Exception as exc:  # noqa: BLE001 - the disk failed too: kept in memory
            if self._closed:   # no more retries: counted as dropped (unless in the reserve file)
                lost = sum(1 for r in batch if self._reserve is None or not self._reserve.holds(r.record_id))
                if lost:   # records in the reserve file are not lost: _drop_unreserved says where they stay
                    log.exception("audit outbox write failed while closing: %d records not spooled", lost)
                self._drop_unreserved(batch, "outbox_failed")
            else:
                self._hold(batch, exc, "the disk outbox failed")
            return
        SPOOLED.labels(self.component).inc(len(batch))
        with self._lock:
            self.spooled += len(batch)

    def _drain_outbox(self) -> None:
        """Deliver the oldest spooled records (one batch) unless backing off. A batch the
        log refuses or fails on is halved until the record at fault is alone (the next
        batches grow back), so a refused record costs a few sends and never blocks the
        records behind it; an outage keeps every record and backs off."""
        if time.monotonic() < self._next_drain or not self._outbox.pending():
            return
        if self._delivered_through:
            try:   # what the log took already, its delete failed before: delete it now
                self._outbox.remove_through(self._delivered_through)
            except Exception as exc:  # noqa: BLE001 - still failing: skipped, not sent again
                if not self._outbox.count_after(self._delivered_through):
                    self._back_off_drain(exc)   # nothing else to send: try the delete later
                    return
        rows = self._outbox.oldest(self._drain_size, after=self._delivered_through)
        if not rows:
            return
        try:
            self._send([record for _, record in rows])
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = answer_kind(exc)
            if kind == OUTAGE:
                self._back_off_drain(exc)
            elif len(rows) > 1:
                self._drain_size = max(1, len(rows) // 2)
                if kind == SUSPECT:   # the log may be failing: do not hammer it
                    self._back_off_drain(exc)
            elif kind != SUSPECT:
                self._refuse(rows[0][1], exc)
                self._delivered_through = max(self._delivered_through, rows[0][0])
                self._outbox.remove([rows[0][0]])
            else:
                self._head_failures += 1
                if self._head_failures >= self._max_attempts and self._delivered_the_next():
                    # The log takes the record after it: this one is at fault.
                    self._refuse(rows[0][1], exc)
                    self._head_failures = 0
                    self._outbox.remove([rows[0][0]])
                else:
                    self._back_off_drain(exc)
            return
        self._delivered_through = max(self._delivered_through, rows[-1][0])
        self._count_sent(len(rows))
        self._outbox.remove([key for key, _ in rows])
        if self._spool_failures:
            log.info("audit log reachable again: delivering the disk outbox (%d records)", self._outbox.pending())
        self._spool_failures = self._head_failures = 0
        self._drain_size = min(self._max_batch, 2 * self._drain_size)

    def _outbox_undelivered(self) -> int:
        """Records in the outbox the log has not taken (``_delivered_through``)."""
        if not self._outbox.pending():
            return 0
        return self._outbox.count_after(self._delivered_through) if self._delivered_through else self._outbox.pending()

    def _delivered_the_next(self) -> bool:
        """Send the outbox's second-oldest record alone; True (and removed) when taken."""
        rows = self._outbox.oldest(2, after=self._delivered_through)[1:]
        if not rows:
            return False
        try:
            self._send([rows[0][1]])
        except Exception:  # noqa: BLE001 - the log fails on it too: an outage, not the first's fault
            return False
        self._outbox.remove([rows[0][0]])
        self._count_sent(1)
        return True

    def _back_off_drain(self, exc: BaseException) -> None:
        if not self._spool_failures:
            log.warning("audit log did not take the disk outbox's records (%s): retrying with backoff, "
                        "%d records kept", _describe(exc), self._outbox.pending())
        self._spool_failures += 1
        self._next_drain = time.monotonic() + min(self._max_spool_backoff,
                                                  self._backoff * (2 ** min(self._spool_failures, 16)))

    def _send(self, records: list[AuditRecord]) -> None:
        try:
            self._transport.send(records)
        except Exception as exc:
            code = _status_of(exc)
            SEND_FAILURES.labels(self.component, code.name if code else type(exc).__name__).inc()
            raise

    def _count_sent(self, n: int) -> None:
        SENT.labels(self.component).inc(n)
        with self._lock:
            self.sent += n

    def _refuse(self, record: AuditRecord, exc: BaseException) -> None:
        """Drop a record the log refuses for itself (counted, logged without its resource,
        which may name a household)."""
        log.error("audit record refused by the log and dropped: %s (%s, record_id %s)", _describe(exc),
                  record.event_type, record.record_id)
        self._drop(1, "refused")

    def _deliver(self, batch: list[AuditRecord]) -> None:
        if self._held:   # an earlier part of this round is held: keep the order
            self._held.extend(batch)
            return
        if self._outbox is not None and self._outbox_undelivered():
            self._spool(batch)   # a half of a split batch, after the other went to the outbox
            return
        for attempt in range(self._max_attempts):
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = answer_kind(exc)
                if kind in (REFUSED, TOO_LARGE):
                    if len(batch) == 1:
                        self._refuse(batch[0], exc)
                    else:   # isolate the record at fault: the others go on
                        half = len(batch) // 2
                        self._deliver(batch[:half])
                        self._deliver(batch[half:])
                    return
                if self._outbox is not None and attempt + 1 >= self._spool_after:
                    if not self._hold_rounds:   # while records are held, logged once (_keep)
                        log.warning("audit log unreachable (%s): %d records to the disk outbox",
                                    _describe(exc), len(batch))
                    self._spool(batch)
                    self._next_drain = time.monotonic() + self._backoff
                    return
                # While closing, one retry at most: shutdown must not wait out a backoff
                # schedule for a log that is gone (the drop is counted and logged).
                if attempt == self._max_attempts - 1 and kind == OUTAGE and not self._closed:
                    # The log cannot take records now (down, its disk full): nothing is
                    # wrong with them. Kept in memory and retried, not dropped.
                    self._hold(batch, exc, "the audit log")
                    return
                if attempt == self._max_attempts - 1 or (self._closed and attempt >= 1):
                    log.error("audit batch of %d not delivered after %d attempts: %s", len(batch),
                              attempt + 1, _describe(exc))
                    if self._closed:
                        self._drop_unreserved(batch, "send_failed")
                    else:
                        self._drop(len(batch), "send_failed")
                    return
                self._sleep(min(self._max_backoff, self._backoff * (2 ** attempt)))
            else:
                self._count_sent(len(batch))
                return


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details() if callable(getattr(exc, 'details', None)) else ''}"
    return f"{type(exc).__name__}: {exc}"


class NullAuditSink:
    """The sink of a process with no audit log configured (in-process tests, tools)."""

    component = "none"
    pending = 0

    def record(self, *args, **kwargs) -> bool:
        make_record(*args, **kwargs)  # still validate: a bad call should fail in tests too
        return False

    def submit(self, record: AuditRecord) -> bool:
        return False

    def flush(self, timeout_s: float = 5.0) -> bool:
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        pass


class MemoryAuditTransport:
    """Keeps sent records in a list (tests, tools)."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self._lock = threading.Lock()

    def send(self, records: Sequence[AuditRecord]) -> None:
        with self._lock:
            self.records.extend(records)

    def close(self) -> None:
        pass


class GrpcAuditTransport:
    """AppendAudit on the privacy service, as the process's service principal (the
    records carry the principals they are about). Idempotent by record_id, so the
    sink's retries cannot duplicate entries."""

    def __init__(self, address: str, component: str, timeout_s: float = 5.0) -> None:
        from hearth.privacy.v1 import privacy_pb2_grpc
        from services.common.client import Peer

        self._peer = Peer(address, component, privacy_pb2_grpc.AuditLogStub, timeout_s)

    def send(self, records: Sequence[AuditRecord]) -> None:
        # Not retried here: the sink retries (and keeps an outbox) itself.
        self._peer.call("AppendAudit", to_append_request(records))

    def close(self) -> None:
        self._peer.close()


def to_append_request(records: Sequence[AuditRecord]):
    from hearth.common.v1 import common_pb2
    from hearth.privacy.v1 import privacy_pb2
    from services.common.pbutil import float_to_ts

    out = privacy_pb2.AppendAuditRequest()
    add = out.records.add   # built in place (append would copy each record)
    for r in records:
        add(ts=float_to_ts(r.ts), event_type=r.event_type,
            principal=common_pb2.Principal(id=r.principal,
                                           role=common_pb2.Role.Value("ROLE_" + r.role.upper())),
            resource=r.resource, outcome=r.outcome, trace_id=r.trace_id,
            details_json=r.details_json, record_id=r.record_id)
    return out


# ---------------------------------------------------------------------------------------
# the process-wide sink (one mechanism: install() at start, sink() everywhere)
# ---------------------------------------------------------------------------------------

_sink: AuditSink | NullAuditSink = NullAuditSink()
_sink_lock = threading.Lock()


def install(new_sink: AuditSink | NullAuditSink | None) -> AuditSink | NullAuditSink:
    """Make ``new_sink`` the process's audit sink (None: the null sink); returns the
    previous one (not closed: the caller owns it)."""
    global _sink
    with _sink_lock:
        previous, _sink = _sink, new_sink if new_sink is not None else NullAuditSink()
    return previous


def sink() -> AuditSink | NullAuditSink:
    return _sink


def installed() -> bool:
    return not isinstance(_sink, NullAuditSink)


def record(event_type: str, resource: str = "", outcome: str = SUCCESS,
           details: Mapping[str, Any] | None = None, **kwargs) -> bool:
    """``sink().record(...)``: the one call domain code uses to audit an action.

    Example (deletion engineer)::

        audit.record(audit.DELETION_COMPLETED, audit.household_resource(job.account_id),
                     details={"job_id": job.id, "receipt_id": rid, "records": n})
    """
    return _sink.record(event_type, resource, outcome, details, **kwargs)


def sink_for_service(component: str, privacy_addr: str, timeout_s: float = 5.0,
                     outbox_dir: str | Path | None = None, reserve_bytes: int = 0) -> AuditSink:
    """The standard sink of a service or the gateway: batched AppendAudit to privacy,
    with a disk outbox under ``outbox_dir`` (``audit-outbox-<component>.db``) when given,
    and there a reserve file of ``reserve_bytes`` for held records (0: none)."""
    outbox = AuditOutbox(Path(outbox_dir) / f"audit-outbox-{component}.db") if outbox_dir else None
    return AuditSink(GrpcAuditTransport(privacy_addr, component, timeout_s), component=component, outbox=outbox,
                     reserve=reserve_for(outbox_dir, component, reserve_bytes))


def reserve_for(data_dir: str | Path | None, component: str, size_bytes: int) -> AuditReserve | None:
    """The reserve file of ``component`` in ``data_dir`` (``audit-reserve-<component>.bin``),
    or None when there is no data directory or ``size_bytes`` is 0 — unless an earlier run
    left the file: its records are still replayed (a reserve turned off after a crash must
    not lose what the file holds), and it is used at the size it has.

    One process a file: replicas of a component started on one data dir each lock one
    (``audit-reserve-<component>-<n>.bin`` past the first), and a start takes the first
    file no live process holds, replaying what a process killed there left (review25: two
    replicas shared one file, wrote over each other's records and emptied them)."""
    if not data_dir:
        return None
    for n in itertools.count(1):
        suffix = "" if n == 1 else f"-{n}"
        path = Path(data_dir) / f"audit-reserve-{component}{suffix}.bin"
        if size_bytes <= 0 and not path.exists():
            return None
        try:
            return AuditReserve(path, max(0, size_bytes), exclusive=True)
        except BlockingIOError:   # a live replica's
            continue
    return None   # unreachable: itertools.count never ends


class AuditOutbox:
    """Durable FIFO of audit records waiting for the audit log (see the module docstring).

    A SQLite file (WAL, ``synchronous=FULL``: a spooled batch survives a power cut) used
    by the sink's thread only. Delivered records are deleted with ``secure_delete`` and
    the WAL is truncated once the outbox is empty, so what the outbox held (resources
    naming households) does not linger after delivery."""

    def __init__(self, path: str | Path) -> None:
        import sqlite3

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "busy_timeout=30000"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                           "record TEXT NOT NULL)")
        self._lock = threading.Lock()
        self._pending = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        OUTBOX_DEPTH.labels(self.path.stem).set(self._pending)

    def pending(self) -> int:
        return self._pending

    def put(self, records: Sequence[AuditRecord]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT INTO outbox (record) VALUES (?)",
                                       [(json.dumps(_record_dict(r), separators=(",", ":")),) for r in records])
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._pending += len(records)
            OUTBOX_DEPTH.labels(self.path.stem).set(self._pending)

    def oldest(self, limit: int, after: int = 0) -> list[tuple[int, AuditRecord]]:
        """The oldest ``limit`` records whose key is greater than ``after``."""
        with self._lock:
            rows = self._conn.execute("SELECT id, record FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                      (after, limit)).fetchall()
        return [(key, AuditRecord(**json.loads(text))) for key, text in rows]

    def count_after(self, after: int) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM outbox WHERE id > ?", (after,)).fetchone()[0]

    def remove_through(self, key: int) -> None:
        """Delete every record whose key is at most ``key`` (delivered before)."""
        with self._lock:
            if not self._conn.execute("SELECT 1 FROM outbox WHERE id <= ? LIMIT 1", (key,)).fetchone():
                return
            self._conn.execute("DELETE FROM outbox WHERE id <= ?", (key,))
            self._pending = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if not self._pending:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            OUTBOX_DEPTH.labels(self.path.stem).set(self._pending)

    def remove(self, keys: Sequence[int]) -> None:
        with self._lock:
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(k,) for k in keys])
            self._pending = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if not self._pending:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            OUTBOX_DEPTH.labels(self.path.stem).set(self._pending)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class AuditReserve:
    """A file of fixed size, allocated when the process starts (``posix_fallocate``), that
    the records an ``AuditSink`` holds in memory are written into (session 25).

    A sink holds records when neither the audit log nor its disk outbox takes them — a
    full disk under both (docs/privacy.md, "The client") — and a process killed then
    (SIGKILL, OOM, a node lost) lost them all. The file's blocks are allocated at start,
    so writing into them needs no free space later (on ext4 or XFS; a copy-on-write
    filesystem, btrfs or ZFS, needs new space for a block written again): records are appended (length, the
    file's generation, CRC-32, JSON) and fdatasync'ed; once the last of them is delivered,
    spooled or dropped the entries are overwritten with zeroes and the generation is
    bumped (an entry of an older generation never replays). The next start reads the
    entries of the current generation whose CRC holds, in order, and the sink queues them
    first: the log appends a ``record_id`` once, so a record delivered before the kill but
    still in the file is not appended twice.

    A record that does not fit (``size`` bytes: ~400 bytes a record) stays in memory only,
    as before (logged once per hold). One file per process, locked (``reserve_for``):
    replicas on one data directory each take a file of their own."""

    MAGIC = b"HRTHRSV1"
    HEADER = struct.Struct("<8sQ")    # magic, generation
    ENTRY = struct.Struct("<IQI")     # payload length, generation, CRC-32 of the payload

    def __init__(self, path: str | Path, size_bytes: int, *, exclusive: bool = False) -> None:
        """``exclusive``: lock the file for this process (``reserve_for``), or raise
        BlockingIOError when another open of it holds the lock."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if exclusive:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # dropped when the process dies
            except BlockingIOError:
                os.close(self._fd)
                raise
        self._lock = threading.Lock()
        size = os.fstat(self._fd).st_size
        if size < size_bytes:
            try:
                os.posix_fallocate(self._fd, 0, size_bytes)
            except OSError as exc:   # a full disk at start: the file stays as it is
                log.error("audit reserve file %s could not be allocated (%s): %d bytes of %d; records held "
                          "in memory beyond it are lost if the process is killed", self.path, exc,
                          os.fstat(self._fd).st_size, size_bytes)
        self.capacity = os.fstat(self._fd).st_size
        header = os.pread(self._fd, self.HEADER.size, 0)
        magic, generation = self.HEADER.unpack(header) if len(header) == self.HEADER.size else (b"", 0)
        self._generation = generation if magic == self.MAGIC else 0
        if magic != self.MAGIC and self.capacity >= self.HEADER.size:
            self._write_header()
        self._offset = self.HEADER.size
        self._ids: set[str] = set()
        self._pinned: set[str] = set()
        # Set when a record did not fit; cleared when the file is emptied. The sink then
        # stops offering it records (each offer scans the queue's unwritten tail).
        self.full = False
        # Set by a write that failed, cleared by one that succeeds: the failure is logged
        # once a run. On a copy-on-write filesystem (btrfs, ZFS) a block written before
        # needs new space when written again, so on a full disk every write fails, and the
        # sink offers the file new records every max_delay_s while it holds them (review25).
        self._write_failed = False

    @property
    def count(self) -> int:
        return len(self._ids)

    def holds(self, record_id: str) -> bool:
        return record_id in self._ids

    def _write_header(self, generation: int | None = None) -> None:
        os.pwrite(self._fd, self.HEADER.pack(self.MAGIC, self._generation if generation is None else generation), 0)
        os.fdatasync(self._fd)

    def replay(self) -> list[AuditRecord]:
        """The records an earlier run left in the file, in the order written (they stay
        in it, counted, until ``forget``)."""
        records: list[AuditRecord] = []
        offset = self.HEADER.size
        with self._lock:
            while offset + self.ENTRY.size <= self.capacity:
                length, generation, crc = self.ENTRY.unpack(os.pread(self._fd, self.ENTRY.size, offset))
                if length == 0 or generation != self._generation or offset + self.ENTRY.size + length > self.capacity:
                    break
                payload = os.pread(self._fd, length, offset + self.ENTRY.size)
                if zlib.crc32(payload) != crc:
                    break   # torn by the kill: nothing after it was acknowledged as written
                try:
                    record = AuditRecord(**json.loads(payload))
                except (TypeError, ValueError):
                    break
                records.append(record)
                self._ids.add(record.record_id)
                offset += self.ENTRY.size + length
            self._offset = offset
        return records

    def write(self, records: Sequence[AuditRecord]) -> int:
        """Append ``records`` (those not in the file yet) and sync; returns how many were
        written (fewer when the file is full)."""
        chunks, ids = [], []
        with self._lock:
            offset = self._offset
            for record in records:
                if record.record_id in self._ids:
                    continue
                payload = json.dumps(_record_dict(record), separators=(",", ":")).encode()
                entry = self.ENTRY.pack(len(payload), self._generation, zlib.crc32(payload)) + payload
                if offset + len(entry) + self.ENTRY.size > self.capacity:   # room for the end mark
                    if not self.full:
                        self.full = True
                        log.error("audit reserve file %s full (%d records): records held in memory beyond it "
                                  "are lost if the process is killed", self.path, len(self._ids) + len(ids))
                    break
                chunks.append(entry)
                ids.append(record.record_id)
                offset += len(entry)
            if not chunks:
                return 0
            data = b"".join(chunks)
            try:
                # The end mark: a zero length after the last entry (the space was zeroes
                # when allocated, but an earlier generation may have left entries there).
                os.pwrite(self._fd, data + b"\0" * self.ENTRY.size, self._offset)
                os.fdatasync(self._fd)
            except OSError as exc:
                if not self._write_failed:
                    self._write_failed = True
                    log.error("audit reserve file %s could not be written (%s): records held in memory beyond "
                              "it are lost if the process is killed (logged once until a write succeeds)",
                              self.path, exc)
                return 0
            self._write_failed = False
            self._offset = offset
            self._ids.update(ids)
            return len(ids)

    def forget(self, record_ids: Sequence[str]) -> None:
        """These records are no longer only in memory; once none is left, empty the file."""
        with self._lock:
            for record_id in record_ids:
                if record_id not in self._pinned:
                    self._ids.discard(record_id)
            if self._ids or self._offset == self.HEADER.size:
                return
            try:
                # Zeroes over the entries (their resources name households: nothing of
                # them lingers once delivered, as in the outbox), then the new generation
                # (taken only once written: entries appended later carry the file's own).
                os.pwrite(self._fd, bytes(self._offset - self.HEADER.size), self.HEADER.size)
                self._write_header(self._generation + 1)
            except OSError as exc:   # the old entries stay; replayed, they are appended once
                log.error("audit reserve file %s could not be emptied (%s)", self.path, exc)
                return
            self._generation += 1
            self._offset = self.HEADER.size
            self.full = False

    def keep_at_close(self, record_ids: Sequence[str]) -> None:
        """Records the closing sink leaves in the file for the next start: never forgotten."""
        with self._lock:
            self._pinned.update(record_ids)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _record_dict(record: AuditRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in AuditRecord.__slots__}


# ---------------------------------------------------------------------------------------
# helpers for the interceptor and the gateway
# ---------------------------------------------------------------------------------------

def _resource_of(request: object) -> str:
    """``household:<account_id>`` from a request's ``account_id`` or ``scope.account_id``;
    "" for streams and requests about several households."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return ""
    fields = descriptor.fields_by_name
    if "account_id" in fields:
        return household_resource(getattr(request, "account_id"))
    if "scope" in fields and request.HasField("scope"):
        scope = request.scope
        if "account_id" in scope.DESCRIPTOR.fields_by_name:
            return household_resource(scope.account_id)
    if "account_ids" in fields:
        ids = set(getattr(request, "account_ids"))
        if len(ids) == 1:
            return household_resource(next(iter(ids)))
    return ""


def _claimed(metadata) -> tuple[str, str]:
    values = dict((k, v) for k, v in (metadata or ()) if isinstance(v, str))
    pid, role = values.get(identity.PRINCIPAL_KEY, ""), values.get(identity.ROLE_KEY, "")
    pid = pid if identity.valid_principal_id(pid) else ""
    role = role if role in identity.Role._value2member_map_ else ""
    return pid, role


def event_for(method: str, code: grpc.StatusCode) -> str | None:
    """The event type of a finished RPC, or None when it is not audited."""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PERMISSION_DENIED
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AUTHENTICATION_FAILURE
    spec = RPC_EVENTS.get(method)
    if spec is None:
        return None
    if isinstance(spec, tuple):
        return spec[0] if code == grpc.StatusCode.OK else spec[1]
    return spec


# Details the handler of the RPC being served adds to that RPC's own record
# (``add_rpc_details``; e.g. SetConsent's old and new flags); read and cleared by
# ``record_rpc`` when the call finishes. A gRPC worker thread keeps its context from one
# call to the next, so ``record_rpc`` clears it on every call, audited or not.
_rpc_details: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("audit_rpc_details",
                                                                                      default=None)


def add_rpc_details(**details: Any) -> None:
    """Add ``details`` to the audit record of the RPC this thread is serving (merged over
    the interceptor's ``rpc`` / ``code`` / ``component``, which they cannot replace).
    Only what the audit log may hold: no personal data beyond the record's resource."""
    current = _rpc_details.get()
    _rpc_details.set({**(current or {}), **details})


def record_rpc(component: str, method: str, request: object,
               principal: identity.Principal | None, metadata, code: grpc.StatusCode,
               trace_id: str) -> None:
    """Called by the server interceptor after every RPC. Never raises: auditing must not
    change the outcome of the call it describes."""
    extra = _rpc_details.get()
    if extra is not None:
        _rpc_details.set(None)
    if not installed():
        return
    try:
        event_type = event_for(method, code)
        if event_type is None:
            return
        if principal is None:
            pid, role = _claimed(metadata)
            principal = identity.Principal(pid or ANONYMOUS, identity.Role(UNAUTHENTICATED_ROLE))
            details_json = details_to_json({"rpc": method.lstrip("/"), "code": code.name, "component": component,
                                            "authenticated": "false", "claimed_role": role})
        elif extra:
            details_json = details_to_json({**extra, "rpc": method.lstrip("/"), "code": code.name,
                                            "component": component})
        else:
            details_json = _rpc_details_json(component, method, code)
        sink = _sink
        sink.submit(make_record(event_type, _resource_of(request), outcome_for(code), principal=principal,
                                trace_id=trace_id, fallback_service=sink.component, details_json=details_json))
    except Exception:  # noqa: BLE001
        log.exception("auditing %s failed", method)


# (component, method, status) -> the details JSON of an authenticated RPC's record: the
# same few strings for every call of a method, frozen once instead of per RPC.
_RPC_DETAILS: dict[tuple[str, str, grpc.StatusCode], str] = {}


def _rpc_details_json(component: str, method: str, code: grpc.StatusCode) -> str:
    key = (component, method, code)
    known = _RPC_DETAILS.get(key)
    if known is None:
        if len(_RPC_DETAILS) > 4096:   # bounded: unknown methods are refused before here
            _RPC_DETAILS.clear()
        known = _RPC_DETAILS[key] = details_to_json(
            {"rpc": method.lstrip("/"), "code": code.name, "component": component})
    return known


# Authentication failures are audited at most this often per (reason, route): a bucket of
# AUTH_FAILURE_AUDIT_BURST records refilled at AUTH_FAILURE_AUDIT_PER_S. Past it they are
# counted, and the next record of the same (reason, route) says how many it stands for
# (details.suppressed); hearth_auth_failures_total still counts every one. Until session
# 18 each anonymous 401 appended one record to the tamper-evident log, so an anonymous
# flood grew the audit store without bound and buried the real events (docs/security.md).
# Permission denials (403s) get the same budget per (principal, reason, route), with their
# own buckets (hearth_access_denied_total counts every one): until session 19 each was a
# record, so an authenticated principal calling a route it may not grew the log without
# bound. The first AUTH_FAILURE_AUDIT_BURST of each are kept whole, so a principal probing
# routes is still seen, by name, on every route it probes.
AUTH_FAILURE_AUDIT_PER_S = 1.0
AUTH_FAILURE_AUDIT_BURST = 10


class _FailureBudget:
    """Token buckets per key; ``take(key)`` -> (allowed, failures suppressed since the
    key's last allowed one).

    Why not ``identity.SecurityEventLog``'s coalescing (one log line, then one count per
    window): the two sinks want different things. The audit log is evidence, kept for
    years and queried per principal, so a flood's first ``AUTH_FAILURE_AUDIT_BURST``
    refusals are recorded whole (who, which route, which reason — an investigator wants
    the first attempts, not one of them) and a steady flood goes on at one record a second
    carrying the count suppressed before it; the log is read by people and costs bytes, so
    it keeps one line per key and window. Decided in session 35 (closing note 34, item 3)."""

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_s, self._burst, self._clock = per_s, burst, clock
        self._state: dict[tuple[str, ...], list[float]] = {}   # key -> [tokens, last, suppressed]
        self._lock = threading.Lock()

    def take(self, key: tuple[str, ...]) -> tuple[bool, int]:
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is None:
                if len(self._state) >= 4096:   # bounded: targets and reasons are few
                    self._state.clear()
                state = self._state[key] = [float(self._burst), now, 0]
            state[0] = min(float(self._burst), state[0] + (now - state[1]) * self._per_s)
            state[1] = now
            if state[0] < 1.0:
                state[2] += 1
                return False, 0
            state[0] -= 1.0
            suppressed, state[2] = int(state[2]), 0
            return True, suppressed


def security_listener(component: str, clock: Callable[[], float] = time.monotonic
                      ) -> Callable[[identity.SecurityEvent], None]:
    """A listener for ``identity.add_security_listener`` that records authentication
    failures and permission denials of ``component`` (the gateway: refusals that never
    reach a service). Rate-limit refusals are counted in metrics, not audited.
    Authentication failures are coalesced per (reason, route) past a small budget
    (``AUTH_FAILURE_AUDIT_*``), denials per (principal, reason, route) with the same
    budget in buckets of their own: a principal's flood of 403s cannot use up the
    anonymous budget, nor the reverse."""
    budget = _FailureBudget(AUTH_FAILURE_AUDIT_PER_S, AUTH_FAILURE_AUDIT_BURST, clock)
    denials = _FailureBudget(AUTH_FAILURE_AUDIT_PER_S, AUTH_FAILURE_AUDIT_BURST, clock)

    def listener(event: identity.SecurityEvent) -> None:
        if event.component != component:
            return
        suppressed = 0
        if event.kind == "authentication_failed":
            allowed, suppressed = budget.take((event.reason, event.target))
            if not allowed:
                return
            event_type = AUTHENTICATION_FAILURE
        elif event.kind == "permission_denied":
            allowed, suppressed = denials.take((event.principal_id, event.reason, event.target))
            if not allowed:
                return
            event_type = PERMISSION_DENIED
        else:
            return
        details = {"reason": event.reason, "target": event.target, "component": component}
        if suppressed:
            details["suppressed"] = str(suppressed)
        if event.principal_id and event.role and event.kind == "permission_denied":
            principal = identity.Principal(event.principal_id, identity.Role(event.role))
        else:
            principal = identity.Principal(event.principal_id or ANONYMOUS,
                                           identity.Role(UNAUTHENTICATED_ROLE))
            details["authenticated"] = "false"
            details["claimed_role"] = event.role
        _sink.record(event_type, f"route:{event.target}" if event.target else "", DENIED, details,
                     principal=principal)

    return listener
