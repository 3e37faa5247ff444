"""Property-based fuzz of the whole HTTP API from its own /openapi.json (schemathesis +
hypothesis): as an authenticated admin, no generated request — valid (positive) or
schema-violating (negative) — may produce a 5xx, a status code the schema does not
declare, or a body that breaks the declared schema.

schemathesis's pytest plugin does not work with pytest 9, so the operations are listed
from the gateway's schema at collection (built in-process; no services needed) and each
is driven with ``operation.as_strategy()`` under bounded hypothesis settings."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common.identity import Role

EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}
# (path, method, mode): negative cases only where there is input to break.
CASES = sorted(
    (path, method.upper(), mode)
    for path, operations in create_app(GatewaySettings()).openapi()["paths"].items()
    for method, spec in operations.items()
    for mode in EXAMPLES
    if mode is GenerationMode.POSITIVE or spec.get("parameters") or spec.get("requestBody"))


@pytest.fixture(scope="module")
def live_schema(security_mesh):
    url = security_mesh.url + "/openapi.json"
    assert httpx.get(url, timeout=10).status_code == 200
    return schemathesis.openapi.from_url(url)


@pytest.mark.parametrize("path,method,mode", CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_api_fuzz(live_schema, security_mesh, path, method, mode):
    operation = live_schema[path][method]
    headers = {"X-API-Key": security_mesh.role_keys[Role.ADMIN]}

    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        case.call_and_validate(headers=headers, timeout=30,
                               checks=[not_a_server_error, response_schema_conformance,
                                       status_code_conformance])

    run()
