"""Who can learn a prediction id (docs/security.md, "Attacker's review (session 21)",
"Left", the feedback 412). ``POST /v1/feedback`` answers 412 naming the account when the prediction's
household withdrew processing consent, to data scientists too, who do not hold
``read_consent``. Item 9 closed the same question for attribution, where an analyst
chose the account ids: there the 412 was an oracle. Here it would be one only if a data
scientist (or an analyst) could get the prediction ids of accounts of their choosing:
prediction ids are 128 random bits, answered only by ``AssignSession(s)``
(``assign_sessions``: the service role and admin), and no answer a role without it can
get — a route or an RPC, through the gateway or the Envoy edge — carries one. These
tests hold that true: a new field that hands prediction ids to those roles fails here
and must bring the consent rule of item 9 with it."""

from __future__ import annotations

import importlib

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.clustering.app import prediction_ids
from services.common.identity import Role
from services.common.permissions import ROLE_PERMISSIONS, ROUTES, RPCS, Permission

# Roles that do not hold read_consent yet may record feedback or read households.
WITHOUT_READ_CONSENT = [role for role in Role if Permission.READ_CONSENT not in ROLE_PERMISSIONS[role]
                        and Permission.ASSIGN_SESSIONS not in ROLE_PERMISSIONS[role]]
NAMES = {"prediction_id", "prediction_ids"}


def _fields_named(descriptor, seen=None) -> set[str]:
    """Field paths of a protobuf message (recursively) whose name is in NAMES."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    found = set()
    for field in descriptor.fields:
        if field.name in NAMES:
            found.add(f"{descriptor.full_name}.{field.name}")
        if field.message_type is not None:
            found |= _fields_named(field.message_type, seen)
    return found


def _output(service: str, method: str):
    package = service.rsplit(".", 1)[0]             # hearth.clustering.v1
    module = importlib.import_module(f"{package}.{package.split('.')[1]}_pb2")
    return module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[method].output_type


def _rpcs_of(role: Role) -> list[tuple[str, str]]:
    return [(service, method) for service, methods in RPCS.items() for method, permission in methods.items()
            if permission in ROLE_PERMISSIONS[role] and service != "hearth.common.v1.DataHolder"]


def _properties_named(schema: dict, node, seen=None) -> set[str]:
    """Property names in NAMES anywhere in an OpenAPI schema node ($refs followed)."""
    seen = set() if seen is None else seen
    found = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref and ref not in seen:
            seen.add(ref)
            found |= _properties_named(schema, schema["components"]["schemas"][ref.rsplit("/", 1)[1]], seen)
        for name, value in node.get("properties", {}).items():
            if name in NAMES:
                found.add(name)
            found |= _properties_named(schema, value, seen)
        for key, value in node.items():
            if key != "properties":
                found |= _properties_named(schema, value, seen)
    elif isinstance(node, list):
        for value in node:
            found |= _properties_named(schema, value, seen)
    return found


def _success_schemas(schema: dict, route: str) -> list:
    method, path = route.split(" ", 1)
    responses = schema["paths"][path][method.lower()]["responses"]
    return [r.get("content", {}).get("application/json", {}).get("schema", {})
            for status, r in responses.items() if status.startswith("2")]


def test_the_roles_without_read_consent_that_record_feedback_are_data_scientists():
    assert Role.DATA_SCIENTIST in WITHOUT_READ_CONSENT
    assert Permission.RECORD_FEEDBACK in ROLE_PERMISSIONS[Role.DATA_SCIENTIST]


def test_no_rpc_those_roles_may_call_answers_a_prediction_id():
    # The walker finds them where they are: AssignSession(s)' answers.
    assert _fields_named(_output("hearth.clustering.v1.ClusteringService", "AssignSession"))
    assert _fields_named(_output("hearth.clustering.v1.ClusteringService", "AssignSessions"))
    for role in WITHOUT_READ_CONSENT:
        for service, method in _rpcs_of(role):
            assert not _fields_named(_output(service, method)), (role, service, method)


def test_no_route_those_roles_may_call_answers_a_prediction_id():
    schema = create_app(GatewaySettings()).openapi()
    assert any(_properties_named(schema, s) for s in _success_schemas(schema, "POST /v1/assign"))
    for role in WITHOUT_READ_CONSENT:
        for route, permission in ROUTES.items():
            if permission in ROLE_PERMISSIONS[role]:
                for success in _success_schemas(schema, route):
                    assert not _properties_named(schema, success), (role, route)


def test_prediction_ids_are_128_random_bits():
    ids = prediction_ids(1000)
    assert len(set(ids)) == 1000
    assert all(len(i) == 3 + 32 and i.startswith("pr-") and int(i[3:], 16) >= 0 for i in ids)
    assert len({i[3] for i in ids}) == 16   # every hex digit in the first place: not a counter
