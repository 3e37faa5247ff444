"""The per-principal in-flight bound of costly routes (gateway/ratelimit.py
``InFlightLimits``, taken in gateway/app.py ``CredentialsBeforeBody``): past it a 429
``too_many_in_flight`` naming the limit, and the slot given back on every path — an
answer, an upstream error, a cancelled request, a client that disconnected."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from pydantic import ValidationError

from gateway import auth
from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.ratelimit import IN_FLIGHT_HELD, IN_FLIGHT_REFUSED, InFlightLimits, TooManyInFlight, in_flight_table
from gateway.transport import replaying_receive
from hearth.attribution.v1 import attribution_pb2 as apb
from services.common import client
from services.common.errors import DeadlineExceeded
from services.common.identity import Principal, Role

ROUTE = "POST /v1/attribution"
HELD_AT_ANSWER: list[float] = []   # slots of ROUTE held (all principals) as each answer completed
ALICE = Principal("alice", Role.ANALYST)


def test_a_principal_gets_at_most_its_limit_and_each_slot_back_once():
    limits = InFlightLimits({ROUTE: 2})
    first, second = limits.enter(ALICE, ROUTE), limits.enter(ALICE, ROUTE)
    with pytest.raises(TooManyInFlight) as refused:
        limits.enter(ALICE, ROUTE)
    assert "at most 2 requests to POST /v1/attribution in flight per caller" in refused.value.message
    assert limits.enter(Principal("bob", Role.ANALYST), ROUTE) is not None   # per principal
    assert limits.enter(ALICE, "GET /v1/calibration") is None                  # a route without a bound
    first()
    first()                                     # idempotent: a second call gives nothing back
    assert limits.held(ALICE, ROUTE) == 1
    third = limits.enter(ALICE, ROUTE)
    second()
    third()
    assert limits.held(ALICE, ROUTE) == 0 and (ALICE.id, ROUTE) not in limits._held


def test_the_setting_overrides_the_table_route_by_route_and_checks_routes():
    assert in_flight_table({})[ROUTE] == 2
    table = in_flight_table({ROUTE: 5, "GET /v1/audit/export": 0, "GET /v1/household/{account_id}": 8})
    assert table[ROUTE] == 5 and "GET /v1/audit/export" not in table
    assert table["GET /v1/household/{account_id}"] == 8
    for bad in ({"POST /v1/nowhere": 1}, {ROUTE: -1}, {ROUTE: True}, {ROUTE: "2"}):
        with pytest.raises(ValidationError):
            GatewaySettings(in_flight_limits=bad)


def test_a_cancelled_call_stops_the_served_work_like_a_passed_deadline():
    active = True
    token = client.set_serving_deadline(60.0, lambda: active)
    try:
        client.check_serving_deadline()
        active = False
        with pytest.raises(DeadlineExceeded, match="cancelled"):
            client.check_serving_deadline()
    finally:
        client.reset_serving_deadline(token)


# ---- through the gateway's ASGI app, the upstream call replaced by one the test controls


class Upstream:
    """``clients.call`` of the gateway: each call waits for ``release`` (or raises ``error``)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.error: Exception | None = None

    async def call(self, service, method, request, who, timeout_s=None):
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return apb.AttributeResponse()

    def unary_stream(self, service, method, request, who, timeout_s=None):
        """``clients.unary_stream``: a response stream whose first read waits the same way."""
        upstream = self

        class _Stream:
            async def read(self):
                return await upstream.call(service, method, request, who, timeout_s)

            def cancel(self):
                return True
        return _Stream()


@pytest.fixture
def gateway(tmp_path):
    keys = tmp_path / "keys.json"
    alice = auth.add_key(keys, "alice", "analyst")[1]
    bob = auth.add_key(keys, "bob", "analyst")[1]
    app = create_app(GatewaySettings(api_keys_file=keys, data_dir=tmp_path, access_log=False,
                                     in_flight_limits={ROUTE: 1}))
    upstream = Upstream()
    app.state.clients.call = upstream.call
    return app, upstream, alice, bob


async def _request(app, key: str, gone: asyncio.Event | None = None,
                   path: str = "/v1/attribution") -> tuple[int, dict, dict]:
    body = json.dumps({"method": "linear"}).encode() if path == "/v1/attribution" else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST" if body else "GET",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "scheme": "http", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
             "headers": [(b"x-api-key", key.encode())] + ([(b"content-type", b"application/json"),
                                                          (b"content-length", str(len(body)).encode())]
                                                         if body else [])}

    async def disconnect():   # after the body: only when the client goes away
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    receive = replaying_receive(body, False, disconnect)

    sent = []

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            HELD_AT_ANSWER.append(IN_FLIGHT_HELD.labels(ROUTE)._value.get())
        sent.append(message)

    async with asyncio.timeout(10):   # fail, never hang, when the bound is missing
        await app(scope, receive, send)
    if not sent:
        return 0, {}, {}
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]) or b"{}")


async def _until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_over_the_limit_is_a_429_naming_it_and_the_slot_comes_back_with_the_answer(gateway):
    app, upstream, alice, bob = gateway

    async def run():
        refused_before = IN_FLIGHT_REFUSED.labels(ROUTE)._value.get()
        first = asyncio.ensure_future(_request(app, alice))
        await _until(lambda: upstream.started == 1)
        status, headers, body = await _request(app, alice)
        assert status == 429 and headers["retry-after"] == "1"
        assert body["error"]["code"] == "too_many_in_flight"
        assert "at most 1 request to POST /v1/attribution in flight per caller" in body["error"]["message"]
        assert IN_FLIGHT_REFUSED.labels(ROUTE)._value.get() == refused_before + 1
        assert upstream.started == 1                     # refused before the service was called
        other = asyncio.ensure_future(_request(app, bob))  # another principal is not held up
        await _until(lambda: upstream.started == 2)
        upstream.release.set()
        assert (await first)[0] == 200 and (await other)[0] == 200
        held = IN_FLIGHT_HELD.labels(ROUTE)._value.get()
        HELD_AT_ANSWER.clear()
        assert (await _request(app, alice))[0] == 200     # the slot came back
        # ... and was free again before the answer reached the client: its next request on
        # a keep-alive connection may be handled while this one's task still unwinds.
        assert HELD_AT_ANSWER == [held]

    asyncio.run(run())


def test_an_upstream_error_gives_the_slot_back(gateway):
    app, upstream, alice, _ = gateway
    upstream.error = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                          grpc.aio.Metadata(), "deadline exceeded")
    upstream.release.set()

    async def run():
        assert (await _request(app, alice))[0] == 504
        assert (await _request(app, alice))[0] == 504    # not 429: the first one's slot is free

    asyncio.run(run())


def test_a_cancelled_or_timed_out_request_gives_the_slot_back(gateway):
    """The request's task cancelled (uvicorn's graceful-shutdown timeout, a timeout around
    the app): the slot is free again and the upstream call was cancelled with it."""
    app, upstream, alice, _ = gateway

    async def run():
        first = asyncio.ensure_future(_request(app, alice))
        await _until(lambda: upstream.started == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert upstream.cancelled == 1
        with pytest.raises(TimeoutError):   # a timeout around the request: cancelled the same way
            async with asyncio.timeout(0.2):
                await _request(app, alice)
        assert upstream.cancelled == 2
        upstream.release.set()
        assert (await _request(app, alice))[0] == 200

    asyncio.run(run())


def test_a_client_that_disconnects_has_its_request_cancelled_and_the_slot_back(gateway):
    app, upstream, alice, _ = gateway

    async def run():
        gone = asyncio.Event()
        first = asyncio.ensure_future(_request(app, alice, gone))
        await _until(lambda: upstream.started == 1)
        assert (await _request(app, alice))[0] == 429
        gone.set()                                    # the client closes its connection
        await asyncio.wait_for(first, 5)              # no answer to send: nobody reads it
        assert upstream.cancelled == 1                # the gRPC call was cancelled, not left to run
        upstream.release.set()
        assert (await _request(app, alice))[0] == 200

    asyncio.run(run())


def test_a_bounded_get_route_is_held_and_refused_the_same_way(tmp_path):
    """GET routes of the table (the household export here) take their slot in
    CredentialsBeforeBody too, from the headers."""
    keys = tmp_path / "keys.json"
    officer = auth.add_key(keys, "olga", "privacy_officer")[1]
    app = create_app(GatewaySettings(api_keys_file=keys, data_dir=tmp_path, access_log=False,
                                     in_flight_limits={"GET /v1/household/{account_id}/export": 1}))
    upstream = Upstream()
    upstream.error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                          "no such household")
    app.state.clients.unary_stream = upstream.unary_stream   # the export is streamed (session 26)
    path = "/v1/household/h1/export"

    async def run():
        first = asyncio.ensure_future(_request(app, officer, path=path))
        await _until(lambda: upstream.started == 1)
        status, _, body = await _request(app, officer, path=path)
        assert status == 429 and body["error"]["code"] == "too_many_in_flight"
        assert "GET /v1/household/{account_id}/export" in body["error"]["message"]
        assert (await _request(app, "hk_wrong", path=path))[0] == 401    # credentials first, as before
        upstream.release.set()
        assert (await first)[0] == 404 and (await _request(app, officer, path=path))[0] == 404

    asyncio.run(run())
