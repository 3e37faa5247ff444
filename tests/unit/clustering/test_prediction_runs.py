"""The prediction outbox's chunks since session 21: AssignSessions hands the log each
household's predictions by column (``PredictionRun``: the fields they share held once)
and the log encodes them without a record a prediction (``_encode_run``), with the shared
fields' bytes kept from one message to the next but for ``ts`` (``_head``). The chunks
must be the bytes session 20 wrote: ``_reference_encode`` and ``_reference_chunks`` below
are session 20's ``_encode`` and ``PredictionLog._chunks`` (main 7dba257), verbatim but
for names; a change of one byte, of the chunk boundaries, of the traceparent runs or of
the accounts column fails these tests."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.feedback.v1 import feedback_pb2 as fpb
from services.clustering import prediction_log
from services.clustering.prediction_log import PredictionRun, PredictionRuns, _Request
from services.common.pbutil import varint
from services.common.predictions import PredictionRecord


# ---- session 20's encoder and chunker (main 7dba257), the reference --------------------

def _string(tag: bytes, value: str) -> bytes:
    if not value:
        return b""
    data = value.encode()
    return tag + varint(len(data)) + data


def _reference_encode(records) -> bytes:
    shared: dict[tuple, bytes] = {}
    entries: dict[str, bytes] = {}
    out = []
    for r in records:
        key = prediction_log._SHARED(r)
        head = shared.get(key)
        if head is None:
            blank = PredictionRecord(prediction_id="", session_id="", person_id="", probabilities={},
                                     **dict(zip(prediction_log._SHARED_FIELDS, key)))
            head = shared[key] = prediction_log.to_request([blank]).predictions[0].SerializeToString()
        parts = [head, _string(b"\x0a", r.prediction_id), _string(b"\x1a", r.session_id),
                 _string(b"\x22", r.person_id)]
        for person, probability in r.probabilities.items():
            prefix = entries.get(person)
            if prefix is None:
                name = _string(b"\x0a", person) if person else b""
                prefix = entries[person] = b"\x2a" + varint(len(name) + 9) + name + b"\x11"
            parts.append(prefix + prediction_log._DOUBLE(probability))
        message = b"".join(parts)
        out.append(b"\x0a" + varint(len(message)) + message)
    return b"".join(out)


def _reference_chunks(batch: int, requests, now: float) -> list[tuple]:
    rows, records, runs = [], [], []

    def close() -> None:
        starts = [r.session_start for r in records]
        rows.append((len(rows), now, len(records), prediction_log._accounts(r.account_id for r in records),
                     " ".join(runs), _reference_encode(records), None if None in starts else min(starts)))

    for request in requests:
        todo = list(request.records)
        while todo:
            room = batch - len(records)
            records += todo[:room]
            runs.append(f"{request.traceparent}*{len(todo[:room])}")
            todo = todo[room:]
            if len(records) >= batch:
                close()
                records, runs = [], []
    if records:
        close()
    return rows


# ---- what is drawn ----------------------------------------------------------------------

# Ids: empty, short, non-ASCII, longer than 127 bytes (a two-byte length).
_TEXT = st.one_of(st.sampled_from(["", "p1", "p2", "pr-" + "0" * 32, "ü" * 70]),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
_DOUBLES = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, -0.0, 5e-324, 1.0, 0.1 + 0.2]),
                     st.floats(allow_nan=True, allow_infinity=True))
_TIMES = st.one_of(st.sampled_from([0.0, 1796516596.3063557, 1796516599.999999999, 1.5e9]),
                   st.floats(0.0, 4e9))


@st.composite
def _shared(draw) -> PredictionRecord:
    """A household's shared fields (the four varying ones blank), few distinct values so
    that the cache of ``_head`` is hit across draws as well as filled."""
    span = draw(st.one_of(st.none(), st.tuples(_TIMES, _TIMES)))
    return PredictionRecord(
        "", draw(st.sampled_from(["acc-1", "acc_2", "", "ä" * 130])), "", "", {},
        draw(st.sampled_from(["gmm", "kmeans", ""])), draw(st.sampled_from([0, 1, 7, 2 ** 63 - 1, -5])),
        draw(_TIMES), draw(st.booleans()), draw(st.integers(0, 6)),
        draw(st.sampled_from(["", "tv", "d" * 140])), *(span or (None, None)),
        draw(st.sampled_from([0, 12, 120, 2 ** 40])), draw(st.sampled_from(["", "persons_from_labels"])))


@st.composite
def _run(draw) -> PredictionRun:
    shared = draw(_shared())
    persons = draw(st.lists(_TEXT, max_size=4, unique=True))
    n = draw(st.integers(0, 6))
    ids = [draw(_TEXT) for _ in range(n)]
    # a bare vector's session id is its prediction id; a stored session's its own
    sessions = [i if draw(st.booleans()) else draw(_TEXT) for i in ids]
    chosen, probabilities = [], []
    for _ in range(n):
        row = {p: draw(_DOUBLES) for p in persons}
        person = draw(st.sampled_from(persons)) if persons and draw(st.booleans()) else draw(_TEXT)
        if draw(st.integers(0, 4)) == 0:   # a labelled row: its own map
            row = {person: 1.0}
        chosen.append(person)
        probabilities.append(row)
    return PredictionRun(shared, ids, sessions, chosen, probabilities)


def _records(run: PredictionRun) -> list[PredictionRecord]:
    return [PredictionRecord(p, run.shared.account_id, s, c, probs, *prediction_log._SHARED(run.shared)[1:])
            for p, s, c, probs in zip(run.prediction_ids, run.session_ids, run.person_ids, run.probabilities)]


def _same(a: bytes, b: bytes) -> None:
    assert a == b   # bytes, not what they parse as: NaN and -0.0 compare by their bits this way


# ---- the tests --------------------------------------------------------------------------

@given(st.lists(_run(), max_size=6))
@settings(max_examples=100, deadline=None)
def test_a_run_encodes_to_the_bytes_of_its_records(runs):
    """Each run's bytes are session 20's for the records it stands for, and a run is those
    records (iteration, indexing, slices)."""
    for run in runs:
        records = _records(run)
        assert list(run) == records or any(p != p for r in records for p in r.probabilities.values())
        _same(prediction_log._encode_run(run), _reference_encode(records))
        _same(prediction_log._encode(records), _reference_encode(records))
        if len(run):
            assert run[-1].prediction_id == records[-1].prediction_id
            _same(prediction_log._encode_run(run[1:]), _reference_encode(records[1:]))
    together = PredictionRuns(runs)
    assert len(together) == sum(map(len, runs))
    assert [r.prediction_id for r in together] == [r.prediction_id for run in runs for r in _records(run)]
    flat = [i for run in runs for i in run.prediction_ids]
    assert [together[i].prediction_id for i in range(-len(flat), len(flat))] == flat + flat
    with pytest.raises(IndexError):
        together[len(flat)]


@given(st.lists(st.tuples(st.lists(_run(), max_size=4), st.booleans(),
                          st.sampled_from(["", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"])), max_size=5),
       st.sampled_from([1, 2, 3, 5, 1000]))
@settings(max_examples=100, deadline=None)
def test_the_chunks_are_session_20s(requests, batch):
    """A group commit's requests, some as runs (AssignSessions), some as lists of records
    (AssignSession and the other callers), cut into chunks of ``batch`` predictions: the
    chunks' counts, accounts, traceparent runs, bodies and first session starts are the
    ones session 20 wrote for the same records, cut at the same places."""
    made = [_Request(PredictionRuns(runs) if as_runs else [r for run in runs for r in _records(run)], (), tp)
            for runs, as_runs, tp in requests]
    flat = [_Request([r for run in runs for r in _records(run)], (), tp) for runs, _as_runs, tp in requests]
    log = prediction_log.PredictionLog.__new__(prediction_log.PredictionLog)
    log._batch = batch
    got = log._chunks(made, 12.5)
    want = _reference_chunks(batch, flat, 12.5)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[0][:5] == f"{w[0]:04d}-" and g[1:5] == w[1:5]
        _same(g[5], w[5])
        assert g[6] == w[6] or (g[6] != g[6] and w[6] != w[6])


def test_the_shared_fields_are_serialized_as_protobuf_does_across_requests():
    """``_head`` keeps the bytes before and after ``ts`` by the other values and ``ts``'s
    by its own: each combination is protobuf's serialization of the message, whichever
    was cached first, and a full cache starts again."""
    base = dict(prediction_id="", session_id="", person_id="", probabilities={}, account_id="acc",
                model_variant="gmm", model_version=3, ts=1.0, cold_start=False, household_size=2,
                device_id="tv", session_start=1.5e9, session_end=1.5e9 + 60, model_sessions=40,
                calibration_group="persons_from_labels")
    variants = [dict(base, ts=ts, account_id=a, session_start=s, session_end=s and s + 1)
                for ts, a, s in itertools.product([1.0, 0.0, 1796516599.999999999], ["acc", "", "x" * 200],
                                                  [1.5e9, None])]
    for values in variants + variants:   # the second pass reads the cache
        record = PredictionRecord(**values)
        want = prediction_log.to_request([record]).predictions[0].SerializeToString()
        assert prediction_log._head(prediction_log._SHARED(record)) == want
    saved = prediction_log._HEAD_CACHE
    try:
        prediction_log._HEAD_CACHE = 2
        prediction_log._HEADS.clear()
        prediction_log._STAMPS.clear()
        for values in variants:
            record = PredictionRecord(**values)
            assert prediction_log._head(prediction_log._SHARED(record)) == \
                prediction_log.to_request([record]).predictions[0].SerializeToString()
        assert len(prediction_log._HEADS) <= 2 and len(prediction_log._STAMPS) <= 2
    finally:
        prediction_log._HEAD_CACHE = saved


def test_a_runs_predictions_parse_as_the_records_feedback_reads(tmp_path):
    """Through the outbox: a message's runs recorded, forwarded, parsed as feedback parses
    them are the records they stand for (the same request as ``to_request`` of them)."""
    from services.clustering.migrations import MIGRATIONS
    from services.common.storage.sql import SqliteDatabase, migrate

    db = SqliteDatabase(tmp_path / "clustering.db")
    migrate(db, MIGRATIONS)
    sent: list[fpb.RecordPredictionRequest] = []
    log = prediction_log.PredictionLog(db, sent.append, forward_interval_s=3600, batch=4)
    try:
        shared = PredictionRecord("", "acc-1", "", "", {}, "gmm", 7, 1796516596.3063557, False, 2, "", None, None,
                                  120, "")
        ids = [f"pr-{os.urandom(4).hex()}" for _ in range(7)]
        run = PredictionRun(shared, ids, ids, ["p1", "p2"] * 3 + ["p1"],
                            [{"p1": 0.25 + i / 100, "p2": 0.75 - i / 100} for i in range(7)])
        other = PredictionRun(PredictionRecord("", "acc-2", "", "", {}, "kmeans", 1, 5.0, True, 1, "", None, None,
                                               3, ""), ["pr-x"], ["s-x"], ["p9"], [{"p9": 0.5}])
        log.record(PredictionRuns([run, other]))
        while log.forward_once():
            pass
        got = [p for request in sent for p in request.predictions]
        assert got == list(prediction_log.to_request(list(run) + list(other)).predictions)
        assert [len(r.predictions) for r in sent] == [4, 4]
    finally:
        log.close()
        db.close()


@pytest.mark.parametrize("bad", [dict(session_ids=["a"]), dict(probabilities=[])])
def test_a_run_with_columns_of_different_lengths_is_refused(bad):
    columns = dict(prediction_ids=["a", "b"], session_ids=["a", "b"], person_ids=["p", "p"],
                   probabilities=[{}, {}])
    with pytest.raises(ValueError):
        PredictionRun(PredictionRecord("", "acc", "", "", {}, "gmm", 1, 1.0, False, 1), **{**columns, **bad})


def test_households_of_equal_families_stack_together_whatever_the_object():
    """batch_scoring._stack_key groups by the family's equality (what ScoringTable.from_models
    requires), not by its repr; an unhashable family still gets a key (its repr)."""
    from types import SimpleNamespace

    from services.clustering.batch_scoring import _stack_key
    from services.clustering.domain.model import default_family

    def model(family):
        return SimpleNamespace(active_variant="gmm", mixture=object(), family=family, temperature=1, calibrated=1)

    a, b = default_family(), default_family()
    assert a is not b and _stack_key(model(a)) == _stack_key(model(b))
    assert hash(_stack_key(model(a))) == hash(_stack_key(model(b)))
    assert _stack_key(model(a)) != _stack_key(model(type(a)(genre_weight=a.genre_weight + 1)))

    class Unhashable:
        __hash__ = None

        def __repr__(self) -> str:
            return "Unhashable()"

    assert _stack_key(model(Unhashable())) == ("Unhashable()", 1.0, True)
    assert _stack_key(SimpleNamespace(active_variant="kmeans", mixture=object())) is None
