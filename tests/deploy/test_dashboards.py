"""Dashboards as code: the committed JSON is what scripts/gen_dashboards.py generates,
and the chart ships exactly those files as Grafana provisioning ConfigMaps. (Their
queries are evaluated against a live Prometheus in tests/e2e/test_dashboards_live.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.deploy.conftest import PRODUCTION_VALUES, ROOT, by_kind

DASHBOARDS = ROOT / "deploy" / "helm" / "hearth" / "dashboards"
NAMES = {"latency", "accuracy", "attribution", "drift", "infrastructure"}


def test_committed_dashboards_are_the_generated_ones():
    done = subprocess.run([sys.executable, "scripts/gen_dashboards.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_five_dashboards_have_unique_uids_and_queries_on_every_panel():
    boards = {p.stem: json.loads(p.read_text()) for p in DASHBOARDS.glob("*.json")}
    assert set(boards) == NAMES
    assert len({b["uid"] for b in boards.values()}) == 5
    for name, board in boards.items():
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert len(panels) >= 5, name
        for panel in panels:
            assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${datasource}"
                                            for t in panel["targets"]), (name, panel["title"])


def test_chart_ships_the_dashboards_as_sidecar_configmaps(render):
    assert not [o for o in render() if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
    objects = render(values_files=(PRODUCTION_VALUES,))
    shipped = {name: cm for name, cm in by_kind(objects, "ConfigMap").items() if "-dashboard-" in name}
    assert len(shipped) == 5
    for cm in shipped.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Hearth"}
        ((key, text),) = cm["data"].items()
        name = key.removeprefix("hearth-").removesuffix(".json")
        assert json.loads(text) == json.loads((DASHBOARDS / f"{name}.json").read_text())


def test_the_erasure_fence_metrics_are_on_the_infrastructure_dashboard():
    """Session 30's five fence metrics had an alert (HearthErasureFenceStale) and no panel:
    an operator paged for it found nothing to look at. Each is read by a panel."""
    from services.clustering.app import (ERASURE_FENCE_BOUND, ERASURE_FENCE_READ_AGE, ERASURE_FENCE_READ_FAILURES,
                                         ERASURES_SEEN, SUPERSEDED_MODELS_DROPPED)
    from tests.e2e.test_dashboards_live import metric_names

    exported = {m.name for metric in (ERASURE_FENCE_READ_AGE, ERASURE_FENCE_BOUND, ERASURE_FENCE_READ_FAILURES,
                                      ERASURES_SEEN, SUPERSEDED_MODELS_DROPPED) for m in metric.collect()}
    board = json.loads((DASHBOARDS / "infrastructure.json").read_text())
    read = {name for p in board["panels"] for t in p.get("targets", []) for name in metric_names(t["expr"])}
    missing = {name for name in exported
               if name not in read and f"{name}_total" not in read}
    assert len(exported) == 5 and not missing, sorted(missing)
