"""The prediction log: every assignment is recorded for the feedback service without
slowing the assign path, and nothing acknowledged is lost.

Two stages. (1) An assignment's record is group-committed to the local
``prediction_outbox`` table before the assign RPC answers (one transaction for many
concurrent assignments), so a prediction id handed to a caller always exists durably.
(2) A forwarder thread sends outbox rows to the feedback service in batches
(RecordPrediction is idempotent by prediction_id, so a resend after a crash is
harmless) and deletes them once acknowledged; while feedback is down, rows wait.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from opentelemetry import trace
from prometheus_client import Counter, Gauge

from services.common import telemetry
from services.common.batching import GroupCommitter
from services.common.predictions import PredictionRecord  # noqa: F401 - re-exported
from services.common.storage.sql import Database, Tx

log = logging.getLogger("hearth.clustering.predictions")
FORWARDED = Counter("hearth_predictions_forwarded_total", "Predictions delivered to the feedback service")
FORWARD_FAILURES = Counter("hearth_prediction_forward_failures_total", "Failed deliveries (retried)")
OUTBOX_DEPTH = Gauge("hearth_prediction_outbox_depth", "Predictions waiting for delivery")


@dataclass(frozen=True)
class SessionPerson:
    """An assigned session's person, stored with the prediction (same transaction)."""

    account_id: str
    session_id: str
    person_id: str
    probabilities: dict[str, float]


_RECORD_FIELDS = tuple(f.name for f in fields(PredictionRecord))
_RECORD_VALUES = operator.attrgetter(*_RECORD_FIELDS)


# The records are plain str/float/int/dict values built by the service: no cycle check.
_ENCODE = json.JSONEncoder(check_circular=False, separators=(",", ":")).encode

# Each outbox row carries the traceparent of the request span that made the prediction:
# the forwarder runs later on a thread of its own, so its RecordPrediction call is a trace
# of its own, whose ``predictions.forward`` span links back to each request's span. A row
# written before session 18 is a JSON object of named fields (with, since session 17, the
# traceparent under this key); forward_once still reads those.
_TRACE_KEY = "traceparent"
# OpenTelemetry's default cap on links per span; a batch from more requests links its first ones.
MAX_LINKS = 128


class _Request:
    """One ``record`` call, queued for the outbox as one item: its predictions, its
    sessions' persons and the traceparent of the span that made them (read once per
    request, not per prediction)."""

    __slots__ = ("records", "persons", "traceparent")

    def __init__(self, records: Sequence[PredictionRecord], persons: Sequence[SessionPerson],
                 traceparent: str) -> None:
        self.records, self.persons, self.traceparent = records, persons, traceparent


def _traceparent() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}" if ctx.is_valid else ""


def _link(traceparent: str) -> trace.Link | None:
    try:
        _version, trace_id, span_id, flags = traceparent.split("-")
        ctx = trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                trace_flags=trace.TraceFlags(int(flags, 16)))
    except ValueError:
        return None
    return trace.Link(ctx) if ctx.is_valid else None


def _payload(record: PredictionRecord, traceparent: str = "") -> str:
    """The outbox row's JSON: ``[traceparent, *the record's fields in declaration order]``
    (PredictionRecord adds fields only at the end, with a default, so an older row still
    reads). A positional array, not an object of named fields: encoding, parsing and
    storing the fifteen names cost more than the values (session 18, docs/benchmarks.md)."""
    return _ENCODE((traceparent, *_RECORD_VALUES(record)))


def _decode(payloads: Sequence[str]) -> tuple[list[PredictionRecord], list[str]]:
    """Outbox payloads -> their records and the distinct traceparents, first seen first
    (one request's predictions share one). Parsed as one JSON array, not one call a row."""
    records, traceparents = [], {}
    for row in json.loads("[" + ",".join(payloads) + "]"):
        if type(row) is dict:       # written before session 18: named fields
            traceparents[row.pop(_TRACE_KEY, "")] = None
            records.append(PredictionRecord(**row))
        else:
            traceparents[row[0]] = None
            records.append(PredictionRecord(*row[1:]))
    return records, list(traceparents)


# The longest pause between delivery attempts while feedback is unreachable. It bounds how
# long predictions made after feedback is back wait for delivery, so it stays below the
# gateway's HEARTH_FEEDBACK_PREDICTION_WAIT_S (2 s): feedback sent at once on them is then
# not refused 404. (It was 10 s: after a feedback outage of ~6 s or more, every feedback
# sent right after its assignment got 404 for up to 10 s.)
MAX_FORWARD_BACKOFF_S = 1.0


class PredictionLog:
    def __init__(self, db: Database, send: Callable[[Sequence[PredictionRecord]], None] | None,
                 *, forward_interval_s: float = 0.2, batch: int = 1000,
                 session_writer: Callable[[Tx, Sequence[tuple]], None] | None = None) -> None:
        self._db = db
        # Writes (account, session, person, probabilities) rows inside the outbox's
        # transaction (ClusteringStore.write_persons); None = the caller stores them.
        self._session_writer = session_writer
        self._send = send
        self._batch = batch
        self._interval = forward_interval_s
        self._committer: GroupCommitter[_Request] = GroupCommitter(
            self._store, max_batch=2048, max_delay_s=0.001, name="prediction-outbox")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._forward_loop, name="prediction-forwarder", daemon=True)
        if send is not None:
            self._thread.start()

    @property
    def writes_session_persons(self) -> bool:
        return self._session_writer is not None

    def record(self, records: Sequence[PredictionRecord], persons: Sequence[SessionPerson] = ()) -> None:
        """Durably queue records (and, with a ``session_writer``, the assigned sessions'
        persons); returns once they are committed."""
        if persons and self._session_writer is None:
            raise ValueError("this prediction log has no session_writer")
        n = len(records) + len(persons)
        if n:   # one item per request, weighing what it holds towards the batch size
            self._committer.write([_Request(records, persons, _traceparent())], weight=n)

    def _store(self, requests: Sequence[_Request]) -> int:
        now = time.time()
        rows, persons = [], []
        for request in requests:
            traceparent = request.traceparent
            rows += [(r.prediction_id, r.account_id, r.session_id, _payload(r, traceparent), now)
                     for r in request.records]
            persons += request.persons
        with self._db.transaction() as tx:
            stored = tx.executemany(
                "INSERT INTO prediction_outbox (prediction_id, account_id, session_id, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (prediction_id) DO NOTHING", rows)
            if persons:
                self._session_writer(tx, [(p.account_id, p.session_id, p.person_id, p.probabilities)
                                          for p in persons])
        return stored

    def forward_once(self) -> int:
        """Send one batch; returns how many were delivered."""
        with self._db.transaction(readonly=True) as tx:
            rows = tx.query("SELECT prediction_id, payload FROM prediction_outbox "
                            "ORDER BY created_at, prediction_id LIMIT ?", (self._batch,))
            # A short page is the whole outbox: count only when there may be more.
            depth = len(rows) if len(rows) < self._batch else \
                tx.query("SELECT COUNT(*) FROM prediction_outbox")[0][0]
        OUTBOX_DEPTH.set(depth)
        if not rows or self._send is None:
            return 0
        records, traceparents = _decode([payload for _, payload in rows])
        # One request's predictions share its traceparent: each request is linked once.
        links = [link for link in map(_link, traceparents) if link is not None][:MAX_LINKS]
        with telemetry.safe_span(telemetry.tracer("hearth.clustering.predictions"), "predictions.forward",
                                 links=links, attributes={"hearth.predictions": len(records)}):
            self._send(records)
        with self._db.transaction() as tx:
            tx.executemany("DELETE FROM prediction_outbox WHERE prediction_id = ?", [(r[0],) for r in rows])
        FORWARDED.inc(len(rows))
        return len(rows)

    def _forward_loop(self) -> None:
        backoff = self._interval
        while not self._stop.wait(backoff):
            try:
                while self.forward_once() == self._batch:
                    pass
                backoff = self._interval
            except Exception as exc:  # noqa: BLE001 - feedback down or DB busy: retry later
                FORWARD_FAILURES.inc()
                if backoff == self._interval:   # the first of a run of failures; the metric counts all
                    log.warning("prediction forwarding failed, will retry: %s", exc)
                backoff = min(backoff * 2, max(self._interval, MAX_FORWARD_BACKOFF_S))

    def close(self) -> None:
        self._committer.close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
            try:
                self.forward_once()   # last chance to deliver before stopping
            except Exception:  # noqa: BLE001 - rows stay in the outbox for next start
                pass
