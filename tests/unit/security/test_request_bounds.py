"""Every integer a caller can send the gateway is bounded to what the protobuf field it
becomes can hold (int64). An unbounded one let 2**63 through validation and the protobuf
encoder's ValueError came back as a 500 (PUT /v1/calibrators/{variant}'s ``version`` and
GET /v1/audit's ``after_seq``, found in session 14 by fuzzing a running mesh with huge
integers, which the schemathesis fuzz rarely draws)."""

from __future__ import annotations

from gateway.app import create_app
from gateway.config import GatewaySettings

# The schema states bounds as JSON numbers, so 2**63 - 1 reads back as the float 2.0**63.
INT64_MAX, INT64_MIN = float(2**63 - 1), float(-2**63)


def _integers(schema: dict, components: dict, where: str):
    """(where, schema) of every integer in a request schema, through refs and unions."""
    if "$ref" in schema:
        yield from _integers(components[schema["$ref"].split("/")[-1]], components, where)
        return
    for key in ("anyOf", "allOf", "oneOf"):
        for option in schema.get(key, []):
            yield from _integers(option, components, where)
    if schema.get("type") == "integer":
        yield where, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _integers(prop, components, f"{where}.{name}")
    if schema.get("type") == "array":
        yield from _integers(schema.get("items", {}), components, f"{where}[]")


def test_every_integer_a_caller_sends_fits_in_int64():
    spec = create_app(GatewaySettings()).openapi()
    components = spec["components"]["schemas"]
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                found += _integers(body, components, f"{method.upper()} {path} body")
            for parameter in operation.get("parameters", []):
                found += _integers(parameter.get("schema", {}), components,
                                   f"{method.upper()} {path} {parameter['name']}")
    assert len(found) >= 8                                   # the walk reaches them (limit, bins, seeds ...)
    unbounded = [where for where, schema in found
                 if schema.get("maximum", float("inf")) > INT64_MAX or schema.get("minimum", -float("inf")) < INT64_MIN]
    assert not unbounded, unbounded
