"""The mesh as real processes (four services + gateway) on free ports, with spans
collected in a JSON-lines file the tests read."""

from __future__ import annotations

import pytest

from services.testing.mesh import Mesh, write_api_key


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh")
    spans = base / "spans.jsonl"
    m = Mesh.on_free_ports(base / "var", log_dir=base / "logs",
                           extra_env={"HEARTH_TRACE_EXPORT": f"jsonl:{spans}"})
    m.data_dir.mkdir(parents=True)
    m.api_key = write_api_key(m.data_dir / "gateway-keys.json", "e2e-admin", "admin")
    m.spans_path = spans
    m.start()
    try:
        m.wait_healthy(120)
        yield m
    finally:
        m.stop()
