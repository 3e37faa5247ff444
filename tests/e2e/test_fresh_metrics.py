"""What a freshly started process tells Prometheus before it has seen any traffic: an
alert must not fire on a deployment that is merely new (docs/deploy.md, "Alerts")."""

from __future__ import annotations

import math
import os

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
        mesh.start_listening(["feedback"])   # alone: its peers' absence only degrades its health
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


def test_a_service_reports_its_data_directory_and_volume(tmp_path):
    """hearth_data_dir_used_bytes / _limit_bytes and hearth_data_volume_free_bytes /
    _size_bytes (HearthDataDirNearLimit, HearthDataVolumeLow) describe the process's own
    HEARTH_DATA_DIR: its files (the SQLite database at least, not the whole disk), the
    limit the chart hands over as a Kubernetes quantity, and the filesystem it is on
    (tests keep tmp_path on /dev/shm, a filesystem other than the checkout's)."""
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs",
                              extra_env={"HEARTH_DATA_DIR_SIZE_LIMIT": "64Mi"})
    mesh.data_dir.mkdir(parents=True)
    try:
        mesh.start_listening(["feedback"])
        url = f"http://127.0.0.1:{mesh.metrics_ports['feedback']}/metrics"

        def scraped():
            assert mesh.processes["feedback"].poll() is None, mesh.log_tail("feedback")
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                return None
            return text if (_sample(text, "hearth_data_dir_used_bytes") or 0) > 0 else None

        text = wait_for(scraped, what="feedback's /metrics with its data directory")
        database = mesh.data_dir / "feedback.db"
        used = _sample(text, "hearth_data_dir_used_bytes")
        assert database.stat().st_blocks * 512 <= used < 256 * 2**20, used
        assert _sample(text, "hearth_data_dir_limit_bytes") == 64 * 2**20
        volume = os.statvfs(mesh.data_dir)
        assert _sample(text, "hearth_data_volume_size_bytes") == volume.f_blocks * volume.f_frsize
        assert 0 < _sample(text, "hearth_data_volume_free_bytes") <= volume.f_blocks * volume.f_frsize
    finally:
        mesh.stop()
