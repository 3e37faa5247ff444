"""Every Prometheus metric the code defines is named in the operator docs, with its true
labels, and the docs name no metric the code does not define. Before session 18, six
metrics (Redis cache errors, GMM fallbacks, drift events, the prediction outbox's
deliveries and failures, audit records spooled to disk) were in no doc."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

from prometheus_client import REGISTRY
from tests.helpers.operator_docs import ROOT, doc_lines

# Where every metric is defined (imported for their module-level collectors).
METRIC_MODULES = ["services.common.telemetry", "services.common.health_report", "services.common.storage.cache",
                  "services.common.identity", "services.common.audit", "services.clustering.modeling",
                  "services.clustering.prediction_log", "services.clustering.app", "services.attribution.resolver", "services.feedback.instruments",
                  "services.privacy.audit.app", "services.privacy.deletion.app", "services.privacy.keys.rotation", "gateway.admission", "gateway.app",
                  "gateway.transport"]
# `hearth_*` words in the docs that are not metrics: a scrape relabel, a JWT claim, and the
# services' PostgreSQL schemas (`hearth_<service>`; `hearth_clustering.sessions` is a table).
NOT_METRICS = {"hearth_component", "hearth_role", "hearth_clustering", "hearth_attribution", "hearth_privacy",
               "hearth_feedback"}
_DEFINITION = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"(hearth_[a-z0-9_]+)\"")
_MENTION = re.compile(r"\b(hearth_[a-z0-9_]*[a-z0-9])(\{[^}]*\})?")


def _metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposition name (counters with `_total`) -> (type, label names)."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    found = {}
    for collector in list(REGISTRY._collector_to_names):
        name = getattr(collector, "_name", "")
        if name.startswith("hearth_"):
            kind = collector._type
            found[name + ("_total" if kind == "counter" else "")] = (kind, tuple(collector._labelnames))
    return found


def test_every_metric_defined_in_the_code_is_imported_here():
    defined = set()
    for base in ("services", "gateway"):
        for path in (ROOT / base).rglob("*.py"):
            if "testing" not in path.parts:
                defined |= set(_DEFINITION.findall(path.read_text(encoding="utf-8")))
    assert defined and defined <= set(_metrics()), sorted(defined - set(_metrics()))


def test_every_metric_is_documented_with_its_labels():
    metrics = _metrics()
    named, wrong = set(), []
    for doc, number, line in doc_lines():
        where = f"{doc}:{number}"
        for name, labels in _MENTION.findall(line):
            if name in NOT_METRICS:
                continue
            if name not in metrics:
                wrong.append(f"{where} {name}: no such metric")
                continue
            named.add(name)
            if labels:
                keys = [part.split("=")[0].strip() for part in labels.strip("{}").split(",")]
                selector = "=" in labels
                if (selector and not set(keys) <= set(metrics[name][1])) or \
                        (not selector and sorted(keys) != sorted(metrics[name][1])):
                    wrong.append(f"{where} {name}{labels}: labels are {metrics[name][1]}")
    assert wrong == []
    assert sorted(set(metrics) - named) == [], "metrics no operator doc names"


def test_the_alert_metrics_table_states_type_and_labels():
    metrics = _metrics()
    section = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split("### Metrics the alerts expect", 1)[1]
    rows = 0
    for line in section.split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 4 or "hearth_" not in cells[0]:
            continue
        labels = sorted(x.strip() for x in re.sub(r"\([^)]*\)", "", cells[2]).split(",") if x.strip())
        for name in re.findall(r"`(hearth_[a-z0-9_]+)`", cells[0]):
            rows += 1
            assert cells[1] == metrics[name][0], f"{name}: type {cells[1]}"
            assert labels == sorted(metrics[name][1]), f"{name}: labels {labels}"
    assert rows >= 15


def _deploy_tables() -> tuple[set[str], set[str]]:
    """The metrics of docs/deploy.md's two tables: those the alerts read, the others."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("### Metrics the alerts expect", 1)[1].split("\n## ", 1)[0]
    alerts, others = section.split("### The other metrics", 1)

    def names(table: str) -> set[str]:
        return {name for line in table.splitlines() if line.startswith("| `")
                for name in re.findall(r"`(hearth_[a-z0-9_]+)`", line.split("|")[1])}
    return names(alerts), names(others)


def _read_by(path) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", name)
            for name in re.findall(r"\b(hearth_[a-z0-9_]+)", path.read_text(encoding="utf-8"))} - NOT_METRICS


def test_every_metric_is_in_one_deploy_table_and_the_alerts_read_those_of_the_first():
    # Session 28 (docs28): 25 metrics were in neither table, and two rows of "the alerts
    # expect" (hearth_model_refits_total, hearth_audit_send_failures_total) no alert read.
    metrics = set(_metrics())
    alerts, others = _deploy_tables()
    assert sorted(alerts & others) == []
    assert sorted(metrics - alerts - others) == [], "in no table of docs/deploy.md"
    assert sorted((alerts | others) - metrics) == []
    rules = _read_by(ROOT / "deploy" / "prometheus" / "hearth.rules.yaml")
    assert sorted(rules - alerts) == [], "read by an alert, not in the alerts' table"
    assert sorted(alerts - rules) == [], "in the alerts' table, read by no alert"
    for dashboard in (ROOT / "deploy" / "helm" / "hearth" / "dashboards").glob("*.json"):
        assert sorted(_read_by(dashboard) - metrics) == [], f"{dashboard.name} reads a metric the code lacks"


def _label_values_at_start() -> dict[str, list[str]]:
    """Each one-label `hearth_*` collector's label values as the modules create them on
    import, read in a process of its own: in this one, other tests' code (a clustering
    refit's drift event, an erasure's kind) adds values at run time, and which of them ran
    first depends on the order `make test`'s queue hands the files out (suite28 saw
    `drift_type="sudden"` here only in the queue's order)."""
    code = ("import importlib, json\n"
            "from prometheus_client import REGISTRY\n"
            f"for m in {METRIC_MODULES!r}: importlib.import_module(m)\n"
            "print(json.dumps({c._name + ('_total' if c._type == 'counter' else ''): sorted(v for (v,) in c._metrics)\n"
            "                  for c in list(REGISTRY._collector_to_names)\n"
            "                  if getattr(c, '_name', '').startswith('hearth_') and len(c._labelnames) == 1}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_the_label_values_created_at_start_are_the_ones_the_tables_list():
    # A counter whose row says its label values are "created at 0" (so its first increment
    # alerts) lists those values, in backticks: the values the code creates at import
    # (a row ending its list with "…" is open).
    children = _label_values_at_start()
    section = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split("### Metrics the alerts expect", 1)[1]
    checked = 0
    for line in section.split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or "created at 0" not in cells[3] or "…" in cells[2]:
            continue
        for name in [n for n in re.findall(r"`(hearth_[a-z0-9_]+)`", cells[0]) if n in children]:
            documented = sorted(set(re.findall(r"`([a-z_]+)`", cells[2])))
            assert children.get(name) == documented, f"{name}: the code creates {children.get(name)}, docs/deploy.md lists {documented}"
            checked += 1
    assert checked >= 8
