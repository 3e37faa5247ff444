"""The Envoy edge's authorizer is served on its own listener only (gateway/routes/edge.py
``ListenerSplit``): never on the public port, and its port serves nothing else. Through
real processes: tests/e2e/test_edge_authorizer.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.config import GatewaySettings

PUBLIC, AUTHORIZER = 8080, 8099
AUTHORIZE = "/v1/edge/authorize/hearth.clustering.v1.ClusteringService/GetHousehold"


def _statuses(settings: GatewaySettings, requests: list[tuple[int, str, str]]) -> list[int]:
    app = create_app(settings)

    async def go():
        out = []
        for port, method, path in requests:
            # The ASGI scope's "server" is the listening socket's address: here, the URL's.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url=f"http://127.0.0.1:{port}") as client:
                out.append((await client.request(method, path)).status_code)
        return out

    return asyncio.run(go())


def test_the_authorizer_answers_on_its_port_only():
    settings = GatewaySettings(gateway_port=PUBLIC, edge_authorizer_port=AUTHORIZER)
    statuses = _statuses(settings, [
        (AUTHORIZER, "POST", AUTHORIZE),        # served: no credentials, so 401
        (PUBLIC, "POST", AUTHORIZE),            # never on the public port
        (PUBLIC, "GET", AUTHORIZE),
        (PUBLIC, "GET", "/v1/household/acc-1"),  # the public routes are (401 without credentials)
        (AUTHORIZER, "GET", "/v1/household/acc-1"),
        (AUTHORIZER, "GET", "/openapi.json"),
    ])
    assert statuses == [401, 404, 404, 401, 404, 404]


def test_without_the_port_there_is_no_authorizer():
    assert _statuses(GatewaySettings(gateway_port=PUBLIC), [(PUBLIC, "POST", AUTHORIZE)]) == [404]


@pytest.mark.parametrize("port", [PUBLIC, 9100])
def test_the_authorizer_port_is_never_a_public_one(port):
    with pytest.raises(ValidationError, match="HEARTH_EDGE_AUTHORIZER_PORT"):
        GatewaySettings(gateway_port=PUBLIC, metrics_port=9100, edge_authorizer_port=port)
