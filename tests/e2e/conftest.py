"""The mesh as real processes (four services + gateway) on free ports, with spans
collected in a JSON-lines file the tests read."""

from __future__ import annotations

import pytest

from services.testing.mesh import running_mesh


# Package scope: only tests/e2e can use it (its conftest), and it stops once their last test
# is done instead of idling through the rest of the run (an idle mesh polls its peers' health
# every 0.5 s: ~0.055 cores; session 24, docs/benchmarks.md).
@pytest.fixture(scope="package")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh")
    spans = base / "spans.jsonl"
    with running_mesh(base, {"e2e-admin": "admin"}, timeout_s=120,
                      extra_env={"HEARTH_TRACE_EXPORT": f"jsonl:{spans}"}) as m:
        m.spans_path = spans
        yield m
