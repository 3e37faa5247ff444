"""Every text input of every gateway route — body fields at any depth, map keys, query and
path parameters — enumerated from the OpenAPI document the gateway serves, so a route or
field added tomorrow is in this test: each has a length bound and a pattern, and the
pattern refuses what the one text rule refuses (services/common/text.py). Until session 30
six had no pattern (the household cursor, attribution's sequences and persona, both
feedback reasons, the audit resource prefix): a NUL in them went on to a service, which
answered INTERNAL on PostgreSQL for the ones it did not check itself."""

from __future__ import annotations

import re

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common import text

REFUSED = ("ok\x00", "ok\x01", "ok\x1b", "ok\x7f", "ok\x85", "ok\u2028", "ok\u202e", "ok\u2066")


def _text_inputs() -> list[tuple[str, dict]]:
    spec = create_app(GatewaySettings()).openapi()
    schemas = spec.get("components", {}).get("schemas", {})
    found: list[tuple[str, dict]] = []

    def walk(schema: dict, where: str, seen: tuple = ()) -> None:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                walk(schemas[name], where, seen + (name,))
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for part in schema.get(key, []):
                walk(part, where, seen)
        kind = schema.get("type")
        if kind == "string" and "enum" not in schema and "format" not in schema and "const" not in schema:
            found.append((where, schema))
        elif kind == "object":
            for name, part in schema.get("properties", {}).items():
                walk(part, f"{where}.{name}", seen)
            for key, suffix in (("additionalProperties", "{}"), ("propertyNames", "{key}")):
                if isinstance(schema.get(key), dict):
                    walk(schema[key], where + suffix, seen)
        elif kind == "array":
            walk(schema.get("items", {}), where + "[]", seen)

    for route, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                walk(parameter["schema"], f"{method.upper()} {route} {parameter['in']}:{parameter['name']}")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                walk(body, f"{method.upper()} {route} body")
    return found


def test_the_walk_reaches_the_routes_text_inputs():
    names = {where for where, _ in _text_inputs()}
    assert {"POST /v1/events body.events[].genres[]", "GET /v1/household/{account_id} query:cursor",
            "PUT /v1/experiment body.reason", "GET /v1/audit query:resource_prefix"} <= names, sorted(names)
    assert len(names) >= 50


def test_every_text_input_of_every_route_is_bounded_and_refuses_control_characters():
    wrong = []
    for where, schema in _text_inputs():
        pattern = schema.get("pattern")
        if schema.get("maxLength") is None:
            wrong.append(f"{where}: no maxLength")
        if pattern is None:
            wrong.append(f"{where}: no pattern")
            continue
        accepted = [value for value in REFUSED if re.search(pattern, value)]
        if accepted:
            wrong.append(f"{where}: pattern {pattern!r} accepts {accepted!r}")
    assert wrong == [], "\n".join(wrong)


def test_the_gateways_text_patterns_are_the_rules():
    assert re.fullmatch(text.TEXT_PATTERN, "caf\u00e9 \U0001f600 a\u00a0b")
    assert not re.search(text.TEXT_PATTERN, "a\nb")
    assert re.search(text.MULTILINE_TEXT_PATTERN, "why:\n\tbecause")
