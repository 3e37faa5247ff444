"""gRPC adapter of the clustering service: validate -> pb to domain -> one call -> pb."""

from __future__ import annotations

import json
from collections.abc import Iterator

from hearth.clustering.v1 import clustering_pb2 as pb
from hearth.clustering.v1 import clustering_pb2_grpc as pb_grpc
from services.clustering.app import ClusteringApp
from services.clustering.domain.events import MAX_EVENTS_PER_BATCH, ViewingEvent, validate_batch
from services.clustering.store import HouseholdView
from services.common.erasure import result_to_pb, scope_from_pb
from services.common.errors import InvalidArgument
from services.common.pbutil import enum_to_name, float_to_ts, name_to_enum, ts_to_float

_DEVICE = pb.DeviceType.DESCRIPTOR
_KIND = pb.EventKind.DESCRIPTOR
_MATURITY = pb.Maturity.DESCRIPTOR
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClusteringService"].full_name
MAX_INGEST_STREAM_EVENTS = 1_000_000


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
    )


def household_to_pb(view: HouseholdView, extras) -> pb.GetHouseholdResponse:
    response = pb.GetHouseholdResponse(account_id=view.account_id)
    for d in view.devices:
        response.devices.append(pb.Device(
            device_id=d.device_id, device_type=name_to_enum(d.device_type, _DEVICE, "DEVICE_TYPE_"),
            session_count=d.session_count, last_seen=float_to_ts(d.last_ts)))
    for s in view.sessions:
        response.sessions.append(pb.Session(
            session_id=s.session_id, device_id=s.device_id, start=float_to_ts(s.start_ts),
            end=float_to_ts(s.end_ts), event_count=s.event_count, watch_seconds=s.watch_seconds,
            closed=s.closed, feature_schema_version=s.feature_version,
            feature_vector=s.features.tobytes() if s.closed else b"", person_id=s.person_id or ""))
    response.persons.extend(extras.persons)
    response.drift_events.extend(extras.drift_events)
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
            batch = [event_from_pb(e, f"events[{base + i}]") for i, e in enumerate(request.events)]
            events.extend(validate_batch(batch) if batch else [])
            if len(events) > MAX_INGEST_STREAM_EVENTS:
                raise InvalidArgument(f"at most {MAX_INGEST_STREAM_EVENTS} events per stream", "events")
        result = self.app.ingest(events)
        return pb.IngestEventsResponse(accepted=result.accepted, duplicates=result.duplicates,
                                       rejected_late=result.rejected_late,
                                       sessions_touched=result.sessions_touched)

    def GetHousehold(self, request: pb.GetHouseholdRequest, context) -> pb.GetHouseholdResponse:
        if request.max_sessions < 0 or request.max_sessions > 10_000:
            raise InvalidArgument("must be in 0..10000", "max_sessions")
        view, extras = self.app.household(request.account_id, request.max_sessions or 500)
        return household_to_pb(view, extras)

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

    def Erase(self, request: pb.EraseRequest, context) -> pb.EraseResponse:
        outcome = self.app.erase(scope_from_pb(request.scope))
        return pb.EraseResponse(result=result_to_pb("clustering", outcome))

    def ExportAccount(self, request: pb.ExportAccountRequest, context) -> pb.ExportAccountResponse:
        return pb.ExportAccountResponse(json=json.dumps(self.app.export_account(request.account_id),
                                                        sort_keys=True, ensure_ascii=False))
