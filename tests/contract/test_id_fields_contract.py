"""Which fields the gRPC interceptor checks as ids (``services/common/text.py``, run on every
request by ``services/common/server.py``) is read from the protos' descriptors, not kept as a
list of names: a string field named ``id``, ``*_id`` or ``*_ids`` is an id unless
``text.NOT_IDS`` says why not. Until session 34 it was a list (``ID_FIELD_NAMES``), and an
id field missing from it was checked as text — 256 characters and the text rule's words
(``job_id``: 128 and "must be at most 128 characters", where ``Erase`` and the gateway
answer the id rule), and a new proto field with an id in it would have been the same,
silently. These tests walk every message of every Hearth proto (the descriptor pool):
each id-shaped field is an id or excused, each table names fields that exist, and the
interceptor's check refuses each id over 128 characters with the id rule naming its path
— a proto field added tomorrow is in this test the day it is added."""

from __future__ import annotations

import importlib

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor

from services.common import text
from services.common.errors import InvalidArgument
from services.common.ids import ID_RULE, MAX_ID_CHARS

PROTO_MODULES = ("common", "clustering", "attribution", "privacy", "feedback")
TOO_LONG = "a" * (MAX_ID_CHARS + 1)


def _messages():
    """Every message type of the Hearth protos, nested ones and map entries included."""
    seen: dict[str, object] = {}

    def walk(descriptor) -> None:
        if descriptor.full_name in seen:
            return
        seen[descriptor.full_name] = descriptor
        for nested in descriptor.nested_types:
            walk(nested)
        for field in descriptor.fields:
            if field.message_type is not None:
                walk(field.message_type)
    for name in PROTO_MODULES:
        module = importlib.import_module(f"hearth.{name}.v1.{name}_pb2")
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            walk(descriptor)
    return [d for name, d in sorted(seen.items()) if name.startswith("hearth.")]


def _id_shaped(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_STRING and (field.name == "id" or field.name.endswith(("_id", "_ids")))


def _fields():
    return [f for d in _messages() for f in d.fields]


def _not_ids() -> dict:
    return text.NOT_IDS


def _is_id(field: FieldDescriptor) -> bool:
    return text.is_id_field(field)


def test_every_id_shaped_field_of_every_message_is_an_id_or_excused():
    missed = [f.full_name for f in _fields() if _id_shaped(f) and not _is_id(f)
              and f.full_name not in _not_ids()]
    assert not missed, f"id-shaped fields the interceptor checks as text: {missed}"


def test_the_tables_name_fields_that_exist_and_say_why():
    fields = {f.full_name: f for f in _fields()}
    for full_name, why in _not_ids().items():
        assert full_name in fields, f"NOT_IDS names {full_name}, which no proto has"
        assert _id_shaped(fields[full_name]), f"{full_name} is not id-shaped: it needs no excuse"
        assert len(why) > 20, full_name
    names = {f.name for f in fields.values()}
    assert text.ID_NAMED_OTHERWISE <= names
    assert text.ID_MAP_KEYS <= set(fields)


def _one_message_holding(field: FieldDescriptor):
    """An instance of ``field``'s message with ``field`` set to an over-long id, and the
    path the refusal must name."""
    message = message_factory.GetMessageClass(field.containing_type)()
    if field.is_repeated:
        getattr(message, field.name).extend(["ok-1", TOO_LONG])
        return message, f"{field.name}[1]"
    setattr(message, field.name, TOO_LONG)
    return message, field.name


@pytest.mark.parametrize("field", [f for f in _fields() if f.type == FieldDescriptor.TYPE_STRING
                                   and (_id_shaped(f) and f.full_name not in _not_ids()
                                        or f.name in text.ID_NAMED_OTHERWISE)
                                   and not f.containing_type.GetOptions().map_entry],
                         ids=lambda f: f.full_name)
def test_the_interceptor_refuses_each_id_over_128_characters_with_the_id_rule(field):
    message, path = _one_message_holding(field)
    with pytest.raises(InvalidArgument) as info:
        text.check_text_fields(message)
    assert (info.value.field, info.value.message) == (path, ID_RULE)


def test_a_new_proto_field_with_an_id_in_it_is_checked_as_an_id_the_day_it_is_added():
    """A message no Hearth proto has yet — a ``household_id`` and ``household_ids``, beside a
    ``note`` that is text — built in a descriptor pool of its own, as protoc would build it."""
    proto = descriptor_pb2.FileDescriptorProto(name="hearth/probe/v1/probe.proto", package="hearth.probe.v1",
                                               syntax="proto3")
    new = proto.message_type.add(name="NewRequest")
    string, optional, repeated = (descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                                  descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                                  descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    new.field.add(name="household_id", number=1, type=string, label=optional)
    new.field.add(name="household_ids", number=2, type=string, label=repeated)
    new.field.add(name="note", number=3, type=string, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("hearth.probe.v1.NewRequest"))
    for message, path in ((cls(household_id=TOO_LONG), "household_id"),
                          (cls(household_ids=["ok", TOO_LONG]), "household_ids[1]")):
        with pytest.raises(InvalidArgument) as info:
            text.check_text_fields(message)
        assert (info.value.field, info.value.message) == (path, ID_RULE)
    text.check_text_fields(cls(note=TOO_LONG))   # text: 256 characters
