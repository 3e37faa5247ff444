"""AssignSessions' answers since session 20: every household of a message is recalibrated
together (one ``Calibrator.apply`` per variant, group and number of persons, not one a
household: ClusteringApp._calibrated) and the response is written as wire bytes from the
households' answers by column (servicer.assignments_response), not built as two protobuf
messages a session. The answers are the ones of the path before: the calibrator once a
household (as ClusteringApp._answer still calls it for one household) and
``assignment_to_pb`` a session — person ids, and probabilities bit for bit."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.clustering.v1 import clustering_pb2 as pb
from services.clustering.batch_scoring import score_households
from services.clustering.app import Answers, AssignmentOut, ClusteringApp, prediction_ids
from services.clustering.domain import features as F
from services.clustering.domain.model import LABEL_SHAPED_GROUP, BatchAssignment
from services.clustering.modeling import ModelKeeper
from services.clustering.servicer import _COLD, ClusteringServicer, assignment_to_pb, assignments_response
from services.clustering.store import ClusteringStore
from services.common.calibration import Calibrator
from services.common.errors import NotFound
from services.common.storage.sql import SqliteDatabase
from tests.helpers.households import household_events

CALIBRATORS = {
    "identity": Calibrator(version=0, method="identity"),
    "temperature": Calibrator(version=2, method="temperature", parameters={"temperature": 1.7}),
    # isotonic, segmented by model age, one-person shifts, and a group of its own
    "segmented": Calibrator(
        version=5, method="isotonic", parameters={"x": [0.0, 0.4, 0.75, 1.0], "y": [0.05, 0.3, 0.8, 0.96]},
        segment_edges=(20, 60),
        segments={"sessions:20-59": Calibrator(version=5, method="temperature", parameters={"temperature": 0.7})},
        one_person={"sessions:0-19": -0.12, "sessions:60+": 0.03, "all": 0.07},
        groups={LABEL_SHAPED_GROUP: Calibrator(version=5, method="temperature", parameters={"temperature": 0.55},
                                               one_person={"all": 0.1})}),
}


def _bits(values) -> bytes:
    return np.asarray(values, dtype=np.float64).tobytes()


@st.composite
def _household(draw):
    """A household's scored rows as batch_scoring / assign_batch give them: K persons, rows
    that are distributions (zeros allowed) or one-person answers (one positive entry < 1),
    a full model's or a cold start's, its variant, age and whether labels added persons."""
    k = draw(st.integers(1, 5))
    n = draw(st.integers(1, 9))
    rows = []
    for _ in range(n):
        if k == 1 or draw(st.integers(0, 4)) == 0:
            row = np.zeros(k)
            row[draw(st.integers(0, k - 1))] = draw(st.floats(0.05, 0.99))
        else:
            weights = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k)))
            if weights.sum() <= 1e-3:
                weights[0] = 1.0
            row = weights / weights.sum()
        rows.append(row)
    probabilities = np.array(rows, dtype=draw(st.sampled_from([np.float64, np.float32])))
    strategy = draw(st.sampled_from(["gmm", "kmeans", "cold_start:population_prior", "cold_start:account",
                                     "cold_start:heuristic"]))
    idx = probabilities.argmax(axis=1)
    person_ids = tuple(f"p{i + 1}" for i in range(k))
    batch = BatchAssignment(person_ids, idx, probabilities[np.arange(n), idx], probabilities, strategy,
                            draw(st.integers(0, 30)))
    model = SimpleNamespace(variant=draw(st.sampled_from(["gmm", "kmeans"])),
                            n_sessions=draw(st.sampled_from([0, 4, 19, 20, 45, 60, 300])),
                            persons_from_labels=draw(st.booleans()), label_map={})
    return model, batch


def _one_by_one(app: ClusteringApp, account: str, version: int, model, batch, ids: list[str]) -> list[pb.Assignment]:
    """The path before session 20: ClusteringApp._answer's calibrator call for this one
    household (``np.full`` of its age, its group) and assignment_to_pb a session."""
    from services.clustering.domain.model import feedback_calibrator_rows
    probabilities = batch.probabilities
    calibrate, group = feedback_calibrator_rows(model, batch)
    if calibrate.any():
        probabilities = np.array(probabilities, dtype=np.float64, copy=True)
        probabilities[calibrate] = app.calibrator_of(model.variant).apply(
            probabilities[calibrate], np.full(int(calibrate.sum()), int(model.n_sessions)), group)
    idx = probabilities.argmax(axis=1)
    cold = batch.strategy.removeprefix("cold_start:") if batch.strategy.startswith("cold_start") else ""
    out = []
    for r in range(probabilities.shape[0]):
        pid = batch.person_ids[int(idx[r])]
        probs = {p: float(v) for p, v in zip(batch.person_ids, probabilities[r])}
        out.append(assignment_to_pb(AssignmentOut(pid, probs[pid], probs, model.variant, version, cold,
                                                  batch.sessions_until_model, ids[r])))
    return out


@given(st.lists(_household(), min_size=1, max_size=8), st.sampled_from(sorted(CALIBRATORS)),
       st.sampled_from(sorted(CALIBRATORS)), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_households_recalibrated_together_answer_as_one_at_a_time(households, gmm, kmeans, rnd):
    calibrators = {"gmm": CALIBRATORS[gmm], "kmeans": CALIBRATORS[kmeans]}
    app = ClusteringApp(None, keeper=object(), background=False, calibrator_of=calibrators.__getitem__)
    calibrated = app._calibrated(households)
    total = sum(b.probabilities.shape[0] for _, b in households)
    order = list(range(total))
    rnd.shuffle(order)              # a household's rows anywhere in the message
    parts, expected, start = [], [None] * total, 0
    for h, ((model, batch), (probabilities, group)) in enumerate(zip(households, calibrated)):
        n = batch.probabilities.shape[0]
        rows = np.array(order[start:start + n])
        start += n
        answers, records = app._household_answers(f"acc-{h}", 3 + h, model, batch, probabilities, group,
                                                  [""] * n, [""] * n)
        parts.append((rows, answers))
        for i, a in zip(rows.tolist(), _one_by_one(app, f"acc-{h}", 3 + h, model, batch, answers.prediction_ids)):
            expected[i] = a
        assert [r.prediction_id for r in records] == answers.prediction_ids
        assert [r.probabilities for r in records] == answers.probabilities
        assert {r.calibration_group for r in records} == {LABEL_SHAPED_GROUP if model.persons_from_labels else ""}
    got = assignments_response("b-1", total, parts)
    want = pb.AssignSessionsResponse(batch_id="b-1", assignments=expected)
    assert got.SerializeToString() == want.SerializeToString()    # doubles bit for bit
    assert got == want
    for g, w in zip(got.assignments, want.assignments):
        assert g.person_id == w.person_id
        assert _bits([p.probability for p in g.probabilities]) == _bits([p.probability for p in w.probabilities])


def test_the_batch_calls_the_calibrator_once_a_variant_group_and_width():
    """What makes it cheaper: 40 households of two widths in two groups -> four calls."""
    calls = []

    class Counting(Calibrator):
        def apply(self, probs, model_sessions=None, groups=None):
            calls.append((np.shape(probs), groups))
            return super().apply(probs, model_sessions, groups)

    counting = Counting(version=1, method="temperature", parameters={"temperature": 1.5})
    app = ClusteringApp(None, keeper=object(), background=False, calibrator_of=lambda _v: counting)
    households = []
    for h in range(40):
        k = 2 + h % 2
        probabilities = np.full((3, k), 1.0 / k)
        probabilities[:, 0] += 0.01
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        households.append((SimpleNamespace(variant="gmm", n_sessions=10 * h + 1, persons_from_labels=h % 3 == 0),
                           BatchAssignment(tuple(f"p{i}" for i in range(k)), np.zeros(3, int), probabilities[:, 0],
                                           probabilities, "gmm", 0)))
    app._calibrated(households)
    assert sorted(calls) == sorted([((39, 2), ""), ((21, 2), LABEL_SHAPED_GROUP), ((39, 3), ""),
                                   ((21, 3), LABEL_SHAPED_GROUP)])


# Any Unicode text (lone surrogates are not UTF-8): multi-byte, empty, and now and then
# longer than 127 bytes, so that a length takes two varint bytes (review20 widened these).
_TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                  st.text(st.characters(blacklist_categories=("Cs",)), min_size=100, max_size=300))
_DOUBLES = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, -0.0, 5e-324, 1.0, 0.1 + 0.2]),
                     st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def _answers(draw):
    persons = draw(st.lists(_TEXT, min_size=0, max_size=4, unique=True))
    n = draw(st.integers(0, 5))
    chosen, probs = [], []
    for _ in range(n):
        row = {p: draw(_DOUBLES) for p in persons}
        pid = draw(st.sampled_from(persons)) if persons else draw(_TEXT)   # a label's person: its own map
        row.setdefault(pid, 1.0)
        chosen.append(pid)
        probs.append(row)
    return Answers(chosen, probs, [draw(st.sampled_from(["", "pr-" + "0" * 32, draw(_TEXT)])) for _ in range(n)],
                   draw(_TEXT), draw(st.integers(-2 ** 63, 2 ** 63 - 1)), draw(st.sampled_from(sorted(_COLD))),
                   draw(st.integers(-2 ** 31, 2 ** 31 - 1)))


@given(st.lists(_answers(), max_size=5), _TEXT, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_the_written_response_is_the_one_protobuf_builds(households, batch_id, rnd):
    """Empty strings, zeros (-0.0 too), NaN and infinite probabilities, non-ASCII ids and
    ids longer than 127 bytes, extreme versions, every cold start, households' rows
    interleaved in the message."""
    total = sum(len(a.person_ids) for a in households)
    order = list(range(total))
    rnd.shuffle(order)
    parts, expected, start = [], [None] * total, 0
    for answers in households:
        rows = np.array(order[start:start + len(answers.person_ids)], dtype=np.int64)
        start += rows.size
        parts.append((rows, answers))
        for i, out in zip(rows.tolist(), answers.outs()):
            expected[i] = assignment_to_pb(out)
    got = assignments_response(batch_id, total, parts)
    want = pb.AssignSessionsResponse(batch_id=batch_id, assignments=expected)
    assert got.SerializeToString() == want.SerializeToString()
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_every_field_of_an_assignment_is_one_the_response_writes():
    """A field added to Assignment must be written by assignments_response too (and by
    assignment_to_pb): this fails until it is."""
    assert set(pb.Assignment.DESCRIPTOR.fields_by_name) == {
        "person_id", "confidence", "probabilities", "model_variant", "model_version", "cold_start",
        "sessions_until_full_model", "prediction_id"}
    assert set(pb.PersonProbability.DESCRIPTOR.fields_by_name) == {"person_id", "probability"}
    assert set(pb.AssignSessionsResponse.DESCRIPTOR.fields_by_name) == {"batch_id", "assignments"}


def test_prediction_ids_are_128_random_bits_each():
    ids = prediction_ids(2000)
    assert len(set(ids)) == 2000 and all(re.fullmatch(r"pr-[0-9a-f]{32}", i) for i in ids)
    assert prediction_ids(0) == []
    bits = np.unpackbits(np.frombuffer(bytes.fromhex("".join(i[3:] for i in ids)), dtype=np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01


class _Log:
    writes_session_persons = False

    def __init__(self) -> None:
        self.records = []

    def record(self, records, persons=()) -> None:
        self.records += records


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_services_answers_are_each_households_own(tmp_path, calibrated):
    """Through the servicer on real models: full, young and cold-start households, gmm and
    kmeans, with and without a calibrator; each household's answers equal what
    ClusteringApp._answer gives it alone (its calibrator call of its own), in the vectors'
    order, and the logged records are the answers; an unknown household is refused as before."""
    db = SqliteDatabase(tmp_path / "c.db")
    store = ClusteringStore(db)
    store.migrate()
    log = _Log()
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda a: "kmeans" if a.endswith("3") else "gmm"),
                        predictions=log, background=False)
    if calibrated:
        app.calibrator_of = {"gmm": CALIBRATORS["segmented"], "kmeans": CALIBRATORS["temperature"]}.__getitem__
    combos = [("kid", "parent", "teen"), ("parent",), ("kid", "parent"), ("kid", "parent", "teen", "grandparent")]
    vectors = {}
    for h in range(8):
        account = f"acc-{h}"
        events, _ = household_events(account, combos[h % 4], days=(25, 2, 1, 12)[h % 4], start_ts=1.7e9, seed=h)
        store.ingest(events)
        app.keeper.refresh(account)
        vectors[account] = np.array([s.features for s in store.closed_sessions(account)], dtype=np.float32)
    strategies = {app.keeper.load(a)[1].model.assign_batch(vectors[a][:1]).strategy for a in vectors}
    assert any(s.startswith("cold_start") for s in strategies) and "gmm" in strategies
    rng = np.random.default_rng(3)
    accounts = sorted(vectors)
    who = rng.integers(len(accounts), size=300)
    X = np.vstack([vectors[accounts[h]][rng.integers(len(vectors[accounts[h]]))] for h in who])
    X += rng.normal(0, 0.2, X.shape).astype(np.float32)
    request = pb.AssignSessionsRequest(batch_id="b", account_ids=[accounts[h] for h in who],
                                       feature_vectors=F.to_bytes(X), feature_schema_version=F.FEATURE_SCHEMA_VERSION)
    (response,) = ClusteringServicer(app).AssignSessions(iter([request]), None)
    assert len(response.assignments) == 300 and response.batch_id == "b"
    by_id = {r.prediction_id: r for r in log.records}
    assert len(by_id) == 300
    for a, account in zip(response.assignments, request.account_ids):
        record = by_id[a.prediction_id]
        assert (record.account_id, record.person_id) == (account, a.person_id)
        assert record.probabilities == {p.person_id: p.probability for p in a.probabilities}
    # scored as answer_many scores them (all households in one table), then answered alone
    X64 = F.from_bytes(request.feature_vectors).astype(np.float64)
    rows = {a: np.flatnonzero(np.array(request.account_ids) == a) for a in accounts}
    loaded = {a: app.keeper.load(a) for a in accounts}
    scored = score_households({a: env.model for a, (_, env) in loaded.items()}, rows, X64)
    for account in accounts:
        version, envelope = loaded[account]
        alone, _ = app._answer(account, version, envelope.model, scored[account], [""] * rows[account].size,
                               [""] * rows[account].size)
        for i, out in zip(rows[account].tolist(), alone):
            got = response.assignments[i]
            want = assignment_to_pb(out)
            want.prediction_id = got.prediction_id
            assert got.SerializeToString() == want.SerializeToString()
    with pytest.raises(NotFound):
        list(ClusteringServicer(app).AssignSessions(iter([pb.AssignSessionsRequest(
            batch_id="x", account_ids=["acc-0", "nobody"], feature_vectors=F.to_bytes(X[:2]),
            feature_schema_version=F.FEATURE_SCHEMA_VERSION)]), None))
    assert len(log.records) == 300


@pytest.mark.parametrize("length", [0, 1, 127, 128, 300, 16383, 16384, 2 ** 21 - 1, 2 ** 21])
def test_a_length_is_written_as_protobuf_writes_it(length):
    """pbutil.varint's fast paths (one byte below 128, two below 16384) and its loop."""
    from hearth.feedback.v1 import feedback_pb2 as fpb
    from services.common.pbutil import length_delimited, varint

    text = "x" * length
    if length:   # proto3 leaves an empty string and a zero out
        assert length_delimited(b"\x0a", text.encode()) == fpb.Prediction(prediction_id=text).SerializeToString()
        assert varint(length) == fpb.Prediction(model_version=length).SerializeToString()[1:]
    else:
        assert length_delimited(b"\x0a", b"") == b"\x0a\x00" and varint(0) == b"\x00"
    with pytest.raises(ValueError):
        varint(-1)
