"""The one text rule of the mesh: which characters a text field may hold, how long it may
be, and the error when it is not so. ``ids.py`` holds the narrower identifier rule
(``check_id``); everything that is text but not an id — reasons, labels, filters, job
ids, variants, JSON documents — is checked here, with the same words everywhere.

The rule, stated once (docs/operations.md, "Text fields"):

* **Refused in every text field**: the C0 controls U+0000-U+001F (NUL among them: a
  PostgreSQL ``text`` cannot hold it, so it became INTERNAL, a 502 — attack29), DEL and
  the C1 controls U+007F-U+009F, the line and paragraph separators U+2028/U+2029 (they
  split a log line as a newline does), the bidirectional embeddings, overrides and
  isolates U+202A-U+202E and U+2066-U+2069 (they make text display in another order
  than it is stored: an audit reader would see another resource than the one on
  record), and lone surrogates U+D800-U+DFFF (not text; only a JSON ``\\ud800`` escape
  can make one, and no store or protobuf can encode it).
* **Multi-line text** (``MULTILINE_FIELDS``: a feedback flag's or calibrator's reason, a
  receipt to verify, an audit record's details) may also hold tab, line feed and carriage
  return: a reason over several lines stays one (session 29), and a pretty-printed JSON
  document is accepted (inside a JSON string they are escaped anyway).
* **Lengths**: at most ``MAX_TEXT_CHARS`` characters unless ``MAX_CHARS_BY_FIELD`` gives
  the field its own ceiling. A field's own rule (an id's format, a reason of 1-200
  characters) may be narrower; it is checked where the field is used.
* **The error**: ``InvalidArgument`` (gRPC INVALID_ARGUMENT, HTTP 422 through the
  gateway's one table) naming the field by its path in the request, e.g.
  ``records[3].resource``, ``events[0].genres[2]``.

Every gRPC request message is checked whole by the server's interceptor
(``check_text_fields``, services/common/server.py) before its handler runs: each
message of a client stream as it is read, so no servicer can forget a field and a new
field of a proto is covered the day it is added (tests/integration/test_text_fields_grpc.py
enumerates them from the descriptors). Entry points that are not gRPC (the gateway's
models, CLIs, domain code called in-process) call ``check_text`` or use ``TEXT_PATTERN``
(``MULTILINE_TEXT_PATTERN``).
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument
from services.common.ids import ID_RULE, MAX_ID_CHARS

# The characters refused, as regular-expression classes (the same text in Python's ``re``
# and in pydantic-core's Rust regex, which the gateway's models use).
_LINE_BREAKING = "\u2028\u2029"
_BIDI = "\u202a-\u202e\u2066-\u2069"
REFUSED_CHARS = "\x00-\x1f\x7f-\x9f" + _LINE_BREAKING + _BIDI
REFUSED_IN_MULTILINE_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f" + _LINE_BREAKING + _BIDI
_SURROGATES = "\ud800-\udfff"
_REFUSED = re.compile(f"[{REFUSED_CHARS}{_SURROGATES}]")
_REFUSED_IN_MULTILINE = re.compile(f"[{REFUSED_IN_MULTILINE_CHARS}{_SURROGATES}]")
# For pydantic/FastAPI ``pattern=`` (the gateway): text of allowed characters only.
# pydantic-core refuses a lone surrogate itself (its strings are UTF-8).
TEXT_PATTERN = f"^[^{REFUSED_CHARS}]*$"
MULTILINE_TEXT_PATTERN = f"^[^{REFUSED_IN_MULTILINE_CHARS}]*$"

MAX_TEXT_CHARS = 256
MAX_JSON_CHARS = 1_000_000
MAX_JOB_ID_CHARS = 128          # a deletion job's or a data-key rotation's id
MAX_REQUEST_ID_CHARS = 200      # an idempotency key a caller chooses
MAX_REASON_CHARS = 200          # why a deletion or a refit was asked for
# Fields with a ceiling of their own, by protobuf full name (checked by the descriptor
# test: a name here that no proto has fails it, so the table cannot go stale).
MAX_CHARS_BY_FIELD: dict[str, int] = {
    # Audit records: principal, resource and trace id as the audit domain bounds them
    # (services/privacy/audit/domain.py MAX_TEXT), and their filters alike.
    "hearth.common.v1.Principal.id": 1024,
    "hearth.privacy.v1.AuditRecord.resource": 1024,
    "hearth.privacy.v1.AuditRecord.trace_id": 1024,
    "hearth.privacy.v1.AuditRecord.DetailsEntry.value": 65_536,
    "hearth.privacy.v1.AuditRecord.details_json": MAX_JSON_CHARS,
    "hearth.privacy.v1.QueryAuditRequest.principal_id": 1024,
    "hearth.privacy.v1.QueryAuditRequest.resource_prefix": 1024,
    "hearth.privacy.v1.QueryAuditRequest.trace_id": 1024,
    "hearth.privacy.v1.VerifyReceiptRequest.receipt_json": MAX_JSON_CHARS,
    # Reasons people write (feedback's own bound is 500).
    "hearth.privacy.v1.RequestDeletionRequest.reason": MAX_REASON_CHARS,
    "hearth.clustering.v1.RefitRequest.reason": MAX_REASON_CHARS,
    "hearth.feedback.v1.SetFlagRequest.reason": 500,
    "hearth.feedback.v1.ActivateCalibratorRequest.reason": 500,
    "hearth.privacy.v1.RequestDeletionRequest.request_id": MAX_REQUEST_ID_CHARS,
    "hearth.privacy.v1.RequestDataKeyRotationsRequest.request_id": MAX_REQUEST_ID_CHARS,
    "hearth.clustering.v1.GetHouseholdRequest.page_token": 512,
    "hearth.attribution.v1.AttributeRequest.sequences": 700,
}
# Fields that are ids (services/common/ids.py: 1-128 characters, checked with ``check_id``
# where they are used): over MAX_ID_CHARS they are refused here with the id rule's own
# words (``ID_RULE``). Until session 33 this check gave them the text ceiling (256) and its
# "must be at most 256 characters, got N", so an id of 129-256 characters and one longer
# got two answers.
#
# Which fields are ids is read from the descriptors (``is_id_field``), by the shape of the
# field's name: a string field named ``id``, ``*_id`` or ``*_ids`` is an id unless NOT_IDS
# says why not; ID_NAMED_OTHERWISE and ID_MAP_KEYS add the ids not named like one. A new
# proto field ``household_id`` is an id the day it is added. Until session 34 the ids were
# a list of names, and a field missing from it was checked as text — the three request
# ``job_id`` fields were (128 and the text rule's words, where Erase's check_id and the
# gateway's path answer the id rule). tests/contract/test_id_fields_contract.py walks every
# message of the protos: each id-shaped field is an id or excused here, each table names
# fields that exist, and this check refuses every id over 128 characters with the id rule.
ID_SUFFIXES = ("_id", "_ids")
_PRINCIPAL = "a principal's id, which may hold '@' (ids.check_principal_id); audit bounds it at 1,024"
_TRACE = "a trace id as the caller's tracing makes it; audit bounds it at 1,024"
_IDEMPOTENCY = "an idempotency key the caller chooses (any text of its length), not an id Hearth gives"
_KEK = "a key-encryption key's configured name (HEARTH_KEKS: no '=' or ','), not an id of the mesh"
NOT_IDS: dict[str, str] = {
    "hearth.common.v1.Principal.id": _PRINCIPAL,
    "hearth.privacy.v1.QueryAuditRequest.principal_id": _PRINCIPAL,
    "hearth.privacy.v1.AuditRecord.trace_id": _TRACE,
    "hearth.privacy.v1.QueryAuditRequest.trace_id": _TRACE,
    "hearth.privacy.v1.AuditRecord.record_id": _IDEMPOTENCY + " (an audit record's writer)",
    "hearth.privacy.v1.RequestDeletionRequest.request_id": _IDEMPOTENCY + "; 200 characters",
    "hearth.privacy.v1.RequestDataKeyRotationsRequest.request_id": _IDEMPOTENCY + "; 200 characters",
    "hearth.clustering.v1.AssignSessionsRequest.batch_id": "the caller's token for a batch, only echoed back",
    "hearth.clustering.v1.AssignSessionsResponse.batch_id": "the caller's token for a batch, only echoed back",
    "hearth.privacy.v1.RotateKeysRequest.new_active_kek_id": _KEK,
    "hearth.privacy.v1.RotateKeysResponse.active_kek_id": _KEK,
    "hearth.privacy.v1.SignedTreeHead.key_id": "the audit log's signing key's id (docs/privacy.md), not an id of the mesh",
}
ID_NAMED_OTHERWISE = frozenset({"model_variant", "calibration_group"})   # ids by their values, in any message
ID_MAP_KEYS = frozenset({"hearth.feedback.v1.Prediction.ProbabilitiesEntry.key"})   # the persons of a prediction
# Multi-line text: tab, LF and CR allowed.
MULTILINE_FIELDS = frozenset({
    "hearth.feedback.v1.SetFlagRequest.reason",
    "hearth.feedback.v1.ActivateCalibratorRequest.reason",
    "hearth.privacy.v1.AuditRecord.DetailsEntry.value",
    "hearth.privacy.v1.AuditRecord.details_json",
    "hearth.privacy.v1.VerifyReceiptRequest.receipt_json",
})


def refused_character(value: str, *, multiline: bool = False) -> int:
    """Index of the first refused character of ``value``, or -1."""
    found = (_REFUSED_IN_MULTILINE if multiline else _REFUSED).search(value)
    return -1 if found is None else found.start()


def _refusal(value: str, at: int) -> str:
    char = value[at]
    return f"must not contain control characters (U+{ord(char):04X} at character {at})"


def check_text(value: object, field: str, *, max_chars: int = MAX_TEXT_CHARS, required: bool = False,
               multiline: bool = False) -> str:
    """``value`` if it is text under the one rule (above), else InvalidArgument naming
    ``field``. ``required``: the empty string is refused too."""
    if not isinstance(value, str):
        raise InvalidArgument("must be a string", field)
    if required and not value:
        raise InvalidArgument("must not be empty", field)
    if len(value) > max_chars:
        raise InvalidArgument(f"must be at most {max_chars} characters, got {len(value)}", field)
    at = refused_character(value, multiline=multiline)
    if at >= 0:
        raise InvalidArgument(_refusal(value, at), field)
    return value


_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def check_text_fields(message: Message, prefix: str = "") -> None:
    """Every text field of ``message`` (nested messages, repeated fields and maps
    included) under the one rule; InvalidArgument naming the first offending field by
    its path (``events[3].device_id``, ``records[0].details[k]``, a map key:
    ``predictions[0].probabilities``)."""
    _walk(message, _plan(message.DESCRIPTOR), prefix)


# What to visit in a message type, worked out once per type: walking the descriptors per
# request (``ListFields``, ``GetOptions``, ``full_name``) cost ~70 us an event, ten times
# the event's own parsing.
_SCALAR, _SCALARS, _ONE, _MANY, _MAP = range(5)
_PLANS: dict[str, tuple] = {}


def _plan(descriptor) -> tuple:
    plan = _PLANS.get(descriptor.full_name)
    if plan is not None:
        return plan
    _PLANS[descriptor.full_name] = ()   # a recursive type: its own fields are planned below
    steps = []
    for field in descriptor.fields:
        if field.type == _STRING:
            steps.append((_SCALARS if field.is_repeated else _SCALAR, field.name, _rule(field)))
        elif field.type == _MESSAGE:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
                steps.append((_MAP, field.name, (
                    _rule(key) if key.type == _STRING else None,
                    _rule(value) if value.type == _STRING else None,
                    _plan(value.message_type) if value.type == _MESSAGE else None)))
            else:
                inner = _plan(entry)
                if inner:   # a message with no text in it (a timestamp) is not visited
                    steps.append((_MANY if field.is_repeated else _ONE, field.name, inner))
    plan = _PLANS[descriptor.full_name] = tuple(steps)
    return plan


def is_id_field(field: FieldDescriptor) -> bool:
    """Whether a protobuf field holds ids (above: the name's shape, NOT_IDS,
    ID_NAMED_OTHERWISE, ID_MAP_KEYS)."""
    if field.full_name in ID_MAP_KEYS:
        return True
    if field.type != _STRING:
        return False
    if field.name in ID_NAMED_OTHERWISE:
        return True
    return (field.name == "id" or field.name.endswith(ID_SUFFIXES)) and field.full_name not in NOT_IDS


def _rule(field: FieldDescriptor) -> tuple[int, bool, bool]:
    """(ceiling, multi-line, an id: over the ceiling the id rule's words)."""
    if is_id_field(field):
        return MAX_ID_CHARS, False, True
    return MAX_CHARS_BY_FIELD.get(field.full_name, MAX_TEXT_CHARS), field.full_name in MULTILINE_FIELDS, False


def _walk(message: Message, plan: tuple, prefix: str) -> None:
    for kind, name, rule in plan:
        if kind == _SCALAR:
            value = getattr(message, name)
            if value:
                _check_value(value, rule, prefix + name)
        elif kind == _SCALARS:
            values = getattr(message, name)
            if values:
                limit, multiline, _ = rule
                pattern = _REFUSED_IN_MULTILINE if multiline else _REFUSED
                values = list(values)
                # One search over the column: the usual case (all clean) in two C calls.
                if max(map(len, values)) > limit or pattern.search("".join(values)):
                    for i, value in enumerate(values):
                        _check_value(value, rule, f"{prefix}{name}[{i}]")
        elif kind == _ONE:
            if rule and message.HasField(name):
                _walk(getattr(message, name), rule, f"{prefix}{name}.")
        elif kind == _MANY:
            items = getattr(message, name)
            if rule and items:
                _walk_many(list(items), rule, f"{prefix}{name}")
        else:
            mapping = getattr(message, name)
            key_rule, value_rule, value_plan = rule
            for key, value in mapping.items():
                if key_rule is not None:
                    _check_value(key, key_rule, prefix + name)   # a bad key is not repeated in the path
                if value_rule is not None:
                    _check_value(value, value_rule, f"{prefix}{name}[{key}]")
                elif value_plan:
                    _walk(value, value_plan, f"{prefix}{name}[{key}].")


def _walk_many(items: list, plan: tuple, path: str) -> None:
    """The items of a repeated message field, a column at a time: one join and one search
    per text field of a 10,000-event batch (a walk item by item cost ~20 us an event, 14
    times its parsing); the items are walked one by one only to name a refused value."""
    for kind, name, rule in plan:
        if kind == _SCALAR or kind == _SCALARS:
            column = ([getattr(item, name) for item in items] if kind == _SCALAR
                      else [value for item in items for value in getattr(item, name)])
            limit, multiline, _ = rule
            pattern = _REFUSED_IN_MULTILINE if multiline else _REFUSED
            if not column or (max(map(len, column)) <= limit and pattern.search("".join(column)) is None):
                continue
            for i, item in enumerate(items):
                _walk(item, ((kind, name, rule),), f"{path}[{i}].")
        else:
            for i, item in enumerate(items):
                _walk(item, ((kind, name, rule),), f"{path}[{i}].")


def _check_value(value: str, rule: tuple[int, bool, bool], path: str) -> None:
    limit, multiline, is_id = rule
    # The common case (short, clean) in two C-level calls.
    if len(value) <= limit and (_REFUSED_IN_MULTILINE if multiline else _REFUSED).search(value) is None:
        return
    if is_id:
        raise InvalidArgument(ID_RULE, path)
    check_text(value, path, max_chars=limit, multiline=multiline)


def max_chars_of(field: FieldDescriptor) -> int:
    return _rule(field)[0]


def invalid_utf8_field(descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first text field of a serialised ``descriptor`` message whose bytes
    are not UTF-8, or None (the message is malformed another way, or is fine). protobuf
    refuses the whole message without saying which field; this names it, so a request
    with bad UTF-8 is refused like any other bad text (``server._tolerant``)."""
    seen: dict[int, int] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen.get(number, 0)
                seen[number] = index + 1
                path = prefix + field.name
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    found = invalid_utf8_field(field.message_type, chunk, "")
                    if found == "value":
                        key = _map_key(chunk)
                        return path if key is None else f"{path}[{key}]"
                    if found is not None:
                        return path   # a key that is not text: the map is named
                elif field.is_repeated:
                    path = f"{path}[{index}]"
                if field.type == _STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == _MESSAGE and not field.message_type.GetOptions().map_entry:
                    found = invalid_utf8_field(field.message_type, chunk, path + ".")
                    if found is not None:
                        return found
            else:
                return None   # groups: nothing Hearth's protos use
    except IndexError:
        return None
    return None


def _map_key(entry: bytes) -> str | None:
    """The text key (field 1) of a serialised map entry, or None."""
    pos = 0
    while pos < len(entry):
        tag, pos = _varint(entry, pos)
        if tag != (1 << 3 | 2):
            return None
        size, pos = _varint(entry, pos)
        try:
            key = entry[pos:pos + size].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return key if refused_character(key) < 0 else None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
