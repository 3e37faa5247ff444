"""Dashboards as code: the committed JSON is what scripts/gen_dashboards.py generates,
and the chart ships exactly those files as Grafana provisioning ConfigMaps. (Their
queries are evaluated against a live Prometheus in tests/e2e/test_dashboards_live.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from tests.deploy.conftest import CHART, PRODUCTION_VALUES, ROOT, RULES, by_kind

DASHBOARDS = ROOT / "deploy" / "helm" / "hearth" / "dashboards"
CHART_RULES = CHART / "files" / "hearth.rules.yaml"
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


def _family(metric: str) -> str:
    """A histogram's series (`_bucket`, `_count`, `_sum`) are one metric on a dashboard."""
    return re.sub(r"_(bucket|count|sum)$", "", metric)


def test_every_metric_an_alert_reads_is_on_some_dashboard():
    """Session 31 left nine metrics read by alert rules on no panel (hearth_dependency_up,
    hearth_audit_outbox_depth, hearth_audit_records_held, hearth_dek_rotations_total,
    hearth_retention_purges_held_back_total; a histogram's `_count`; three recorded series):
    an operator paged for one found nothing to look at. A recorded series counts through
    the metrics its recording rule reads (the Latency dashboard computes the same from
    the raw buckets). The chart's rules (files/hearth.rules.yaml) are read too."""
    from tests.e2e.test_dashboards_live import metric_names

    rules = [rule for path in (RULES, CHART_RULES) for group in yaml.safe_load(path.read_text())["groups"]
             for rule in group["rules"]]
    recorded = {rule["record"]: metric_names(rule["expr"]) for rule in rules if "record" in rule}

    def read(metric: str) -> set[str]:
        return set().union(*map(read, recorded[metric])) if metric in recorded else {_family(metric)}

    alerted = {name for rule in rules if "alert" in rule for metric in metric_names(rule["expr"])
               for name in read(metric)}
    shown = {_family(name) for board in DASHBOARDS.glob("*.json") for panel in json.loads(board.read_text())["panels"]
             for target in panel.get("targets", []) for name in metric_names(target["expr"])}
    assert len(alerted) >= 25 and {"up", "hearth_rpc_errors_total"} <= alerted
    assert sorted(alerted - shown) == [], "read by an alert rule, on no dashboard panel"


def test_every_panel_query_is_valid_promql(promtool, tmp_path):
    """promtool parses each panel's query (as a recording rule; `$__rate_interval` is a
    Grafana variable, given a value first). The e2e test evaluates them against a live
    Prometheus; this one needs no mesh."""
    exprs = [(f"{board.stem}: {panel['title']}", target["expr"].replace("$__rate_interval", "1m"))
             for board in sorted(DASHBOARDS.glob("*.json")) for panel in json.loads(board.read_text())["panels"]
             for target in panel.get("targets", [])]
    rules = tmp_path / "panels.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": [
        {"record": f"panel:query_{i}:expr", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}))
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout, done.stdout
