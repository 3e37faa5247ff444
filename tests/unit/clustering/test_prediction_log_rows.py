"""The prediction outbox's rows. Since session 19 a row is a chunk: up to a forward batch
of predictions stored as the serialized RecordPredictionRequest feedback receives, with
the traceparents of the requests that made them; the forwarder sends the chunks' bodies
as they are. What feedback reads (its servicer's prediction_from_pb) is the records the
service made, floats bit-identical; a request's predictions share one traceparent and
the forwarded batch links each request once; rows written by earlier versions (JSON,
named fields or positional, with or without a traceparent) still forward."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hearth.feedback.v1 import feedback_pb2 as fpb
from services.clustering import prediction_log
from services.clustering.migrations import MIGRATIONS
from services.clustering.prediction_log import PredictionLog
from services.common import telemetry
from services.common.predictions import PredictionRecord
from services.common.storage.sql import SqliteDatabase, migrate
from services.feedback.servicer import prediction_from_pb


def _record(pid: str, **kw) -> PredictionRecord:
    values = dict(prediction_id=pid, account_id="acc-1", session_id="", person_id="p2",
                  probabilities={"p1": 0.1234567890123456789, "p2": 0.8765432109876543}, model_variant="gmm",
                  model_version=7, ts=1796516596.3063557, cold_start=False, household_size=2,
                  model_sessions=120, calibration_group="labelled")
    return PredictionRecord(**{**values, **kw})


def _as_feedback_reads(request: fpb.RecordPredictionRequest) -> list[PredictionRecord]:
    return [prediction_from_pb(p, f"predictions[{i}]") for i, p in enumerate(request.predictions)]


def _same(got: PredictionRecord, made: PredictionRecord) -> None:
    """Field for field, floats and dicts exact; times as a Timestamp carries them (ns)."""
    for name in prediction_log._RECORD_FIELDS:
        a, b = getattr(got, name), getattr(made, name)
        if name in ("ts", "session_start", "session_end") and b is not None:
            assert a == pytest.approx(b, abs=1e-6), name
        else:
            assert a == b and type(a) is type(b), name


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
    requests: list[fpb.RecordPredictionRequest] = []
    log = PredictionLog(db, requests.append, forward_interval_s=3600)   # forwarded by hand
    yield db, log, requests
    log.close()


def _sent(requests) -> list[PredictionRecord]:
    return [r for request in requests for r in _as_feedback_reads(request)]


def _chunks(db) -> list[tuple]:
    with db.transaction(readonly=True) as tx:
        return tx.query("SELECT chunk_id, predictions, accounts, traceparents, body FROM prediction_chunks "
                        "ORDER BY created_at, chunk_id")


def _traceparent(span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _traceparent_of(link) -> str:
    ctx = link.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_a_requests_predictions_share_its_traceparent_and_the_batch_links_each_request_once(traced, outbox):
    tracer, exporter = traced
    db, log, requests = outbox
    made, parents = [], []
    for request in range(2):
        with tracer.start_as_current_span(f"AssignSessions {request}") as span:
            batch = [_record(f"pr-{request}-{i}", account_id=f"acc-{i % 2}") for i in range(3)]
            log.record(batch)
        made += batch
        parents.append(_traceparent(span))
    chunks = _chunks(db)
    # One chunk per commit: its body is the request feedback gets, its traceparent the request's
    # (with the number of predictions it made, since session 20).
    assert [(c[1], c[2], c[3]) for c in chunks] == [(3, " acc-0 acc-1 ", f"{parents[0]}*3"),
                                                    (3, " acc-0 acc-1 ", f"{parents[1]}*3")]
    assert fpb.RecordPredictionRequest.FromString(chunks[0][4]) == prediction_log.to_request(made[:3])
    assert log.forward_once() == 6
    assert len(requests) == 1 and requests[0] == prediction_log.to_request(made)
    for got, want in zip(_sent(requests), made, strict=True):
        _same(got, want)
    [forward] = [s for s in exporter.get_finished_spans() if s.name == "predictions.forward"]
    assert [_traceparent_of(link) for link in forward.links] == parents   # each request once, in order
    assert forward.attributes["hearth.predictions"] == 6
    assert _chunks(db) == [] and log.forward_once() == 0


def test_optional_fields_reach_feedback_as_made(outbox):
    db, log, requests = outbox
    records = [_record("pr-a", session_id="s-9", device_id="tv", session_start=1.5e9, session_end=1.5e9 + 0.1,
                       cold_start=True, probabilities={"p1": 1.0}),
               _record("pr-b", session_start=None, session_end=None, model_sessions=0, calibration_group="",
                       ts=1796516597.25)]
    log.record(records)                      # no span: no traceparent, no link
    assert _chunks(db)[0][3] == "*2"
    assert log.forward_once() == 2
    for got, want in zip(_sent(requests), records, strict=True):
        _same(got, want)
    # The request is the one FeedbackPeer.send_predictions built from the records before session 19.
    assert requests[0] == prediction_log.to_request(records)


def _session18_row(record: PredictionRecord, traceparent: str = "") -> str:
    """A prediction_outbox payload as session 18 wrote it: [traceparent, *fields]."""
    return json.dumps([traceparent, *(getattr(record, f) for f in prediction_log._RECORD_FIELDS)],
                      separators=(",", ":"))


def test_rows_written_before_the_chunks_still_forward_with_their_link(traced, outbox):
    tracer, exporter = traced
    db, log, requests = outbox
    old, s17, s18 = _record("pr-old"), _record("pr-s17"), _record("pr-s18", session_start=1.5e9, session_end=1.6e9)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    named = {f: getattr(old, f) for f in prediction_log._RECORD_FIELDS}
    with db.transaction() as tx:
        tx.executemany("INSERT INTO prediction_outbox (prediction_id, account_id, session_id, payload, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       [(old.prediction_id, old.account_id, "", json.dumps(named), 1.0),
                        (s17.prediction_id, s17.account_id, "",
                         json.dumps({**{f: getattr(s17, f) for f in prediction_log._RECORD_FIELDS}, "traceparent": tp}),
                         2.0),
                        (s18.prediction_id, s18.account_id, "", _session18_row(s18, tp), 3.0)])
    new = _record("pr-new")
    log.record([new])
    assert log.forward_once() == 3           # the old rows first, in their own batch
    assert log.forward_once() == 1
    sent = _sent(requests)
    assert [r.prediction_id for r in sent] == ["pr-old", "pr-s17", "pr-s18", "pr-new"]
    for got, want in zip(sent, [old, s17, s18, new], strict=True):
        _same(got, want)
    first = next(s for s in exporter.get_finished_spans() if s.name == "predictions.forward")
    assert [_traceparent_of(link) for link in first.links] == [tp]
    with db.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM prediction_outbox")[0][0] == 0


def test_a_request_is_one_outbox_item_weighing_its_predictions(outbox, monkeypatch):
    """The group committer gets one item per request (its predictions and persons), counted
    as many towards the batch size, so the traceparent is read and kept once a request;
    a chunk holds at most a forward batch (1,000) of predictions."""
    db, log, requests = outbox
    submitted = []
    real = log._committer.submit
    monkeypatch.setattr(log._committer, "submit",
                        lambda items, weight=None: submitted.append((len(items), weight)) or real(items, weight))
    reads = []
    real_tp = prediction_log._traceparent
    monkeypatch.setattr(prediction_log, "_traceparent", lambda: reads.append(1) or real_tp())
    log.record([_record(f"pr-{i}") for i in range(1500)])
    assert submitted == [(1, 1500)] and len(reads) == 1
    assert [c[1] for c in _chunks(db)] == [1000, 500]
    assert log.forward_once() == 1000 and log.forward_once() == 500 and log.forward_once() == 0
    assert [r.prediction_id for r in _sent(requests)] == [f"pr-{i}" for i in range(1500)]


def test_requests_committed_together_share_chunks_in_order_up_to_a_batch(tmp_path):
    db = SqliteDatabase(tmp_path / "clustering.db")
    migrate(db, MIGRATIONS)
    requests: list[fpb.RecordPredictionRequest] = []
    log = PredictionLog(db, requests.append, forward_interval_s=3600, batch=4)
    try:
        made = [[_record(f"pr-{r}-{i}", account_id=f"acc-{r}") for i in range(n)] for r, n in enumerate((3, 2, 4))]
        log._store([prediction_log._Request(m, (), f"00-{r:032x}-{r:016x}-01") for r, m in enumerate(made, 1)])
        chunks = _chunks(db)
        assert [c[1] for c in chunks] == [4, 4, 1]
        assert [c[2] for c in chunks] == [" acc-0 acc-1 ", " acc-1 acc-2 ", " acc-2 "]
        # each request's traceparent and how many of the chunk's predictions it made, in order
        assert [c[3] for c in chunks] == [f"00-{1:032x}-{1:016x}-01*3 00-{2:032x}-{2:016x}-01*1",
                                          f"00-{2:032x}-{2:016x}-01*1 00-{3:032x}-{3:016x}-01*3",
                                          f"00-{3:032x}-{3:016x}-01*1"]
        # whole chunks per call, never more than the batch
        assert [log.forward_once() for _ in range(4)] == [4, 4, 1, 0]
        assert [r.prediction_id for r in _sent(requests)] == [r.prediction_id for m in made for r in m]
    finally:
        log.close()
        db.close()


def test_a_positional_row_from_before_a_new_trailing_field_reads_with_its_default():
    """PredictionRecord grows only at the end, with a default: a prediction_outbox row
    queued by a version with one value fewer still forwards."""
    record = _record("pr-short", calibration_group="")
    row = json.dumps(["", *[getattr(record, f) for f in prediction_log._RECORD_FIELDS[:-1]]])
    records, traceparents = prediction_log._decode([row, _session18_row(record)])
    assert records == [record, record] and traceparents == [""]


def test_the_chunk_encoder_writes_what_to_request_serializes():
    """_encode writes the request's bytes itself (a household's shared fields once): what
    they parse as must be to_request's message for every shape of record — empty and long
    ids (a two-byte length), several households and times, spans, no or one person, zeros."""
    long_id = "x" * 128
    records = [_record("pr-1"), _record("pr-2", account_id="acc-2", person_id="p1"),
               _record("pr-3", session_id="s-3", device_id="tv", session_start=1.5e9, session_end=1.5e9 + 2.5),
               _record(long_id, account_id=long_id, session_id=long_id, person_id=long_id,
                       probabilities={long_id: 1.0, "p0": 0.0}),
               _record("pr-5", probabilities={}, person_id="", model_variant="", model_version=0, ts=0.0,
                       household_size=0, model_sessions=0, calibration_group="", cold_start=True),
               _record("pr-6", ts=1796516599.999999999, probabilities={"p1": 5e-324, "p2": -0.0}),
               _record("pr-7", account_id="acc-2", person_id="p1")]
    encoded = fpb.RecordPredictionRequest.FromString(prediction_log._encode(records))
    assert encoded == prediction_log.to_request(records)
    assert [p.prediction_id for p in encoded.predictions] == [r.prediction_id for r in records]
    assert prediction_log._encode([]) == b""


def test_an_erasure_keeps_the_traceparents_of_the_predictions_it_keeps_only():
    """``_kept_runs``: each run of predictions a request made keeps its traceparent only if
    one of them stays; a column written before session 20 (no run lengths) cannot say
    which is whose, and goes whole."""
    a, b, c = (f"00-{n * 32}-{n * 16}-01" for n in "abc")
    column = f"{a}*2 *1 {b}*3 {c}*1"
    keep = [True, False, True, False, False, False, True]
    assert prediction_log._kept_runs(column, keep) == f"{a}*1 *1 {c}*1"
    assert prediction_log._kept_runs(column, [False, False, True, True, True, True, False]) == f"*1 {b}*3"
    assert prediction_log._kept_runs(f"{a} {b}", [True, False]) == ""          # before session 20
    assert prediction_log._kept_runs(f"{a}*2", [True, False, True]) == ""      # lengths that do not add up
