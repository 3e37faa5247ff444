"""The gateway serves HTTPS when a certificate is configured (a gateway replica of the
security mesh, with a certificate from scripts/certs.py)."""

from __future__ import annotations

import importlib.util
import ssl
import time
from pathlib import Path

import httpx
import pytest

from services.common.identity import Role
from tests.helpers.waiting import SLOW_MACHINE_S

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def https_gateway(security_mesh, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("hearth_certs_script", ROOT / "scripts" / "certs.py")
    certs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(certs)
    directory = tmp_path_factory.mktemp("https-certs")
    certs.generate(directory, ("gateway",))
    mesh = security_mesh.mesh
    env = {**mesh.env(), "HEARTH_HTTPS_CERT": str(directory / "gateway.pem"),
           "HEARTH_HTTPS_KEY": str(directory / "gateway-key.pem")}
    port = mesh.spawn_on_free_ports("gateway-https", "gateway", env, ("HEARTH_GATEWAY_PORT",))["HEARTH_GATEWAY_PORT"]
    url = f"https://localhost:{port}"
    deadline = time.monotonic() + SLOW_MACHINE_S
    try:
        while True:
            try:
                httpx.get(url + "/health", verify=ssl.create_default_context(cafile=directory / "ca.pem"), timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or mesh.processes["gateway-https"].poll() is not None:
                    raise
                time.sleep(0.2)
        yield url, directory / "ca.pem", port
    finally:
        mesh.stop_process("gateway-https")


def test_https_with_a_verified_certificate(https_gateway, security_mesh):
    url, ca, _ = https_gateway
    response = httpx.get(url + "/v1/household/sec-https-nobody", verify=ssl.create_default_context(cafile=ca),
                         timeout=10,
                         headers={"X-API-Key": security_mesh.role_keys[Role.ADMIN]})
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "account_id"


def test_plain_http_is_not_served_on_the_https_port(https_gateway):
    _, _, port = https_gateway
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{port}/health", timeout=5)


def test_a_client_that_does_not_trust_the_ca_refuses_the_connection(https_gateway):
    url, _, _ = https_gateway
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", verify=ssl.create_default_context(), timeout=5)
