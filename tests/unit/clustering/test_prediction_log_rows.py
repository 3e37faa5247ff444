"""The prediction outbox's rows (session 18): one positional JSON array per prediction
that carries the traceparent of the request that made it, read back bit-identical; a
request's predictions share one traceparent and the forwarded batch links each request
once; rows written by earlier versions (named fields, with or without a traceparent)
still forward."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.clustering import prediction_log
from services.clustering.migrations import MIGRATIONS
from services.clustering.prediction_log import PredictionLog
from services.common import telemetry
from services.common.predictions import PredictionRecord
from services.common.storage.sql import SqliteDatabase, migrate


def _record(pid: str, **kw) -> PredictionRecord:
    values = dict(prediction_id=pid, account_id="acc-1", session_id="", person_id="p2",
                  probabilities={"p1": 0.1234567890123456789, "p2": 0.8765432109876543}, model_variant="gmm",
                  model_version=7, ts=1796516596.3063557, cold_start=False, household_size=2,
                  model_sessions=120, calibration_group="labelled")
    return PredictionRecord(**{**values, **kw})


@pytest.fixture()
def traced(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda name="hearth": provider.get_tracer(name))
    return provider.get_tracer("test"), exporter


@pytest.fixture()
def outbox(tmp_path):
    db = SqliteDatabase(tmp_path / "clustering.db")
    migrate(db, MIGRATIONS)
    sent: list[PredictionRecord] = []
    log = PredictionLog(db, sent.extend, forward_interval_s=3600)   # forwarded by hand
    yield db, log, sent
    log.close()


def _payloads(db) -> list[str]:
    with db.transaction(readonly=True) as tx:
        return [r[0] for r in tx.query("SELECT payload FROM prediction_outbox ORDER BY prediction_id")]


def _traceparent(span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_a_requests_predictions_share_its_traceparent_and_the_batch_links_each_request_once(traced, outbox):
    tracer, exporter = traced
    db, log, sent = outbox
    made, parents = [], []
    for request in range(2):
        with tracer.start_as_current_span(f"AssignSessions {request}") as span:
            batch = [_record(f"pr-{request}-{i}", account_id=f"acc-{i % 2}") for i in range(3)]
            log.record(batch)
        made += batch
        parents.append(_traceparent(span))
    rows = [json.loads(p) for p in _payloads(db)]
    # Positional rows: the traceparent first, then the values; the field names are not stored.
    assert all(isinstance(r, list) and len(r) == 1 + len(prediction_log._RECORD_FIELDS) for r in rows)
    assert sorted(r[0] for r in rows) == sorted(parents * 3)
    assert log.forward_once() == 6
    assert sent == made                      # bit-identical: floats, dicts, ints, bools, empty strings
    [forward] = [s for s in exporter.get_finished_spans() if s.name == "predictions.forward"]
    assert [_traceparent_of(link) for link in forward.links] == parents   # each request once, in order
    assert forward.attributes["hearth.predictions"] == 6


def _traceparent_of(link) -> str:
    ctx = link.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_optional_fields_round_trip_exactly(outbox):
    db, log, sent = outbox
    records = [_record("pr-a", session_id="s-9", device_id="tv", session_start=1.5e9, session_end=1.5e9 + 0.1,
                       cold_start=True, probabilities={"p1": 1.0}),
               _record("pr-b", session_start=None, session_end=None, model_sessions=0, calibration_group="")]
    log.record(records)                      # no span: an empty traceparent, no link
    assert log.forward_once() == 2
    assert sent == records
    assert [type(v) for v in vars(sent[0]).values()] == [type(v) for v in vars(records[0]).values()]


def test_rows_written_before_this_format_still_forward_with_their_link(traced, outbox):
    tracer, exporter = traced
    db, log, sent = outbox
    old = _record("pr-old")
    s17 = _record("pr-s17")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    named = {f: getattr(old, f) for f in prediction_log._RECORD_FIELDS}
    with db.transaction() as tx:
        tx.executemany("INSERT INTO prediction_outbox (prediction_id, account_id, session_id, payload, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       [(old.prediction_id, old.account_id, "", json.dumps(named), 1.0),
                        (s17.prediction_id, s17.account_id, "",
                         json.dumps({**{f: getattr(s17, f) for f in prediction_log._RECORD_FIELDS}, "traceparent": tp}),
                         2.0)])
    log.record([_record("pr-new")])
    assert log.forward_once() == 3
    assert [r.prediction_id for r in sent] == ["pr-old", "pr-s17", "pr-new"]
    assert sent[:2] == [old, s17]
    [forward] = [s for s in exporter.get_finished_spans() if s.name == "predictions.forward"]
    assert [_traceparent_of(link) for link in forward.links] == [tp]


def test_a_request_is_one_outbox_item_weighing_its_predictions(outbox, monkeypatch):
    """The group committer gets one item per request (its predictions and persons), counted
    as many towards the batch size, so the traceparent is read and kept once a request."""
    db, log, sent = outbox
    submitted = []
    real = log._committer.submit
    monkeypatch.setattr(log._committer, "submit",
                        lambda items, weight=None: submitted.append((len(items), weight)) or real(items, weight))
    reads = []
    real_tp = prediction_log._traceparent
    monkeypatch.setattr(prediction_log, "_traceparent", lambda: reads.append(1) or real_tp())
    log.record([_record(f"pr-{i}") for i in range(1500)])
    assert submitted == [(1, 1500)] and len(reads) == 1
    assert log.forward_once() == 1000 and log.forward_once() == 500


def test_a_positional_row_from_before_a_new_trailing_field_reads_with_its_default():
    """PredictionRecord grows only at the end, with a default: a row queued by the
    previous version (one value fewer) still forwards."""
    record = _record("pr-short", calibration_group="")
    row = json.dumps(["", *[getattr(record, f) for f in prediction_log._RECORD_FIELDS[:-1]]])
    records, traceparents = prediction_log._decode([row, prediction_log._payload(record, "")])
    assert records == [record, record] and traceparents == [""]
