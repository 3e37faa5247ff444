"""The prediction log: every assignment is recorded for the feedback service without
slowing the assign path, and nothing acknowledged is lost.

Two stages. (1) An assignment's record is group-committed to the local outbox before the
assign RPC answers (one transaction for many concurrent assignments), so a prediction id
handed to a caller always exists durably. (2) A forwarder thread sends the outbox to the
feedback service in batches (RecordPrediction is idempotent by prediction_id, so a resend
after a crash is harmless) and deletes what was acknowledged; while feedback is down, it waits.

The outbox holds chunks (``prediction_chunks``, since session 19): one row per up to a
forward batch of predictions, its body the serialized ``RecordPredictionRequest`` the
forwarder sends — built once, at commit, never parsed back into records or rebuilt (the
JSON row a prediction, its parse and the protobuf built from it at forwarding were most
of the service's CPU on AssignSessions: docs/benchmarks.md "## bench-assign"). Rows of
``prediction_outbox`` (one JSON row a prediction, written before session 19) still forward.
An erasure rewrites the chunks that hold the household's predictions without them
(``erase_pending``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from hearth.feedback.v1 import feedback_pb2 as fpb
from services.common import telemetry
from services.common.batching import GroupCommitter
from services.common.errors import refusal_of
from services.common.pbutil import float_to_ts
from services.common.pbutil import varint as _varint
from services.common.ids import MAX_FUTURE_SKEW_S
from services.common.predictions import PredictionRecord  # noqa: F401 - re-exported
from services.common.predictions import retention_instant
from services.common.storage.sql import Database, Tx

log = logging.getLogger("hearth.clustering.predictions")
FORWARDED = Counter("hearth_predictions_forwarded_total", "Predictions delivered to the feedback service")
FORWARD_FAILURES = Counter("hearth_prediction_forward_failures_total", "Failed deliveries (retried)")
OUTBOX_DEPTH = Gauge("hearth_prediction_outbox_depth", "Predictions waiting for delivery")
EXPIRED = Counter("hearth_predictions_expired_total",
                  "Predictions not forwarded: about a session already outside the retention window "
                  "(feedback refuses them; the purge would erase them)")
CONFLICTING = Counter("hearth_predictions_conflicting_total",
                      "Predictions not forwarded: feedback holds their prediction id with other content "
                      "(ALREADY_EXISTS); feedback keeps the first")


@dataclass(frozen=True)
class SessionPerson:
    """An assigned session's person, stored with the prediction (same transaction)."""

    account_id: str
    session_id: str
    person_id: str
    probabilities: dict[str, float]


_RECORD_FIELDS = tuple(f.name for f in fields(PredictionRecord))

# Each chunk carries the traceparents of the request spans that made its predictions: the
# forwarder runs later on a thread of its own, so its RecordPrediction call is a trace of
# its own, whose ``predictions.forward`` span links back to each request's span. Since
# session 20 the column says which predictions each one made: ``traceparent*n`` for a run
# of n predictions in the body's order (``*n`` for a request without a valid span), so an
# erasure that cuts a household's predictions out of a chunk drops the traceparents of its
# requests too (``_kept_runs``); before, the rewritten chunk kept them. A row of
# prediction_outbox carries its request's traceparent first (session 18) or, before, under
# this key of its JSON object (session 17); forward_once still reads those.
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


_CONFLICT_FIELD = re.compile(r"predictions\[(\d+)\]\.prediction_id")


def _conflicting_index(exc: BaseException, n: int) -> int | None:
    """The index feedback's ALREADY_EXISTS names (``predictions[i].prediction_id``), or None."""
    refusal = refusal_of(exc)
    if refusal is None or refusal[0] != grpc.StatusCode.ALREADY_EXISTS:
        return None
    found = _CONFLICT_FIELD.fullmatch(refusal[1])
    return int(found.group(1)) if found and int(found.group(1)) < n else None


def to_request(records: Iterable[PredictionRecord]) -> fpb.RecordPredictionRequest:
    """The RecordPrediction request feedback receives for these records. A request's
    predictions share one ``ts``: its Timestamp is built once and copied."""
    prediction = fpb.Prediction
    stamps: dict[float, Timestamp] = {}

    def stamp(seconds: float) -> Timestamp:
        ts = stamps.get(seconds)
        if ts is None:
            ts = stamps[seconds] = float_to_ts(seconds)
        return ts

    return fpb.RecordPredictionRequest(predictions=[prediction(
        prediction_id=r.prediction_id, account_id=r.account_id, session_id=r.session_id,
        person_id=r.person_id, probabilities=r.probabilities, model_variant=r.model_variant,
        model_version=r.model_version, ts=stamp(r.ts), cold_start=r.cold_start,
        household_size=r.household_size, device_id=r.device_id, model_sessions=r.model_sessions,
        calibration_group=r.calibration_group,
        **({"session_start": float_to_ts(r.session_start), "session_end": float_to_ts(r.session_end)}
           if r.session_start is not None and r.session_end is not None else {})) for r in records])


# The fields that differ between a household's predictions in one request; the others are
# serialized once per distinct value (``_head``). Their numbers in feedback.proto's
# Prediction: 1, 3, 4 and 5 (a map<string, double>: entries of key 1, value 2).
_VARYING = ("prediction_id", "session_id", "person_id", "probabilities")
_SHARED_FIELDS = tuple(f for f in _RECORD_FIELDS if f not in _VARYING)
_SHARED = operator.attrgetter(*_SHARED_FIELDS)
_DOUBLE = struct.Struct("<d").pack
_TS_AT = _SHARED_FIELDS.index("ts")
_TS_NUMBER = fpb.Prediction.DESCRIPTOR.fields_by_name["ts"].number
# What ``_head`` has serialized, kept across requests (a household's shared fields are
# the same from one AssignSessions message to the next but for ``ts``): the fields before
# and after ``ts`` by the other shared values, and ``ts``'s own bytes by its value. Emptied
# when full (a cache, not a record of anything). An entry is dropped HEAD_CACHE_TTL_S
# after it was written (``_expire_heads``, on a timer): its keys and bytes are households'
# account and device ids and sessions' instants, and an erasure served by another replica
# cannot empty this process's copy (``forget_cached_heads`` runs on the replica that
# served the Erase only), so this bounds how long an erased household's bytes stay here
# (docs/privacy.md §11, "clustering's prediction outbox").
_HEAD_CACHE = 4096
HEAD_CACHE_TTL_S = 10.0
_HEADS: dict[tuple, tuple[bytes, bytes]] = {}
_STAMPS: dict[float, bytes] = {}
# When each entry was written (time.monotonic), oldest first: an entry is only ever
# inserted (never replaced), so a dict's insertion order is its age order.
_BORN: dict[tuple[int, object], float] = {}
_cache_lock = threading.Lock()   # writes to the caches; reads take no lock
_expiry: threading.Timer | None = None
_expiry_due = 0.0                # when it fires (time.monotonic)


def _string(tag: bytes, value: str) -> bytes:
    if not value:              # proto3 leaves an empty string out
        return b""
    data = value.encode()
    return tag + _varint(len(data)) + data


def _head(values: tuple) -> bytes:
    """The shared fields (``values``: ``_SHARED(record)``) as ``to_request`` serializes them
    for a record whose four varying fields are blank. Serialized by protobuf itself (a
    field added to PredictionRecord and Prediction comes along), once per distinct value
    of the fields but ``ts`` and once per ``ts``: a message's fields are written in the
    order of their numbers, so the bytes of those before ``ts``, ``ts``'s and those after
    it concatenate to the message's (tests/unit/clustering/test_prediction_runs.py)."""
    ts = values[_TS_AT]
    rest = values[:_TS_AT] + values[_TS_AT + 1:]
    parts = _HEADS.get(rest)
    if parts is None:
        blank = PredictionRecord(prediction_id="", session_id="", person_id="", probabilities={},
                                 **dict(zip(_SHARED_FIELDS, values)))
        message = to_request([blank]).predictions[0]
        before, after = fpb.Prediction(), fpb.Prediction()
        before.CopyFrom(message)
        after.CopyFrom(message)
        for field, _ in message.ListFields():
            if field.number >= _TS_NUMBER:
                before.ClearField(field.name)
            if field.number <= _TS_NUMBER:
                after.ClearField(field.name)
        parts = _cache(_HEADS, 0, rest, (before.SerializeToString(), after.SerializeToString()))
    stamp = _STAMPS.get(ts)
    if stamp is None:
        stamp = _cache(_STAMPS, 1, ts, fpb.Prediction(ts=float_to_ts(ts)).SerializeToString())
    return parts[0] + stamp + parts[1]


def _cache(cache: dict, which: int, key, value):
    """Keep ``value`` under ``key`` in ``cache`` (``_HEADS``: 0, ``_STAMPS``: 1) with its
    time of writing, emptying the cache when full, and make sure an expiry is due."""
    global _expiry
    with _cache_lock:
        if len(cache) >= _HEAD_CACHE:
            for k in list(cache):
                _BORN.pop((which, k), None)
            cache.clear()
        cache[key] = value
        _BORN.pop((which, key), None)
        now = _BORN[(which, key)] = time.monotonic()
        if _expiry is None or _expiry_due > now + HEAD_CACHE_TTL_S:   # (the TTL was shortened)
            if _expiry is not None:
                _expiry.cancel()
            _timer(HEAD_CACHE_TTL_S)
    return value


def _timer(delay_s: float) -> None:
    """Schedule ``_expire_heads`` in ``delay_s`` (``_cache_lock`` held), in place of the
    one scheduled before (a timer that fired and waited for the lock while a write
    replaced it would otherwise go on as a second chain of timers)."""
    global _expiry, _expiry_due
    if _expiry is not None and _expiry is not threading.current_thread():
        _expiry.cancel()
    delay_s = max(delay_s, 0.0)
    _expiry = threading.Timer(delay_s, _expire_heads)
    _expiry.name, _expiry.daemon = "prediction-head-expiry", True
    _expiry_due = time.monotonic() + delay_s
    _expiry.start()


# An expiry also drops the entries that would be due within the next HEAD_CACHE_TTL_S /
# _EXPIRY_BATCHES (0.5 s): entries are written at their own instants (one a household's
# prediction that misses the cache), and an expiry per entry started a timer thread per
# entry — about 0.2 ms of CPU each, 2,239 threads for 2,441 entries written over 3 s
# (review22). An entry is dropped at most HEAD_CACHE_TTL_S after it was written, as
# before, and at least HEAD_CACHE_TTL_S minus that slack after; at most one expiry runs
# per slack.
_EXPIRY_BATCHES = 20


def _expire_heads() -> None:
    """Drop the entries written HEAD_CACHE_TTL_S ago or more (and those due within the
    slack, ``_EXPIRY_BATCHES``); come back when the oldest left is due (none left: no timer
    until the next write)."""
    global _expiry
    with _cache_lock:
        now = time.monotonic()
        cutoff = now - HEAD_CACHE_TTL_S * (1.0 - 1.0 / _EXPIRY_BATCHES)
        for (which, key), born in list(_BORN.items()):
            if born > cutoff:
                _timer(born + HEAD_CACHE_TTL_S - now)
                return
            (_HEADS, _STAMPS)[which].pop(key, None)
            del _BORN[(which, key)]
        if _expiry is not None and _expiry is not threading.current_thread():
            _expiry.cancel()
        _expiry = None


def forget_cached_heads() -> None:
    """Drop what ``_head`` keeps across messages: its keys and bytes are households'
    account and device ids and their sessions' first and last instants, so an erasure
    empties it (``ClusteringStore.erase``) rather than leave them in the process until
    the cache fills (review21). Other replicas' caches drop them HEAD_CACHE_TTL_S after
    they were written (``_expire_heads``)."""
    with _cache_lock:
        _HEADS.clear()
        _STAMPS.clear()
        _BORN.clear()


def _encode(records: Iterable[PredictionRecord]) -> bytes:
    """``to_request(records).SerializeToString()``, without a message a record: what it
    parses as is the same request (tests/unit/clustering/test_prediction_log_rows.py holds
    the two equal). A household's predictions in one request share every field but the
    four of ``_VARYING``: the shared ones are serialized once per distinct value
    (``_head``), the four are written here; a map entry's key is encoded once per person id."""
    shared: dict[tuple, bytes] = {}
    entries: dict[str, bytes] = {}
    out = []
    for r in records:
        key = _SHARED(r)
        head = shared.get(key)
        if head is None:
            head = shared[key] = _head(key)
        parts = [head, _string(b"\x0a", r.prediction_id), _string(b"\x1a", r.session_id),
                 _string(b"\x22", r.person_id)]
        for person, probability in r.probabilities.items():
            prefix = entries.get(person)
            if prefix is None:
                name = _string(b"\x0a", person) if person else b""
                prefix = entries[person] = b"\x2a" + _varint(len(name) + 9) + name + b"\x11"
            parts.append(prefix + _DOUBLE(probability))
        message = b"".join(parts)
        out.append(b"\x0a" + _varint(len(message)) + message)   # RecordPredictionRequest.predictions = 1
    return b"".join(out)


class PredictionRun(Sequence[PredictionRecord]):
    """The predictions of one household's answers made together (one message's rows of it,
    ``ClusteringApp._household_answers``), held by column: every field but the four of
    ``_VARYING`` is the same for all of them and held once (``shared``: a record whose
    four are blank), the four as lists. It is the records it stands for (``run[i]``,
    iteration, ``list(run)`` build them); the outbox writes its bytes without them
    (``_encode_run``: the same bytes as ``_encode(list(run))``, tests/unit/clustering/
    test_prediction_runs.py), which saves building a frozen dataclass a prediction and
    reading its shared fields back."""

    __slots__ = ("shared", "prediction_ids", "session_ids", "person_ids", "probabilities")

    def __init__(self, shared: PredictionRecord, prediction_ids: Sequence[str], session_ids: Sequence[str],
                 person_ids: Sequence[str], probabilities: Sequence[dict[str, float]]) -> None:
        if not len(prediction_ids) == len(session_ids) == len(person_ids) == len(probabilities):
            raise ValueError("a run's columns must have one value per prediction")
        self.shared = shared
        self.prediction_ids, self.session_ids = prediction_ids, session_ids
        self.person_ids, self.probabilities = person_ids, probabilities

    def __len__(self) -> int:
        return len(self.prediction_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PredictionRun(self.shared, self.prediction_ids[i], self.session_ids[i], self.person_ids[i],
                                 self.probabilities[i])
        return replace(self.shared, prediction_id=self.prediction_ids[i], session_id=self.session_ids[i],
                       person_id=self.person_ids[i], probabilities=self.probabilities[i])

    def __repr__(self) -> str:
        return f"PredictionRun({self.shared!r}, {len(self)} predictions)"


class PredictionRuns(Sequence[PredictionRecord]):
    """The predictions of one request as the runs (or lists of records) that made them:
    what ``PredictionLog.record`` takes from ``ClusteringApp.answer_many``. A sequence of
    the records, in order, like the list it stands for."""

    __slots__ = ("pieces", "_n")

    def __init__(self, pieces: Iterable[Sequence[PredictionRecord]]) -> None:
        self.pieces = [p for p in pieces if len(p)]
        self._n = sum(map(len, self.pieces))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[PredictionRecord]:
        for piece in self.pieces:
            yield from piece

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("prediction index out of range")
        for piece in self.pieces:
            if i < len(piece):
                return piece[i]
            i -= len(piece)
        raise IndexError("prediction index out of range")   # pragma: no cover - the length said otherwise


def _pieces(records: Sequence[PredictionRecord]) -> list[Sequence[PredictionRecord]]:
    """A ``record`` call's predictions as the pieces the outbox encodes: its runs, or the
    list of records it is."""
    if isinstance(records, PredictionRuns):
        return records.pieces
    return [records] if len(records) else []


def _encode_run(run: PredictionRun) -> bytes:
    """``_encode(list(run))``: the shared fields' bytes once (``_head``), then each
    prediction's id, session id (its id's bytes when it is the id: a bare vector's), person
    and probabilities, as ``_encode`` writes them."""
    head = _head(_SHARED(run.shared))
    persons: dict[str, bytes] = {}
    entries: dict[str, bytes] = {}
    out = []
    for prediction_id, session_id, person_id, probabilities in zip(
            run.prediction_ids, run.session_ids, run.person_ids, run.probabilities):
        pid = _string(b"\x0a", prediction_id)
        parts = [head, pid, b"\x1a" + pid[1:] if session_id == prediction_id and pid else _string(b"\x1a", session_id)]
        person = persons.get(person_id)
        if person is None:
            person = persons[person_id] = _string(b"\x22", person_id)
        parts.append(person)
        for name, probability in probabilities.items():
            prefix = entries.get(name)
            if prefix is None:
                key = _string(b"\x0a", name) if name else b""
                prefix = entries[name] = b"\x2a" + _varint(len(key) + 9) + key + b"\x11"
            parts.append(prefix)
            parts.append(_DOUBLE(probability))
        message = b"".join(parts)
        out.append(b"\x0a" + _varint(len(message)) + message)   # RecordPredictionRequest.predictions = 1
    return b"".join(out)


def _encode_piece(piece: Sequence[PredictionRecord]) -> bytes:
    return _encode_run(piece) if isinstance(piece, PredictionRun) else _encode(piece)


def _piece_accounts(piece: Sequence[PredictionRecord]) -> Iterable[str]:
    return (piece.shared.account_id,) if isinstance(piece, PredictionRun) else (r.account_id for r in piece)


def _piece_starts(piece: Sequence[PredictionRecord]) -> Iterable[float | None]:
    return (piece.shared.session_start,) if isinstance(piece, PredictionRun) else (r.session_start for r in piece)


def _decode(payloads: Sequence[str]) -> tuple[list[PredictionRecord], list[str]]:
    """prediction_outbox payloads (written before session 19) -> their records and the
    distinct traceparents, first seen first. A payload is ``[traceparent, *the record's
    fields in declaration order]`` (session 18; PredictionRecord adds fields only at the
    end, with a default, so a shorter row still reads) or an object of named fields."""
    records, traceparents = [], {}
    for row in json.loads("[" + ",".join(payloads) + "]"):
        if type(row) is dict:       # written before session 18: named fields
            traceparents[row.pop(_TRACE_KEY, "")] = None
            records.append(PredictionRecord(**row))
        else:
            traceparents[row[0]] = None
            records.append(PredictionRecord(*row[1:]))
    return records, list(traceparents)


def _like_pattern(account_id: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for chunks whose ``accounts`` (" a b ") name the account."""
    escaped = account_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"% {escaped} %"


def erase_pending(tx: Tx, doomed: Callable[[str, str], bool], account_id: str | None,
                  dialect: str = "sqlite", sessions_before: float | None = None,
                  about: Callable[[fpb.Prediction], bool] | None = None) -> list[str]:
    """Delete the undelivered predictions ``doomed(account_id, session_id)`` selects (and,
    in the chunks, those ``about(prediction)`` selects by what they record), in the
    erasing transaction; returns their ids. ``account_id``: the only household they can
    belong to (None = any: the retention purge over every account). ``sessions_before``:
    none of the doomed is about a session that started at or after it, so a chunk whose
    every prediction's session did (``session_from``, migration 9) is not read — the
    retention purge reads the chunks about its old sessions, not the whole backlog. A chunk
    that keeps other predictions is rewritten without them (``secure_delete`` zeroes the
    old cells).

    A forward in flight that carries any of them is waited for, so that what it delivers
    reaches feedback before this erasure commits (and so before feedback's own erase, which
    the deletion job calls after clustering's): on PostgreSQL by locking the rows (``FOR
    UPDATE``: a forwarder holds the rows it sends locked until it has deleted them,
    ``PredictionLog._claim``; a row it delivered meanwhile is gone, not erased twice), on
    SQLite by the caller holding ``excluding_forwards`` around the transaction."""
    lock = " ORDER BY 1 FOR UPDATE" if dialect == "postgres" else ""   # one order: erasures never deadlock
    where, params = _chunks_of(account_id, sessions_before)
    if account_id is None:
        legacy = tx.query("SELECT prediction_id, account_id, session_id, payload FROM prediction_outbox" + lock)
    else:
        legacy = tx.query("SELECT prediction_id, account_id, session_id, payload FROM prediction_outbox "
                          "WHERE account_id = ?" + lock, (account_id,))
    chunks = [(chunk_id, traceparents, body) for chunk_id, accounts, traceparents, body in tx.query(
        f"SELECT chunk_id, accounts, traceparents, body FROM prediction_chunks WHERE {where}" + lock,
        params) if account_id is None or account_id in accounts.split()]   # LIKE may match more (case)
    gone = [r[0] for r in legacy if doomed(r[1], r[2]) or (about is not None and about(_legacy_prediction(r[3])))]
    tx.executemany("DELETE FROM prediction_outbox WHERE prediction_id = ?", [(p,) for p in gone])
    for chunk_id, traceparents, body in chunks:
        request = fpb.RecordPredictionRequest.FromString(bytes(body))
        keep = [not (doomed(p.account_id, p.session_id) or (about is not None and about(p)))
                for p in request.predictions]
        if all(keep):
            continue
        gone += [p.prediction_id for p, k in zip(request.predictions, keep) if not k]
        kept = [p for p, k in zip(request.predictions, keep) if k]
        if kept:   # every column that said something of the erased predictions is rewritten
            tx.execute("UPDATE prediction_chunks SET predictions = ?, accounts = ?, traceparents = ?, body = ? "
                       "WHERE chunk_id = ?",
                       (len(kept), _accounts(p.account_id for p in kept), _kept_runs(traceparents, keep),
                        fpb.RecordPredictionRequest(predictions=kept).SerializeToString(), chunk_id))
        else:
            tx.execute("DELETE FROM prediction_chunks WHERE chunk_id = ?", (chunk_id,))
    return gone


def _legacy_prediction(payload: str) -> fpb.Prediction:
    """A prediction_outbox row's payload as the Prediction it forwards as (for ``about``:
    review21, the rows of before session 19 are taken by what they record too)."""
    return to_request(_decode([payload])[0]).predictions[0]


def _chunks_of(account_id: str | None, sessions_before: float | None) -> tuple[str, list]:
    """The WHERE clause (and its parameters) of the chunks ``erase_pending`` reads."""
    where, params = ["1 = 1"], []
    if account_id is not None:
        where.append("accounts LIKE ? ESCAPE '\\'")
        params.append(_like_pattern(account_id))
    if sessions_before is not None:
        where.append("(session_from IS NULL OR session_from < ?)")
        params.append(sessions_before)
    return " AND ".join(where), params


def await_forwards(db: Database, account_id: str | None, sessions_before: float | None = None) -> None:
    """PostgreSQL: wait for every forward in flight that carries rows ``erase_pending(...,
    account_id, ..., sessions_before)`` would read, in a transaction of its own that holds
    nothing else and ends at once. The erasing transaction calls it first, before it takes
    the household's lock and its session rows: with feedback hung, a forward takes up to
    ~15 s (3 attempts of HEARTH_PEER_TIMEOUT_S), and until session 21 the erasure waited
    for it inside its transaction, holding the household (every write of it, the
    assignments' group commit that writes its sessions' persons included) all that time.
    It proves nothing: ``erase_pending`` still locks the rows under the erasure's own
    locks, and waits for a forward that claimed them since (the race session 20 closed
    stays closed); it only makes that second wait rare. SQLite's ``excluding_forwards``
    already waits before the transaction begins."""
    if db.dialect != "postgres":
        return
    where, params = _chunks_of(account_id, sessions_before)
    with db.transaction() as tx:
        if account_id is None:
            tx.query("SELECT prediction_id FROM prediction_outbox ORDER BY 1 FOR UPDATE")
        else:
            tx.query("SELECT prediction_id FROM prediction_outbox WHERE account_id = ? ORDER BY 1 FOR UPDATE",
                     (account_id,))
        tx.query(f"SELECT chunk_id FROM prediction_chunks WHERE {where} ORDER BY 1 FOR UPDATE", params)


def _kept_runs(traceparents: str, kept: Sequence[bool]) -> str:
    """A chunk's ``traceparents`` once only its ``kept`` predictions stay: the runs shortened
    to what they keep, the runs that keep nothing dropped. A column without run lengths
    (written before session 20) cannot say which traceparent made which prediction: it is
    dropped whole (the forward loses those links, the erased household its trace ids)."""
    out, at = [], 0
    for item in traceparents.split():
        traceparent, star, n = item.rpartition("*")
        if not star or not n.isdigit():
            return ""
        count = sum(kept[at:at + int(n)])
        at += int(n)
        if count:
            out.append(f"{traceparent}*{count}")
    return " ".join(out) if at == len(kept) else ""


def _accounts(account_ids: Iterable[str]) -> str:
    return " " + " ".join(dict.fromkeys(account_ids)) + " "


class _ForwardGate:
    """SQLite's exclusion between the forwarder and an erasure (one process holds the
    database: ``SqliteDatabase``). A forward holds it from its read of the outbox until the
    delivered rows are deleted (the send included); an erasure holds it around its
    transaction and goes first: a forward waits while one waits, so a backlog forwarded
    batch after batch cannot starve it. On PostgreSQL, row locks do this across replicas."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._forwarding = False
        self._erasing = 0

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._forwarding and not self._erasing)
            self._forwarding = True
        try:
            yield
        finally:
            with self._cond:
                self._forwarding = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def erasing(self) -> Iterator[None]:
        with self._cond:
            self._erasing += 1
            self._cond.wait_for(lambda: not self._forwarding)
        try:
            yield
        finally:
            with self._cond:
                self._erasing -= 1
                self._cond.notify_all()


_GATES: "weakref.WeakKeyDictionary[Database, _ForwardGate]" = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def _gate(db: Database) -> _ForwardGate:
    with _GATES_LOCK:
        gate = _GATES.get(db)
        if gate is None:
            gate = _GATES[db] = _ForwardGate()
        return gate


def excluding_forwards(db: Database) -> contextlib.AbstractContextManager[None]:
    """Hold around a transaction that calls ``erase_pending``: no forward of this process
    is in flight meanwhile (one that read the rows before has delivered them and deleted
    them). Only SQLite needs it; on PostgreSQL ``erase_pending`` locks the rows instead
    (a lock of this process could not see another replica's forwarder)."""
    return _gate(db).erasing() if db.dialect == "sqlite" else contextlib.nullcontext()


# The longest pause between delivery attempts while feedback is unreachable. It bounds how
# long predictions made after feedback is back wait for delivery, so it stays below the
# gateway's HEARTH_FEEDBACK_PREDICTION_WAIT_S (2 s): feedback sent at once on them is then
# not refused 404. (It was 10 s: after a feedback outage of ~6 s or more, every feedback
# sent right after its assignment got 404 for up to 10 s.)
MAX_FORWARD_BACKOFF_S = 1.0


class PredictionLog:
    def __init__(self, db: Database, send: Callable[[fpb.RecordPredictionRequest], None] | None,
                 *, forward_interval_s: float = 0.2, batch: int = 1000,
                 session_writer: Callable[[Tx, Sequence[tuple]], None] | None = None,
                 retention_s: float | None = None) -> None:
        """``send`` delivers one RecordPrediction request (FeedbackPeer.record_predictions);
        ``batch``: the most predictions in one (and in one outbox chunk); ``retention_s``
        (HEARTH_RETENTION_DAYS while the purge is on, else None): predictions about
        sessions older than that are not sent (``_expired``)."""
        self._db = db
        self._retention_s = retention_s
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
        persons); returns once they are committed. ``records``: a list of records, a
        ``PredictionRun`` or ``PredictionRuns`` (encoded by run, the same bytes)."""
        if persons and self._session_writer is None:
            raise ValueError("this prediction log has no session_writer")
        n = len(records) + len(persons)
        if n:   # one item per request, weighing what it holds towards the batch size
            self._committer.write([_Request(records, persons, _traceparent())], weight=n)

    def _chunks(self, requests: Sequence[_Request], now: float) -> list[tuple]:
        """The group commit's predictions as outbox chunks of at most ``batch`` predictions
        (requests that arrived together share one); a request's runs are encoded as runs
        (``_encode_run``), cut where a chunk ends."""
        rows: list[tuple] = []
        pieces: list[Sequence[PredictionRecord]] = []
        runs: list[str] = []
        count = 0

        def close() -> None:   # ids sort in commit order among the chunks of one commit (one created_at)
            starts = [start for piece in pieces for start in _piece_starts(piece)]
            rows.append((f"{len(rows):04d}-{os.urandom(16).hex()}", now, count,
                         _accounts(a for piece in pieces for a in _piece_accounts(piece)), " ".join(runs),
                         b"".join(map(_encode_piece, pieces)), None if None in starts else min(starts)))

        for request in requests:
            mine = 0   # this request's predictions in the chunk being filled
            for piece in _pieces(request.records):
                while len(piece):
                    room = self._batch - count
                    if len(piece) <= room:   # the common case: no copy
                        taken, piece = piece, ()
                    else:
                        taken, piece = piece[:room], piece[room:]
                    pieces.append(taken)
                    count += len(taken)
                    mine += len(taken)
                    if count >= self._batch:
                        runs.append(f"{request.traceparent}*{mine}")
                        close()
                        pieces, runs, count, mine = [], [], 0, 0
            if mine:
                runs.append(f"{request.traceparent}*{mine}")
        if count:
            close()
        return rows

    def _store(self, requests: Sequence[_Request]) -> int:
        rows = self._chunks(requests, time.time())
        persons = [p for request in requests for p in request.persons]
        with self._db.transaction() as tx:
            tx.executemany("INSERT INTO prediction_chunks (chunk_id, created_at, predictions, accounts, "
                           "traceparents, body, session_from) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if persons:
                self._session_writer(tx, [(p.account_id, p.session_id, p.person_id, p.probabilities)
                                          for p in persons])
        return sum(row[2] for row in rows)

    def forward_once(self) -> int:
        """Send one batch; returns how many predictions were delivered."""
        return self._forward()[0]

    def _forward(self) -> tuple[int, bool]:
        """One RecordPrediction call: (predictions delivered, whether more wait).

        The rows sent stay held until they are deleted, so that an erasure cannot commit
        while a forward carrying its household is in flight (read before the erasure,
        delivered after it: after feedback's own erase too, and the household's
        predictions outlived its deletion although the receipt said erased; ``erase_pending``
        waits). On PostgreSQL the forward is one transaction: it claims the oldest rows
        no other replica's forwarder holds (``FOR UPDATE SKIP LOCKED``: each chunk is sent
        by one replica; feedback's RecordPrediction is idempotent anyway), sends them and
        deletes them before it commits; a failed send rolls back and frees them. On SQLite
        (one process) the forward holds ``_ForwardGate`` instead: a write transaction held
        over the send would stall every assignment's commit."""
        if self._db.dialect == "postgres":
            with self._db.transaction() as tx:
                return self._deliver(*self._claim(tx, " FOR UPDATE SKIP LOCKED"), tx)
        with _gate(self._db).forwarding():
            with self._db.transaction(readonly=True) as tx:
                claimed = self._claim(tx, "")
            return self._deliver(*claimed, None)

    def _claim(self, tx: Tx, lock: str) -> tuple[list, list, list, int]:
        """The oldest undelivered predictions, up to a batch: (legacy rows, chunks, their
        bodies, the outbox's depth). ``lock`` (PostgreSQL: FOR UPDATE SKIP LOCKED) holds
        what is sent, and only that: the chunks are picked first, from a list of the
        oldest read without a lock, whole chunks up to ``batch`` predictions, then locked;
        a chunk another replica's forward (or an erasure) holds is skipped and the next
        ones picked in its place. Until session 21 the list itself was locked: up to
        ``batch`` chunks, of which only the first ones (up to ``batch`` predictions) were
        sent, so an erasure of a household in the others waited for a send that did not
        carry it, and another replica's forwarder skipped them."""
        legacy = tx.query("SELECT prediction_id, payload FROM prediction_outbox "
                          "ORDER BY created_at, prediction_id LIMIT ?" + lock, (self._batch,))
        queued = [] if legacy else tx.query("SELECT chunk_id, predictions FROM prediction_chunks "
                                            "ORDER BY created_at, chunk_id LIMIT ?", (self._batch,))
        # A short page is the whole outbox: count only when there may be more.
        depth = (len(legacy) if len(legacy) < self._batch else
                 tx.query("SELECT COUNT(*) FROM prediction_outbox")[0][0]) + \
            (sum(r[1] for r in queued) if not legacy and len(queued) < self._batch else
             tx.query("SELECT SUM(predictions) FROM prediction_chunks")[0][0] or 0)
        chunks, bodies, n, at = [], [], 0, 0
        while at < len(queued) and n < self._batch:   # whole chunks, up to ``batch`` predictions (at least one)
            picked, room = [], self._batch - n
            while at < len(queued) and ((not chunks and not picked) or queued[at][1] <= room):
                picked.append(queued[at][0])
                room -= queued[at][1]
                at += 1
            if not picked:
                break
            # A chunk gone since the list above is not an error (it was a KeyError, a
            # failure and a backoff): another replica delivered it, or an erasure took it.
            found = {r[0]: r for r in tx.query(
                "SELECT chunk_id, body, predictions, traceparents FROM prediction_chunks WHERE chunk_id IN "
                f"({', '.join('?' * len(picked))})" + lock, picked)}
            for chunk_id in picked:
                if chunk_id in found:
                    _, body, predictions, traceparents = found[chunk_id]
                    chunks.append((chunk_id, predictions, traceparents))
                    bodies.append(bytes(body))
                    n += predictions
            if not lock or len(found) == len(picked):
                break   # what was picked is held (a lock skips nothing, or nothing was skipped)
        return legacy, chunks, bodies, depth

    def _deliver(self, legacy: list, chunks: list, bodies: list, depth: int, tx: Tx | None) -> tuple[int, bool]:
        """Send what ``_claim`` returned and delete it once acknowledged (in ``tx``, the
        claiming transaction, or in a transaction of its own)."""
        OUTBOX_DEPTH.set(depth)
        if self._send is None or not (legacy or chunks):
            return 0, False
        if legacy:                          # rows written before session 19 first
            records, traceparents = _decode([payload for _, payload in legacy])
            request = to_request(records)
        else:   # the chunks' bodies are serialized requests: their concatenation is one
            request = fpb.RecordPredictionRequest.FromString(b"".join(bodies))
            traceparents = list(dict.fromkeys(item.partition("*")[0] for c in chunks for item in c[2].split()))
        expired = self._expired(request)
        if expired:
            kept = [p for i, p in enumerate(request.predictions) if i not in expired]
            del request.predictions[:]
            request.predictions.extend(kept)
            EXPIRED.inc(len(expired))
        # One request's predictions share its traceparent: each request is linked once.
        links = [link for link in map(_link, traceparents) if link is not None][:MAX_LINKS]
        with telemetry.safe_span(telemetry.tracer("hearth.clustering.predictions"), "predictions.forward",
                                 links=links, attributes={"hearth.predictions": len(request.predictions)}):
            conflicting = self._send_dropping_conflicts(request)
        with contextlib.nullcontext(tx) if tx is not None else self._db.transaction() as tx:
            if legacy:
                tx.executemany("DELETE FROM prediction_outbox WHERE prediction_id = ?", [(r[0],) for r in legacy])
            else:
                tx.executemany("DELETE FROM prediction_chunks WHERE chunk_id = ?", [(c[0],) for c in chunks])
        delivered = len(request.predictions)
        FORWARDED.inc(delivered)
        return delivered, depth > delivered + len(expired) + conflicting

    def _send_dropping_conflicts(self, request: fpb.RecordPredictionRequest) -> int:
        """Send ``request``; a prediction whose id feedback already holds with other content
        (ALREADY_EXISTS naming ``predictions[i].prediction_id``: feedback refuses the whole
        request) is taken out and the rest sent again. Returns how many were taken out
        (``hearth_predictions_conflicting_total``). Ids are 128 random bits, so this is
        another caller's use of the id, or a fault: feedback keeps the first, and a forward
        retried for ever would hold back every prediction behind it (as ``_expired``'s)."""
        dropped = 0
        while request.predictions:
            try:
                self._send(request)
                break
            except Exception as exc:
                index = _conflicting_index(exc, len(request.predictions))
                if index is None:
                    raise
                log.warning("prediction %s not forwarded: feedback holds its id with other content (kept there)",
                            request.predictions[index].prediction_id)
                del request.predictions[index]
                CONFLICTING.inc()
                dropped += 1
        return dropped

    def _expired(self, request: fpb.RecordPredictionRequest) -> set[int]:
        """Indexes of the predictions about sessions older than the retention window (by
        services/common/predictions.retention_instant): feedback refuses a request holding
        one (INVALID_ARGUMENT), and a forward refused for it would be retried for ever,
        holding back every prediction behind it. They are dropped, with a margin of
        MAX_FUTURE_SKEW_S (10 minutes) for feedback's clock running ahead of this one's:
        such a prediction has at most one check period left before the purge erases it
        (clustering holds sessions up to a check period past the window until then)."""
        if self._retention_s is None:
            return set()
        oldest = time.time() - self._retention_s + MAX_FUTURE_SKEW_S

        def seconds(ts: Timestamp) -> float:
            return ts.seconds + ts.nanos / 1e9

        return {i for i, p in enumerate(request.predictions) if retention_instant(
            seconds(p.ts), seconds(p.session_start) if p.HasField("session_start") else None,
            seconds(p.session_end) if p.HasField("session_end") else None)[0] < oldest}

    def _forward_loop(self) -> None:
        backoff = self._interval
        while not self._stop.wait(backoff):
            try:
                while self._forward()[1]:
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
