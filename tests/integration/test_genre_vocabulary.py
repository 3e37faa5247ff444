"""The genre vocabulary through the running clustering service (real gRPC server with
privacy for consent and data keys): aliases configured by settings reach their feature
genre, names outside the vocabulary are counted (hearth_unknown_genre_events_total),
keep their identity in the vectors (a hashed genre slot) and are reported per household
in the model status — or refused, naming the field, when the
operator chose HEARTH_UNKNOWN_GENRES=reject. A bad alias stops the service at start."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.clustering.app import UNKNOWN_GENRE_EVENTS
from services.clustering.domain import features as F
from services.common.config import ConfigError
from tests.helpers.households import household_events, week_start_days_ago
from tests.integration.test_clustering_grpc import NOWHERE, _pb, call, error_of

T0 = week_start_days_ago(30)


def _clustering(start_service, **settings):
    privacy, _ = start_service("privacy")
    _, channel = start_service("clustering", privacy_addr=f"127.0.0.1:{privacy.port}", feedback_addr=NOWHERE,
                               **settings)
    return cpb_grpc.ClusteringServiceStub(channel)


def _events(account: str):
    """A parent whose every other event is tagged with house genre names: "Sci-Fi"
    (aliased by the test's settings) and "k_drama" (unknown)."""
    events, _ = household_events(account, ("parent",), days=12, start_ts=T0, seed=2)
    return [replace(e, genres=("Sci-Fi", "k_drama") if i % 2 else e.genres) for i, e in enumerate(events)]


def test_unknown_genres_are_counted_and_reported_aliases_reach_their_genre(start_service):
    stub = _clustering(start_service, genre_aliases="sci-fi=scifi")
    events = _events("acc-genres")
    tagged = sum(1 for i in range(len(events)) if i % 2)
    counted_before = UNKNOWN_GENRE_EVENTS._value.get()
    call(stub.IngestEvents, iter([cpb.IngestEventsRequest(events=[_pb(e) for e in events])]))
    assert UNKNOWN_GENRE_EVENTS._value.get() - counted_before == tagged
    h = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id="acc-genres", max_sessions=10_000))
    assert {g.genre: g.events for g in h.status.unknown_genres} == {"k_drama": tagged}
    X = np.vstack([np.frombuffer(s.feature_vector, dtype="<f4") for s in h.sessions if s.closed])
    genres = X[:, F.GENRE]
    assert genres[:, F.GENRES.index("scifi")].sum() > 0          # the alias reached its genre
    assert genres[:, F.GENRES.index("other")].sum() > 0          # the unknown name still counts,
    assert genres[:, F.hashed_genre_slot("k_drama")].sum() > 0   # in its own (hashed) slot too
    assert {s.feature_schema_version for s in h.sessions} == {F.FEATURE_SCHEMA_VERSION}
    assert np.allclose(genres.sum(axis=1), 1.0, atol=1e-5)


def test_reject_policy_refuses_an_unknown_genre_naming_the_event_and_stores_nothing(start_service):
    stub = _clustering(start_service, unknown_genres="reject", genre_aliases="sci-fi=scifi,k_drama=drama")
    events = _events("acc-strict")
    bad = replace(events[3], genres=("drama", "telenovela"))
    request = cpb.IngestEventsRequest(events=[_pb(e) for e in [*events[:3], bad, *events[4:]]])
    assert error_of(stub.IngestEvents, iter([request])) == (grpc.StatusCode.INVALID_ARGUMENT, "events[3].genres")
    with pytest.raises(grpc.RpcError) as info:
        call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id="acc-strict"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND                     # nothing half-written
    # Every name mapped: accepted, nothing to report.
    call(stub.IngestEvents, iter([cpb.IngestEventsRequest(events=[_pb(e) for e in events])]))
    h = call(stub.GetHousehold, cpb.GetHouseholdRequest(account_id="acc-strict"))
    assert len(h.sessions) > 0 and not h.status.unknown_genres


def test_a_bad_alias_stops_the_service_naming_the_variable(start_service):
    with pytest.raises(ConfigError, match="HEARTH_GENRE_ALIASES"):
        _clustering(start_service, genre_aliases="western=cowboys")
