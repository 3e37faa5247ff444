"""What a freshly started process tells Prometheus before it has seen any traffic: an
alert must not fire on a deployment that is merely new (docs/deploy.md, "Alerts")."""

from __future__ import annotations

import math

import httpx

from services.testing.mesh import Mesh
from tests.helpers.waiting import wait_for


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_a_feedback_service_without_predictions_exports_an_unknown_feedback_rate(tmp_path):
    """hearth_feedback_rate is predictions with feedback / predictions: with none it is
    NaN, which HearthFeedbackRateLow (`< 0.02 for 6h`) never compares true against.
    Until session 20 it was 0, so every new or undriven deployment paged after 6 h."""
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    mesh.data_dir.mkdir(parents=True)
    try:
        mesh.start_service("feedback")   # alone: its peers' absence only degrades its health
        url = f"http://127.0.0.1:{mesh.metrics_ports['feedback']}/metrics"

        def scraped():
            assert mesh.processes["feedback"].poll() is None, mesh.log_tail("feedback")
            try:
                return httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                return None

        rate = _sample(wait_for(scraped, what="feedback's /metrics"), "hearth_feedback_rate")
        assert rate is not None and math.isnan(rate), rate   # the periodic refresh: tests/integration
    finally:
        mesh.stop()
