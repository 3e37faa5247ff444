"""gRPC adapter of the clustering service: validate -> pb to domain -> one call -> pb."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from hearth.clustering.v1 import clustering_pb2 as pb
from hearth.clustering.v1 import clustering_pb2_grpc as pb_grpc
import numpy as np

from services.clustering.app import Answers, AssignmentOut, ClusteringApp
from services.clustering.domain import features as F
from services.clustering.domain.events import MAX_EVENTS_PER_BATCH, ViewingEvent, validate_batch
from services.clustering.store import HouseholdView
from services.common import identity
from services.common.errors import InvalidArgument
from services.common.pbutil import enum_to_name, float_to_ts, length_delimited, name_to_enum, ts_to_float, varint

_DEVICE = pb.DeviceType.DESCRIPTOR
_KIND = pb.EventKind.DESCRIPTOR
_MATURITY = pb.Maturity.DESCRIPTOR
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClusteringService"].full_name
# A stream is one batch, as the gateway's request: its events are held in memory, validated,
# until the stream ends and they are stored in one transaction. Several messages are for
# events too large together for one message (HEARTH_GRPC_MAX_MESSAGE_BYTES), not for more
# of them. Until attack30 a stream took 1,000,000: 100,000 small events took clustering
# from 108 to 437 MB and held the write transaction for most of 44 s.
MAX_INGEST_STREAM_EVENTS = MAX_EVENTS_PER_BATCH
# An AssignSessions message is one batch too: each vector may be another household's, whose
# consent, confirmed version and model are read before any is scored. Until attack31 a
# message held what 16 MiB holds (~90,000 vectors): 90,000 unknown households took 14.5 s
# and +103 MB before the NOT_FOUND. A stream may still carry any number of messages.
MAX_ASSIGN_MESSAGE_VECTORS = MAX_EVENTS_PER_BATCH


def event_from_pb(e: pb.ViewingEvent, path: str) -> ViewingEvent:
    return ViewingEvent(
        event_id=e.event_id,
        account_id=e.account_id,
        device_id=e.device_id,
        device_type=enum_to_name(e.device_type, _DEVICE, "DEVICE_TYPE_", f"{path}.device_type"),
        ts=ts_to_float(e, "ts", f"{path}.ts"),
        kind=enum_to_name(e.kind, _KIND, "EVENT_KIND_", f"{path}.kind"),
        title_id=e.title_id,
        series_id=e.series_id if e.HasField("series_id") else None,
        genres=tuple(e.genres),
        duration_s=e.duration_s,
        maturity=(enum_to_name(e.maturity, _MATURITY, "MATURITY_", f"{path}.maturity")
                  if e.maturity else None),
        country=e.country if e.HasField("country") else None,
        vpn=e.vpn,
        profile_hint=e.profile_hint if e.HasField("profile_hint") else None,
        utc_offset_minutes=e.utc_offset_minutes if e.HasField("utc_offset_minutes") else None,
    )


_COLD = {"": pb.COLD_START_STRATEGY_UNSPECIFIED, "account": pb.COLD_START_STRATEGY_ACCOUNT,
         "population_prior": pb.COLD_START_STRATEGY_POPULATION_PRIOR,
         "heuristic": pb.COLD_START_STRATEGY_HEURISTIC}


def profile_to_pb(p: dict) -> pb.PersonProfile:
    rhythm = p.get("rhythm", {})
    weekend = rhythm.get("weekend_share")
    return pb.PersonProfile(
        person_id=p["person_id"], session_count=int(round(p.get("sessions", 0))),
        peak_hours=[int(h) for h in rhythm.get("peak_hours_utc", [])],
        peak_days=[] if weekend is None else (["weekend"] if weekend >= 0.5 else ["weekdays"]),
        devices=list(p.get("devices", {})), top_genres=list(p.get("top_genres", [])),
        kids_share=float(p.get("kids_share", 0.0)))


def assignment_to_pb(a: AssignmentOut) -> pb.Assignment:
    return pb.Assignment(
        person_id=a.person_id, confidence=a.confidence,
        probabilities=[pb.PersonProbability(person_id=k, probability=v) for k, v in a.probabilities.items()],
        model_variant=a.model_variant, model_version=a.model_version, cold_start=_COLD[a.cold_start],
        sessions_until_full_model=a.sessions_until_full_model, prediction_id=a.prediction_id)


def _tag(message, name: str, wire_type: int = 2) -> bytes:
    """The key of ``message``'s field ``name`` in the wire format (2: length-delimited, 1: 64-bit)."""
    field = message.DESCRIPTOR.fields_by_name[name]
    expected = 2 if field.type in (field.TYPE_STRING, field.TYPE_MESSAGE, field.TYPE_BYTES) else (
        1 if field.type == field.TYPE_DOUBLE else None)
    if wire_type != expected:
        raise TypeError(f"{message.DESCRIPTOR.name}.{name} is not of wire type {wire_type}")
    return varint(field.number << 3 | wire_type)


# Wire keys of the fields of an answer that differ from session to session, which
# assignments_response writes itself (a household's others are serialized by protobuf).
_ASSIGNMENTS = _tag(pb.AssignSessionsResponse, "assignments")
_BATCH_ID = _tag(pb.AssignSessionsResponse, "batch_id")
_PERSON_ID = _tag(pb.Assignment, "person_id")
_PROBABILITIES = _tag(pb.Assignment, "probabilities")
_PREDICTION_ID = _tag(pb.Assignment, "prediction_id")
_PROBABILITY_PERSON = _tag(pb.PersonProbability, "person_id")
_CONFIDENCE = _tag(pb.Assignment, "confidence", wire_type=1)
_PROBABILITY = _tag(pb.PersonProbability, "probability", wire_type=1)
_DOUBLE = struct.Struct("<d").pack


def assignments_response(batch_id: str, n: int, households: Iterable[tuple[np.ndarray, Answers]]
                         ) -> pb.AssignSessionsResponse:
    """The AssignSessionsResponse of ``n`` answers (``households``: each household's rows,
    indices into the message's vectors, and its answers to them, ClusteringApp.answer_many):
    ``AssignSessionsResponse(batch_id=..., assignments=[assignment_to_pb(a) ...])`` in the
    vectors' order, written as the wire bytes protobuf parses (in C) instead of two messages
    built a session. The fields a household's answers share are serialized once by
    protobuf; a person's map entry's prefix once per person (tests/unit/clustering/
    test_answer_encoding.py holds the result equal to assignment_to_pb's). Every field is
    written, zeros and empty strings too: parsed, they are the same message (proto3) and
    gRPC serializes it as protobuf would."""
    encoded = [b""] * n
    for rows, answers in households:
        shared = pb.Assignment(model_variant=answers.model_variant, model_version=answers.model_version,
                               cold_start=_COLD[answers.cold_start],
                               sessions_until_full_model=answers.sessions_until_full_model).SerializeToString()
        heads: dict[str, bytes] = {}
        entries: dict[str, bytes] = {}
        for i, pid, probs, prediction_id in zip(rows.tolist(), answers.person_ids, answers.probabilities,
                                               answers.prediction_ids):
            head = heads.get(pid)
            if head is None:
                head = heads[pid] = shared + length_delimited(_PERSON_ID, pid.encode()) + _CONFIDENCE
            parts = [head, _DOUBLE(probs[pid])]
            for person, probability in probs.items():
                prefix = entries.get(person)
                if prefix is None:
                    name = length_delimited(_PROBABILITY_PERSON, person.encode())
                    prefix = entries[person] = _PROBABILITIES + varint(len(name) + 9) + name + _PROBABILITY
                parts.append(prefix)
                parts.append(_DOUBLE(probability))
            parts.append(length_delimited(_PREDICTION_ID, prediction_id.encode()))
            encoded[i] = length_delimited(_ASSIGNMENTS, b"".join(parts))
    return pb.AssignSessionsResponse.FromString(length_delimited(_BATCH_ID, batch_id.encode()) + b"".join(encoded))


def _vectors(data: bytes, schema_version: int, field: str) -> np.ndarray:
    # Schema 1 vectors have schema 2's layout (they pooled unknown genre names in
    # "other"): a caller still sending them is scored, as the model would any session.
    if schema_version not in (0, F.POOLED_UNKNOWN_SCHEMA_VERSION, F.FEATURE_SCHEMA_VERSION):
        raise InvalidArgument(f"unsupported feature schema version {schema_version} "
                              f"(this service: {F.FEATURE_SCHEMA_VERSION})", "feature_schema_version")
    try:
        return F.from_bytes(data).astype(np.float64)
    except ValueError:
        raise InvalidArgument(f"must be a multiple of {F.FEATURE_DIM} little-endian float32 values",
                              field) from None


def household_to_pb(view: HouseholdView, extras) -> pb.GetHouseholdResponse:
    response = pb.GetHouseholdResponse(
        account_id=view.account_id, next_page_token=extras.next_page_token,
        truncated=bool(extras.next_page_token), total_sessions=view.total_sessions,
        total_devices=view.total_devices,
        status=pb.ModelStatus(model_version=extras.model_version, sessions_in_model=extras.sessions_in_model,
                              sessions_pending=extras.sessions_pending, persons=extras.n_persons,
                              settled=extras.settled,
                              unknown_genres=[pb.GenreCount(genre=g, events=n)
                                              for g, n in extras.unknown_genres.items()]))
    if extras.last_refit:
        response.status.last_refit.CopyFrom(float_to_ts(extras.last_refit))
    for d in view.devices:
        response.devices.append(pb.Device(
            device_id=d.device_id, device_type=name_to_enum(d.device_type, _DEVICE, "DEVICE_TYPE_"),
            session_count=d.session_count, last_seen=float_to_ts(d.last_ts)))
    for s in view.sessions:
        response.sessions.append(pb.Session(
            session_id=s.session_id, device_id=s.device_id, start=float_to_ts(s.start_ts),
            end=float_to_ts(s.end_ts), event_count=s.event_count, watch_seconds=s.watch_seconds,
            closed=s.closed, feature_schema_version=s.feature_version,
            feature_vector=s.features.tobytes() if s.closed else b"", person_id=s.person_id or "",
            person_probability=view.person_probability.get(s.session_id, 0.0),
            zero_watch=s.watch_seconds <= 0.0))
    response.persons.extend(profile_to_pb(p) for p in extras.persons)
    response.drift_events.extend(
        pb.DriftEvent(drift_type=d.drift_type, severity=d.severity, statistic=d.statistic,
                      detected_at=float_to_ts(d.detected_at), refit_triggered=d.refit_triggered)
        for d in extras.drift_events)
    response.model_version = extras.model_version
    response.model_variant = extras.model_variant
    return response


class ClusteringServicer(pb_grpc.ClusteringServiceServicer):
    def __init__(self, app: ClusteringApp) -> None:
        self.app = app

    def IngestEvents(self, request_iterator: Iterator[pb.IngestEventsRequest], context) -> pb.IngestEventsResponse:
        # Validate the whole stream before storing any of it: a bad event anywhere
        # rejects the call and nothing is half-written.
        events: list[ViewingEvent] = []
        for request in request_iterator:
            if len(request.events) > MAX_EVENTS_PER_BATCH:
                raise InvalidArgument(f"at most {MAX_EVENTS_PER_BATCH} events per message", "events")
            base = len(events)
            if base + len(request.events) > MAX_INGEST_STREAM_EVENTS:   # before decoding the message
                raise InvalidArgument(f"at most {MAX_INGEST_STREAM_EVENTS} events per stream (one batch; "
                                      "send more in another call)", "events")
            batch = [event_from_pb(e, f"events[{base + i}]") for i, e in enumerate(request.events)]
            events.extend(validate_batch(batch) if batch else [])
        result = self.app.ingest(events)
        return pb.IngestEventsResponse(accepted=result.accepted, duplicates=result.duplicates,
                                       rejected_late=result.rejected_late,
                                       sessions_touched=result.sessions_touched,
                                       rejected_expired=result.rejected_expired)

    def GetHousehold(self, request: pb.GetHouseholdRequest, context) -> pb.GetHouseholdResponse:
        if request.max_sessions < 0 or request.max_sessions > 10_000:
            raise InvalidArgument("must be in 0..10000", "max_sessions")
        view, extras = self.app.household(request.account_id, request.max_sessions or 500, request.page_token)
        return household_to_pb(view, extras)

    def AssignSession(self, request: pb.AssignSessionRequest, context) -> pb.AssignSessionResponse:
        which = request.WhichOneof("session")
        if which == "feature_vector":
            vectors = _vectors(request.feature_vector, request.feature_schema_version, "feature_vector")
            if vectors.shape[0] != 1:
                raise InvalidArgument("must hold exactly one vector", "feature_vector")
            out = self.app.assign(request.account_id, vector=vectors[0])
        elif which == "session_id":
            out = self.app.assign(request.account_id, session_id=request.session_id)
        else:
            raise InvalidArgument("a session_id or a feature_vector is required", "session")
        return pb.AssignSessionResponse(assignment=assignment_to_pb(out))

    def AssignSessions(self, request_iterator, context):
        for request in request_iterator:
            # Counted before anything is decoded or read.
            if len(request.feature_vectors) > MAX_ASSIGN_MESSAGE_VECTORS * F.FEATURE_DIM * 4:
                raise InvalidArgument(f"at most {MAX_ASSIGN_MESSAGE_VECTORS} vectors a message "
                                      "(send more in further messages of the stream)", "feature_vectors")
            if len(request.account_ids) > MAX_ASSIGN_MESSAGE_VECTORS:
                raise InvalidArgument(f"at most {MAX_ASSIGN_MESSAGE_VECTORS} account ids a message (one per vector)",
                                      "account_ids")
            vectors = _vectors(request.feature_vectors, request.feature_schema_version, "feature_vectors")
            answers = self.app.answer_many(list(request.account_ids), vectors) if vectors.shape[0] else []
            yield assignments_response(request.batch_id, vectors.shape[0], answers)

    def Refit(self, request: pb.RefitRequest, context) -> pb.RefitResponse:
        version, persons, sessions = self.app.refit(request.account_id, request.reason)
        return pb.RefitResponse(model_version=version, persons=persons, sessions_used=sessions)

    def RecordLabels(self, request: pb.RecordLabelsRequest, context) -> pb.RecordLabelsResponse:
        accepted, unknown = self.app.record_labels(
            [(x.account_id, x.session_id, x.person_id, x.source) for x in request.labels])
        return pb.RecordLabelsResponse(accepted=accepted, unknown_sessions=unknown)

    def GetEventStatus(self, request: pb.GetEventStatusRequest, context) -> pb.GetEventStatusResponse:
        stored, erased, not_stored = self.app.event_status(request.account_id, list(request.event_ids),
                                                           caller=identity.current_principal())
        return pb.GetEventStatusResponse(stored=stored, erased=erased, not_stored=not_stored)

    def GetPersonDevices(self, request: pb.GetPersonDevicesRequest, context) -> pb.GetPersonDevicesResponse:
        own, shared = self.app.person_devices(request.account_id, request.person_id)
        return pb.GetPersonDevicesResponse(own_device_ids=own, shared_device_ids=shared)

    def ResolvePersons(self, request: pb.ResolvePersonsRequest, context) -> pb.ResolvePersonsResponse:
        if len(request.instants) > 10_000:
            raise InvalidArgument("at most 10000 instants", "instants")
        instants = [(i.account_id, i.device_id, ts_to_float(i, "ts", f"instants[{n}].ts"))
                    for n, i in enumerate(request.instants)]
        resolved = self.app.resolve_persons(instants)
        return pb.ResolvePersonsResponse(persons=[
            pb.ResolvedPerson(session_id=session_id, probabilities=[
                pb.PersonProbability(person_id=p, probability=q) for p, q in sorted(probs.items())])
            for session_id, probs in resolved])
