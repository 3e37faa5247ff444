"""Every text field of every RPC, enumerated from the protos' descriptors (so a field added
to a proto is in this test the day it is added), sent to the real services on SQLite and
on PostgreSQL with a NUL, another control character, a bidirectional override, a value
one character over its ceiling and bytes that are not UTF-8. Each must be refused with
INVALID_ARGUMENT naming the field — never INTERNAL (PostgreSQL cannot store a NUL: until
session 30 a field no servicer checked reached a query and answered INTERNAL, a 502 at
the gateway), never accepted — and nothing is written.

Client-streaming RPCs (IngestEvents, AssignSessions) and server-streaming ones
(ExportHouseholdStream, ExportAccountStream) are sent the same way; their fields were
only ever swept by hand."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from services.common import identity, permissions, text
from services.common.client import peer_channel
from services.common.errors import ERROR_FIELD_KEY
from tests.helpers.servers import inprocess_mesh_on

PROTO_MODULES = ("clustering", "attribution", "privacy", "feedback", "common")
# Which process serves a proto service: its package's, and DataHolder on every data holder.
SERVED_BY = {"hearth.clustering.v1": ("clustering",), "hearth.attribution.v1": ("attribution",),
             "hearth.privacy.v1": ("privacy",), "hearth.feedback.v1": ("feedback",),
             "hearth.common.v1": ("clustering", "attribution", "feedback")}
CANDIDATES = (identity.Principal("text-admin", identity.Role.ADMIN), identity.service_principal("privacy"),
              identity.service_principal("clustering"), identity.service_principal("attribution"),
              identity.service_principal("feedback"),
              identity.Principal("text-officer", identity.Role.PRIVACY_OFFICER))
# A character whose UTF-8 form (3 bytes) is swapped for an encoded lone surrogate (3
# bytes, not UTF-8) in the serialised request: a message protobuf cannot parse.
UTF8_MARK, NOT_UTF8 = "\u20ac", b"\xed\xa0\x80"
BAD = {"nul": "ok\x00", "escape": "ok\x1b[2J", "del": "ok\x7f", "c1": "ok\x85",
       "bidi": "ok\u202e", "line_separator": "ok\u2028"}


@dataclass(frozen=True)
class TextField:
    method: str                       # /pkg.Service/Method
    served_by: tuple[str, ...]
    client_streaming: bool
    server_streaming: bool
    request_type: type
    steps: tuple[tuple[str, str], ...]   # (field name, how to reach it)
    field: FieldDescriptor             # the string field itself
    named: str                         # the path the refusal must name

    def request(self, value: str):
        message = self.request_type()
        _put(message, self.steps, value)
        return message

    def __str__(self) -> str:
        return f"{self.method.rsplit('/', 1)[1]}:{self.named}"


def _put(message, steps, value) -> None:
    name, how = steps[0]
    if how == "message":
        _put(getattr(message, name), steps[1:], value)
    elif how == "messages":
        _put(getattr(message, name).add(), steps[1:], value)
    elif how == "string":
        setattr(message, name, value)
    elif how == "strings":
        getattr(message, name).extend(["ok-1", value])
    elif how == "map_key":
        getattr(message, name)[value] = _map_default(message, name)
    elif how == "map_value":
        getattr(message, name)["k"] = value


def _map_default(message, name):
    value_field = message.DESCRIPTOR.fields_by_name[name].message_type.fields_by_name["value"]
    return "v" if value_field.type == FieldDescriptor.TYPE_STRING else value_field.default_value


def _text_fields(descriptor, steps=(), named="", seen=frozenset()) -> Iterator[tuple]:
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            how, path = ("strings", f"{named}{f.name}[1]") if f.is_repeated else ("string", named + f.name)
            yield steps + ((f.name, how),), f, path
        elif f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name not in seen:
            entry = f.message_type
            if entry.GetOptions().map_entry:
                key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
                if key.type == FieldDescriptor.TYPE_STRING:
                    yield steps + ((f.name, "map_key"),), key, named + f.name
                if value.type == FieldDescriptor.TYPE_STRING:
                    yield steps + ((f.name, "map_value"),), value, f"{named}{f.name}[k]"
                continue
            how, path = ("messages", f"{named}{f.name}[0].") if f.is_repeated else ("message", f"{named}{f.name}.")
            yield from _text_fields(entry, steps + ((f.name, how),), path, seen | {entry.full_name})


def all_text_fields() -> list[TextField]:
    found = []
    for module in PROTO_MODULES:
        pb2 = importlib.import_module(f"hearth.{module}.v1.{module}_pb2")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request_type = getattr(importlib.import_module(method.input_type.file.name.replace("/", ".")
                                                               .removesuffix(".proto") + "_pb2"),
                                       method.input_type.name)
                for steps, field, named in _text_fields(method.input_type, seen=frozenset({method.input_type.full_name})):
                    found.append(TextField(f"/{service.full_name}/{method.name}", SERVED_BY[pb2.DESCRIPTOR.package],
                                           method.client_streaming, method.server_streaming, request_type,
                                           steps, field, named))
    return found


TEXT_FIELDS = all_text_fields()


def test_the_enumeration_finds_the_fields_of_every_kind():
    """The walk reaches nested, repeated, map and streamed fields (a walk that found
    none would make the sweep below pass vacuously)."""
    names = {str(f) for f in TEXT_FIELDS}
    assert {"IngestEvents:events[0].genres[1]", "AssignSessions:account_ids[1]",
            "ExportHouseholdStream:account_id", "ExportAccountStream:account_id",
            "AppendAudit:records[0].details[k]", "AppendAudit:records[0].principal.id",
            "RecordPrediction:predictions[0].probabilities", "RequestDeletion:scope.device_id",
            "Erase:job_id"} <= names, sorted(names)
    assert len(TEXT_FIELDS) >= 90


def test_every_field_with_its_own_ceiling_exists():
    """``text.MAX_CHARS_BY_FIELD`` and ``MULTILINE_FIELDS`` name fields of the protos only."""
    known = {f.field.full_name for f in TEXT_FIELDS}
    assert set(text.MAX_CHARS_BY_FIELD) - known == set()
    assert set(text.MULTILINE_FIELDS) - known == set()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh(request, tmp_path_factory):
    m = inprocess_mesh_on(request.param, request, tmp_path_factory, "text")
    channels = {name: peer_channel(address, "test", timeout_s=30.0, audience=name)
                for name, address in m.addresses.items()}
    m.raw_channels = channels
    yield m
    for channel in channels.values():
        channel.close()
    m.stop()


def _principal_for(method: str) -> identity.Principal:
    permission = permissions.rpc_permission(method)
    assert permission is not None, f"{method} is not in the permission matrix"
    for principal in CANDIDATES:
        if permissions.principal_allowed(principal, permission):
            return principal
    raise AssertionError(f"no test principal may call {method}")


def _send(mesh, service: str, f: TextField, data: bytes):
    """Send serialised ``data`` as ``f``'s request (each kind of RPC), reading the answer."""
    channel = mesh.raw_channels[service]
    with identity.acting_as(_principal_for(f.method)):
        if f.client_streaming and f.server_streaming:
            return list(channel.stream_stream(f.method)(iter([data]), timeout=30))
        if f.client_streaming:
            return channel.stream_unary(f.method)(iter([data]), timeout=30)
        if f.server_streaming:
            return list(channel.unary_stream(f.method)(data, timeout=30))
        return channel.unary_unary(f.method)(data, timeout=30)


def _answer(mesh, f: TextField, data: bytes) -> str:
    answers = set()
    for service in f.served_by:
        try:
            _send(mesh, service, f, data)
            answers.add("OK")
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED and f.method.startswith("/hearth.common."):
                continue   # a data holder that does not hold this kind of data
            named = dict(err.trailing_metadata() or ()).get(ERROR_FIELD_KEY)
            answers.add(f"INVALID_ARGUMENT:{named}" if err.code() == grpc.StatusCode.INVALID_ARGUMENT
                        else f"{err.code().name}:{err.details()}")
    return " | ".join(sorted(answers))


def _bad_values(f: TextField) -> dict[str, bytes]:
    values = {kind: f.request(value).SerializeToString() for kind, value in BAD.items()}
    if f.field.full_name not in text.MULTILINE_FIELDS:   # where a reason may run over lines
        values["newline"] = f.request("ok\nforged: line").SerializeToString()
    values["over_long"] = f.request("a" * (text.max_chars_of(f.field) + 1)).SerializeToString()
    marked = f.request("ok" + UTF8_MARK).SerializeToString()
    assert marked.count(UTF8_MARK.encode()) == 1
    values["not_utf8"] = marked.replace(UTF8_MARK.encode(), NOT_UTF8)
    return values


def test_every_text_field_of_every_rpc_refuses_bad_text_naming_it(mesh):
    wrong = []
    for f in TEXT_FIELDS:
        for kind, data in _bad_values(f).items():
            answer = _answer(mesh, f, data)
            if answer != f"INVALID_ARGUMENT:{f.named}":
                wrong.append(f"{f} {kind}: {answer}")
    assert wrong == [], f"{len(wrong)} refusals wrong:\n" + "\n".join(wrong)


def test_a_stream_or_batch_with_one_bad_text_stores_none_of_it(mesh):
    """An ingest stream whose second message holds a bad genre stores not even the first
    message's events; an audit batch whose last record holds a NUL appends none of its
    records (one such record failed PostgreSQL's group commit for the whole flush)."""
    import time as _time

    from hearth.clustering.v1 import clustering_pb2 as cpb
    from hearth.privacy.v1 import privacy_pb2 as ppb
    from services.common.pbutil import float_to_ts

    admin = identity.Principal("text-admin", identity.Role.ADMIN)
    clustering, privacy = mesh.stub("clustering", admin), mesh.stub("privacy", admin)
    account = f"half-{_time.time_ns()}"

    def event(i: int, genre: str = "drama") -> cpb.ViewingEvent:
        return cpb.ViewingEvent(event_id=f"{account}-e{i}", account_id=account, device_id="tv-1",
                                device_type=cpb.DEVICE_TYPE_TV, ts=float_to_ts(_time.time() - 3600 + i),
                                kind=cpb.EVENT_KIND_PLAY_START, title_id="t-1", genres=[genre], duration_s=60)

    stream = [cpb.IngestEventsRequest(events=[event(0), event(1)]),
              cpb.IngestEventsRequest(events=[event(2), event(3, "drama\x00")])]
    with pytest.raises(grpc.RpcError) as err:
        clustering.IngestEvents(iter(stream))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())[ERROR_FIELD_KEY] == "messages[1].events[1].genres[0]"
    status = clustering.GetEventStatus(cpb.GetEventStatusRequest(
        account_id=account, event_ids=[f"{account}-e{i}" for i in range(4)]))
    assert list(status.stored) == [] and len(status.not_stored) == 4
    # The same stream without the NUL is stored (the refusal above was the NUL's).
    stream[1].events[1].genres[0] = "drama"
    assert clustering.IngestEvents(iter(stream)).accepted == 4

    records = [ppb.AuditRecord(event_type="export", resource=f"{account}/ok", outcome="success"),
               ppb.AuditRecord(event_type="export", resource=f"{account}/bad\x00", outcome="success")]
    with pytest.raises(grpc.RpcError) as err:
        privacy.AppendAudit(ppb.AppendAuditRequest(records=records))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())[ERROR_FIELD_KEY] == "records[1].resource"
    found = privacy.QueryAudit(ppb.QueryAuditRequest(resource_prefix=account, limit=10))
    assert [r.resource for r in found.records] == []


def test_the_fields_no_servicer_checked_are_refused_and_nothing_is_stored(mesh):
    """Found by the sweep on bed44f9 with otherwise valid requests: a NUL in a label's
    ``source`` or in an appended audit record's ``principal.id`` was INTERNAL on PostgreSQL
    (the audit one failed the log's group commit) and stored on SQLite; one in Refit's
    ``reason`` was accepted on both."""
    import time as _time

    from hearth.clustering.v1 import clustering_pb2 as cpb
    from hearth.common.v1 import common_pb2
    from hearth.privacy.v1 import privacy_pb2 as ppb
    from services.common.pbutil import float_to_ts

    admin = identity.Principal("text-admin", identity.Role.ADMIN)
    clustering, privacy = mesh.stub("clustering", admin), mesh.stub("privacy", admin)
    account = f"unchecked-{_time.time_ns()}"
    now = _time.time()
    clustering.IngestEvents(iter([cpb.IngestEventsRequest(events=[cpb.ViewingEvent(
        event_id=f"{account}-e{i}", account_id=account, device_id="tv-1", device_type=cpb.DEVICE_TYPE_TV,
        ts=float_to_ts(now - 7200 + 60 * i), kind=cpb.EVENT_KIND_PLAY_START, title_id="t-1", genres=["drama"],
        duration_s=60) for i in range(5)])]))
    session = clustering.GetHousehold(cpb.GetHouseholdRequest(account_id=account)).sessions[0].session_id

    def refusal(call) -> str:
        try:
            call()
            return "OK"
        except grpc.RpcError as err:
            return f"{err.code().name}:{dict(err.trailing_metadata() or ()).get(ERROR_FIELD_KEY)}"

    label = cpb.SessionLabel(account_id=account, session_id=session, person_id="p1", source="feedback\x00x")
    audit = ppb.AuditRecord(event_type="export", resource=f"{account}/r", outcome="success",
                            principal=common_pb2.Principal(id="bob\x00", role=common_pb2.ROLE_ADMIN))
    assert [refusal(lambda: clustering.RecordLabels(cpb.RecordLabelsRequest(labels=[label]))),
            refusal(lambda: privacy.AppendAudit(ppb.AppendAuditRequest(records=[audit]))),
            refusal(lambda: clustering.Refit(cpb.RefitRequest(account_id=account, reason="why\x00")))] == [
        "INVALID_ARGUMENT:labels[0].source", "INVALID_ARGUMENT:records[0].principal.id",
        "INVALID_ARGUMENT:reason"]
    assert list(privacy.QueryAudit(ppb.QueryAuditRequest(resource_prefix=account, limit=10)).records) == []
    label.source = "feedback:x"
    assert clustering.RecordLabels(cpb.RecordLabelsRequest(labels=[label])).accepted == 1


def test_a_bidirectional_stream_over_a_peer_channel_answers_before_its_deadline(mesh):
    """AssignSessions (the one bidirectional RPC) over the mesh's own peer channel: the
    client interceptor waited for the whole response stream before handing it over, so
    every such call hung until its deadline (found by the sweep above: DEADLINE_EXCEEDED
    after 30 s for each AssignSessions field, on bed44f9)."""
    from hearth.clustering.v1 import clustering_pb2 as cpb

    stub = mesh.stub("clustering", identity.Principal("text-admin", identity.Role.ADMIN))
    answers = list(stub.AssignSessions(iter([cpb.AssignSessionsRequest(batch_id="b-1"),
                                             cpb.AssignSessionsRequest(batch_id="b-2")]), timeout=10))
    assert [a.batch_id for a in answers] == ["b-1", "b-2"]
