"""A real Prometheus (Debian's `prometheus` binary) for tests: scrapes a mesh's processes
every second with the alert rules of deploy/prometheus/hearth.rules.yaml loaded, on a port
of its own, stopped with the context (tests/e2e/test_dashboards_live.py,
tests/e2e/test_bulk_readers_e2e.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from services.common.child_process import stop_group
from services.testing.mesh import ROOT
from services.testing.ports import serve_on_free_port
from tests.helpers.waiting import wait_serving

RULES = ROOT / "deploy" / "prometheus" / "hearth.rules.yaml"


@contextmanager
def running_prometheus(base: Path, targets: Sequence[tuple[str, str]], namespace: str = "e2e") -> Iterator[str]:
    """Prometheus scraping ``targets`` ((host:port, hearth_component) pairs) every second,
    evaluating the rules every second; yields its URL once ready."""
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary (Debian package `prometheus`) is required"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "hearth", "honor_labels": True,
            "static_configs": [{"targets": [t], "labels": {"hearth_component": c, "namespace": namespace}}
                               for t, c in targets]}],
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = base / "logs" / "prometheus.log"
    prom = None
    try:
        prom, port = serve_on_free_port(
            lambda port: [binary, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            log, "prometheus")
        url = f"http://127.0.0.1:{port}"
        wait_serving(prom, url + "/-/ready", log, "prometheus")
        yield url
    finally:
        if prom is not None:
            stop_group(prom, 10.0)


def firing(url: str, alertname: str) -> list[dict[str, str]]:
    """The labels of each firing instance of ``alertname`` (Prometheus's /api/v1/alerts)."""
    alerts = httpx.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a["labels"] for a in alerts if a["labels"].get("alertname") == alertname and a["state"] == "firing"]
