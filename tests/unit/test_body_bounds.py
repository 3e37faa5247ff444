"""gateway/body_bounds.py: an array over its bound is refused from the parsed JSON, with the
error pydantic gives for it, before any of its items is validated (docs/security.md,
"Attacker's review (session 21)", item 10)."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from gateway.body_bounds import BodyBounds
from gateway.lean import FastLane, LeanRoute, fast_lane_routes
from gateway.models import EventsIn
from gateway.routes.attribution import AttributionIn, ConversionsIn, TouchpointsIn
from gateway.routes.feedback import FlagsIn


def _pydantic_error(model, body: dict, loc: tuple) -> dict:
    with pytest.raises(ValidationError) as raised:
        model.model_validate(body)
    found = [e for e in raised.value.errors(include_url=False) if e["loc"] == loc]
    assert found, raised.value.errors(include_url=False)
    return found[0]


# (model, body with one array over its bound, that array's loc)
OVER = [
    (EventsIn, {"events": [{}] * 10_001}, ("events",)),
    (EventsIn, {"events": [{"genres": ["a"]}, {"genres": ["a"] * 17}]}, ("events", 1, "genres")),
    (TouchpointsIn, {"touchpoints": [1] * 10_001}, ("touchpoints",)),
    (ConversionsIn, {"conversions": [{}] * 10_001}, ("conversions",)),
    (AttributionIn, {"account_ids": ["a"] * 1001}, ("account_ids",)),
    (AttributionIn, {"personas": [{}] * 10_001}, ("personas",)),
    (AttributionIn, {"sequences": ["a"] * 51}, ("sequences",)),
    (AttributionIn, {"position_weights": [0.25] * 4}, ("position_weights",)),
    (FlagsIn, {"traffic": {f"v{i}": 1.0 for i in range(17)}}, ("traffic",)),
]


@pytest.mark.parametrize("model,body,loc", OVER)
def test_the_refusal_is_the_error_pydantic_gives(model, body, loc):
    mine = BodyBounds.of(model).first_over(body)
    assert mine is not None
    theirs = _pydantic_error(model, body, loc)
    assert mine["loc"] == ("body", *loc)
    assert {k: mine[k] for k in ("type", "msg", "ctx", "input")} == \
        {k: theirs[k] for k in ("type", "msg", "ctx", "input")}


@pytest.mark.parametrize("model,body", [
    (EventsIn, {"events": [{}] * 10_000}),
    (EventsIn, {"events": [{"genres": ["a"] * 16}] * 3}),
    (EventsIn, {"events": "not a list"}),
    (EventsIn, [1, 2]),
    (AttributionIn, {"account_ids": ["a"] * 1000, "position_weights": [1, 2, 3], "personas": [None, 3]}),
    (FlagsIn, {"traffic": {f"v{i}": 1.0 for i in range(16)}}),
])
def test_arrays_within_their_bounds_are_left_to_the_model(model, body):
    assert BodyBounds.of(model).first_over(body) is None


def test_a_model_without_bounded_arrays_has_no_bounds():
    class Flat(BaseModel):
        name: str = Field(max_length=3)
    assert BodyBounds.of(Flat) is None


validated: list[int] = []


def _seen(value: int) -> int:
    validated.append(value)
    return value


class In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=8)
    values: list[Annotated[int, AfterValidator(_seen)]] = Field(default_factory=list, max_length=3)


async def caller(request: Request) -> str:
    who = request.headers.get("x-caller")
    if who is None:
        from fastapi import HTTPException
        raise HTTPException(401, "no caller")
    return who


def _app(route_class: type[APIRoute], fast_lane: bool) -> FastAPI:
    app = FastAPI()
    api = APIRouter(route_class=route_class)

    @api.post("/sum")
    async def total(body: In, who: str = Depends(caller)):
        return {"total": sum(body.values), "who": who}

    app.include_router(api)
    if fast_lane:
        app.add_middleware(FastLane, routes=fast_lane_routes(api.routes), exception_handlers=app.exception_handlers,
                           max_body_bytes=64 * 1024, overrides_provider=app)
    return app


@pytest.mark.parametrize("caller_header", [{"x-caller": "alice"}, {}])
@pytest.mark.parametrize("body", [b'{"name": "a", "values": [1, 2, 3, 4]}',
                                  b'{"name": "a", "values": [' + b"1," * 40_000 + b"1]}",   # over the fast lane's size
                                  b'{"values": [' + b"1," * 500 + b'1], "name": "a"}'])
def test_an_over_bound_array_gets_fastapis_answer_without_its_items_validated(body, caller_header):
    """The answer of FastAPI's own route (a dependency's refusal first, then the 422 naming
    the array), from the lean handler, the fast lane and the generic path alike — and not
    one item validated by the lean routes (FastAPI's own route validated max_length + 1)."""
    answers = []
    for route_class, fast_lane in ((APIRoute, False), (LeanRoute, False), (LeanRoute, True)):
        validated.clear()
        with TestClient(_app(route_class, fast_lane)) as client:
            r = client.post("/sum", content=body, headers={"content-type": "application/json", **caller_header})
        answers.append((r.status_code, r.json()))
        if route_class is LeanRoute:
            assert validated == [], (fast_lane, len(validated))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == (422 if caller_header else 401)


def test_the_generic_path_refuses_an_over_bound_array_before_fastapi_parses_it(monkeypatch):
    """A chunked body (no Content-Length) skips the fast lane; with a dependency override
    the lean handler hands every request to the generic path, which checks the bounds
    itself."""
    app = _app(LeanRoute, True)
    app.dependency_overrides[caller] = lambda: "override"
    validated.clear()

    def chunks():
        yield b'{"name": "a", "values": ['
        yield b"1," * 100 + b"1]}"

    with TestClient(app) as client:
        r = client.post("/sum", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "too_long", r.text
    assert validated == []
