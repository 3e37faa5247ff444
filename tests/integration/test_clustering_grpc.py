"""The clustering RPCs that no other test calls over gRPC: AssignSessions (the batch
stream), Refit and RecordLabels, through a real server (with the privacy service it
asks for consent and data keys), so their wire conversions and error mapping are tested."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import Principal, Role
from services.common.pbutil import float_to_ts
from tests.helpers.households import household_events, week_start_days_ago

ACC = "acc-grpc"
ADMIN = Principal("test-admin", Role.ADMIN)
NOWHERE = "127.0.0.1:1"   # no feedback service: predictions are dropped, calibration is identity


def _pb(e) -> cpb.ViewingEvent:
    return cpb.ViewingEvent(
        event_id=e.event_id, account_id=e.account_id, device_id=e.device_id,
        device_type=cpb.DeviceType.Value(f"DEVICE_TYPE_{e.device_type.upper()}"), ts=float_to_ts(e.ts),
        kind=cpb.EventKind.Value(f"EVENT_KIND_{e.kind.upper()}"), title_id=e.title_id,
        series_id=e.series_id or "", genres=list(e.genres), duration_s=e.duration_s,
        maturity=cpb.Maturity.Value(f"MATURITY_{e.maturity.upper()}") if e.maturity else 0)


def call(method, request, **kwargs):
    return method(request, metadata=ADMIN.metadata("clustering"), timeout=60, **kwargs)


def error_of(method, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(method, request)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return info.value.code(), dict(info.value.trailing_metadata() or ()).get(ERROR_FIELD_KEY, "")


@pytest.fixture
def stub(start_service):
    privacy, _ = start_service("privacy")
    _, channel = start_service("clustering", privacy_addr=f"127.0.0.1:{privacy.port}", feedback_addr=NOWHERE)
    stub = cpb_grpc.ClusteringServiceStub(channel)
    events, _ = household_events(ACC, ("kid", "parent", "teen"), days=25, start_ts=week_start_days_ago(60), seed=1)
    response = call(stub.IngestEvents, iter([cpb.IngestEventsRequest(events=[_pb(e) for e in events])]))
    assert response.accepted == len(events)
    return stub


def _closed_sessions(stub) -> list[cpb.Session]:
    household = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id=ACC))
    return [s for s in household.sessions if s.closed]


def test_refit_builds_the_model_from_every_stored_session(stub):
    refit = call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    sessions = _closed_sessions(stub)
    assert refit.model_version >= 1 and refit.persons == 3
    assert refit.sessions_used == len(sessions)
    again = call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    assert again.model_version == refit.model_version + 1 and again.persons == 3
    assert error_of(stub.Refit, cpb.RefitRequest(account_id="bad id")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "account_id")


def test_assign_sessions_streams_one_answer_per_vector_like_assign_session(stub):
    call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    sessions = _closed_sessions(stub)[:5]
    vectors = b"".join(s.feature_vector for s in sessions)
    requests = [cpb.AssignSessionsRequest(batch_id="b1", account_ids=[ACC], feature_vectors=vectors,
                                          feature_schema_version=sessions[0].feature_schema_version),
                cpb.AssignSessionsRequest(batch_id="b2", account_ids=[ACC] * 2, feature_vectors=vectors[:2 * len(vectors) // 5],
                                          feature_schema_version=sessions[0].feature_schema_version)]
    answers = list(call(stub.AssignSessions, iter(requests)))
    assert [a.batch_id for a in answers] == ["b1", "b2"]
    assert [len(a.assignments) for a in answers] == [5, 2]
    for session, got in zip(sessions, answers[0].assignments):
        probabilities = {p.person_id: p.probability for p in got.probabilities}
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert got.person_id == max(probabilities, key=probabilities.get)
        # The same bare vector through AssignSession: the same scorer, so the same answer. (By
        # session id the stored session's device is evidence too, which a bare vector lacks.)
        one = call(stub.AssignSession, cpb.AssignSessionRequest(
            account_id=ACC, feature_vector=session.feature_vector,
            feature_schema_version=session.feature_schema_version))
        assert one.assignment.person_id == got.person_id
        # The batch path scores in float32 (assign_many): equal to ~1e-6, not bit for bit.
        assert one.assignment.confidence == pytest.approx(got.confidence, abs=1e-5)
    assert [a.person_id for a in answers[1].assignments] == [a.person_id for a in answers[0].assignments[:2]]
    # A vector cut short names the field; the error ends the stream.
    bad = cpb.AssignSessionsRequest(batch_id="b3", account_ids=[ACC], feature_vectors=vectors[:7],
                                    feature_schema_version=sessions[0].feature_schema_version)
    assert error_of(stub.AssignSessions, iter([bad])) == (grpc.StatusCode.INVALID_ARGUMENT, "feature_vectors")
    # Schema 1 vectors (same layout, unknown genres pooled in "other") are still scored;
    # an unknown schema is refused naming the field.
    v1 = cpb.AssignSessionsRequest(batch_id="b4", account_ids=[ACC], feature_vectors=vectors, feature_schema_version=1)
    assert [len(a.assignments) for a in call(stub.AssignSessions, iter([v1]))] == [5]
    v9 = cpb.AssignSessionsRequest(batch_id="b5", account_ids=[ACC], feature_vectors=vectors, feature_schema_version=9)
    assert error_of(stub.AssignSessions, iter([v9])) == (grpc.StatusCode.INVALID_ARGUMENT, "feature_schema_version")


def test_record_labels_counts_known_and_unknown_sessions_and_the_label_wins(stub):
    call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    session = _closed_sessions(stub)[0]
    labels = [cpb.SessionLabel(account_id=ACC, session_id=session.session_id, person_id="p9", source="feedback:test"),
              cpb.SessionLabel(account_id=ACC, session_id="s-unknown", person_id="p1", source="feedback:test")]
    response = call(stub.RecordLabels, cpb.RecordLabelsRequest(labels=labels))
    assert (response.accepted, response.unknown_sessions) == (1, 1)
    relabelled = {s.session_id: s.person_id for s in _closed_sessions(stub)}
    assert relabelled[session.session_id] == "p9"
    answer = call(stub.AssignSession, cpb.AssignSessionRequest(account_id=ACC, session_id=session.session_id))
    assert {p.person_id: p.probability for p in answer.assignment.probabilities}["p9"] == pytest.approx(1.0)
    bad = cpb.RecordLabelsRequest(labels=[cpb.SessionLabel(account_id=ACC, session_id="s", person_id="p 1")])
    assert error_of(stub.RecordLabels, bad) == (grpc.StatusCode.INVALID_ARGUMENT, "labels[0].person_id")
    assert np.isfinite(answer.assignment.confidence)


def test_assign_sessions_scores_many_households_in_one_vectorised_pass(stub, monkeypatch):
    """Vectors of several households in one message: the mixture-answered households are
    scored together by the domain's batch scorer (one call), a cold-start household
    answers by its own strategy, and every answer equals AssignSession's for the same
    session (the batch path is float32)."""
    import services.clustering.batch_scoring as batch_scoring

    t0 = week_start_days_ago(60)
    for account, persons, days in (("acc-grpc-2", ("kid", "parent"), 20), ("acc-grpc-cold", ("parent",), 7)):
        events, _ = household_events(account, persons, days=days, start_ts=t0, seed=3)
        call(stub.IngestEvents, iter([cpb.IngestEventsRequest(events=[_pb(e) for e in events])]))
        call(stub.Refit, cpb.RefitRequest(account_id=account, reason="test"))
    call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    picked = []   # (account, session) interleaved across households
    for account in (ACC, "acc-grpc-2", "acc-grpc-cold"):
        household = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id=account))
        picked += [(account, s) for s in household.sessions if s.closed][:4]
    picked = picked[::2] + picked[1::2]
    calls = []
    real = batch_scoring.assign_many
    monkeypatch.setattr(batch_scoring, "assign_many", lambda *a, **k: calls.append(a[1].size) or real(*a, **k))
    request = cpb.AssignSessionsRequest(batch_id="mixed", account_ids=[a for a, _ in picked],
                                        feature_vectors=b"".join(s.feature_vector for _, s in picked),
                                        feature_schema_version=picked[0][1].feature_schema_version)
    (answer,) = list(call(stub.AssignSessions, iter([request])))
    assert calls == [8]          # the two fitted households' 8 vectors, scored in one call
    assert len(answer.assignments) == len(picked) == 12
    for (account, session), got in zip(picked, answer.assignments):
        one = call(stub.AssignSession, cpb.AssignSessionRequest(
            account_id=account, feature_vector=session.feature_vector,
            feature_schema_version=session.feature_schema_version)).assignment
        assert (got.person_id, got.cold_start) == (one.person_id, one.cold_start)
        assert got.confidence == pytest.approx(one.confidence, abs=1e-5)
        assert [p.person_id for p in got.probabilities] == [p.person_id for p in one.probabilities]
    # (no population prior yet with three households: cold start answers at account level)
    assert {a.cold_start for a in answer.assignments} == {cpb.COLD_START_STRATEGY_UNSPECIFIED,
                                                          cpb.COLD_START_STRATEGY_ACCOUNT}


def test_sessions_arriving_one_at_a_time_after_a_fit_have_persons_at_once(stub):
    """A fitted household whose devices then send one session at a time (fewer than a
    micro-batch): each new session has a person and its probability in the very next
    GetHousehold, though the background refresh may not have run yet, and the model
    status counts it as pending until it is folded in."""
    call(stub.Refit, cpb.RefitRequest(account_id=ACC, reason="test"))
    fitted = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id=ACC, max_sessions=10_000))
    known = {s.session_id for s in fitted.sessions}
    more, _ = household_events(ACC, ("kid", "parent", "teen"), days=4, start_ts=week_start_days_ago(20), seed=5)
    starts = sorted({e.event_id.rsplit("-", 1)[0] for e in more})
    for n, start in enumerate(starts[:6], 1):
        call(stub.IngestEvents, iter([cpb.IngestEventsRequest(
            events=[_pb(e) for e in more if e.event_id.rsplit("-", 1)[0] == start])]))
        h = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id=ACC, max_sessions=10_000))
        new = [s for s in h.sessions if s.session_id not in known and s.closed]
        assert len(new) == n
        assert all(s.person_id in {p.person_id for p in h.persons} and 0.0 < s.person_probability <= 1.0
                   for s in new), [(s.person_id, s.person_probability) for s in new]
        assert h.model_version == fitted.model_version and h.status.sessions_pending == n
