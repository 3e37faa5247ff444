"""The alerting rules (deploy/prometheus/hearth.rules.yaml): promtool syntax check and
unit tests, and cross-checks with the code and the docs: every metric an alert reads is
one the code exports, every alert has a firing test and a runbook section in
docs/deploy.md."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.deploy.conftest import ROOT, RULE_TESTS, RULES

DOCS = ROOT / "docs" / "deploy.md"
# Series Prometheus itself creates, and prometheus_client's process collector's.
BUILTIN = {"up", "process_resident_memory_bytes"}
DEFAULT_RUNBOOK_BASE = "https://hearth.example.com/docs/deploy.md"


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _exported_metric_names() -> set[str]:
    """Names registered with prometheus_client anywhere in services/ and gateway/,
    with the series suffixes Prometheus derives from them."""
    names: set[str] = set()
    pattern = re.compile(r"\b(Counter|Histogram|Gauge|Summary)\(\s*\"([a-z_:][a-z0-9_:]*)\"")
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("gateway/**/*.py")]:
        for kind, name in pattern.findall(path.read_text(encoding="utf-8")):
            names.add(name)
            if kind == "Histogram":
                base = name.removesuffix("_total")
                names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return names


def test_promtool_accepts_the_rules(promtool):
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_pass(promtool):
    done = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_exercised_by_a_promtool_test_that_fires_it():
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for block in tested for case in block.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts - fired == set(), "alerts without a firing test case"


def test_alerts_read_only_metrics_that_exist():
    exported = _exported_metric_names()
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    # Sanity of the scan itself: the RED metrics of telemetry.py must be found.
    assert {"hearth_rpc_requests_total", "hearth_rpc_duration_seconds_bucket"} <= exported
    for rule in _rules():
        # Drop matchers, strings and label lists (by/on/... (labels)): what is left are
        # metric names, functions, keywords and numbers.
        expr = re.sub(r'\{[^}]*\}|"[^"]*"', "", rule["expr"])
        expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
        identifiers = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
        metrics = {i for i in identifiers if i.startswith("hearth") or i in BUILTIN}
        unknown = metrics - exported - recorded - BUILTIN
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {sorted(unknown)}"


def test_every_alert_has_severity_and_a_runbook_section_in_the_docs():
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith("#")}
    for rule in _rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        runbook = rule["annotations"]["runbook_url"]
        assert runbook == f"{DEFAULT_RUNBOOK_BASE}#{rule['alert'].lower()}", rule["alert"]
        assert runbook.split("#", 1)[1] in anchors, f"docs/deploy.md has no section {rule['alert']}"


def test_every_alert_the_operator_docs_name_is_a_rule():
    """The reverse of the runbook check: an operator who reads "alert HearthX" finds a rule
    HearthX (checked by hand against the rules in session 34; nothing held it until then)."""
    from tests.helpers.operator_docs import doc_lines
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    named = [(f"{doc}:{number}", name) for doc, number, line in doc_lines()
             for name in re.findall(r"\bHearth[A-Z][A-Za-z0-9]+\b", line)]
    assert len({name for _, name in named} & alerts) >= 10
    assert [f"{where} {name}" for where, name in named if name not in alerts] == []


def test_the_report_thresholds_are_the_ones_alerted_on():
    """The numbers of the original report, read back from the expressions."""
    by_name = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    expected = {  # alert: (threshold in the expression, for, severity)
        "HearthLatencyP99High": ("> 0.11", "5m", "critical"),
        "HearthLatencyP95High": ("> 0.09", "5m", "warning"),
        "HearthGatewayHighErrorRate": ("> 0.001", "2m", "critical"),
        "HearthRpcHighErrorRate": ("> 0.001", "2m", "critical"),
        "HearthMemoryHigh": ("> 0.85", "5m", "critical"),
        "HearthAccuracyLow": ("< 0.70", "30m", "critical"),
        "HearthDriftFalsePositivesHigh": ("> 0.05", "15m", "critical"),
        "HearthBrierHigh": ("> 0.15", "1h", "warning"),
        "HearthFeedbackRateLow": ("< 0.02", "6h", "warning"),
        "HearthRollbackLatency": ("> 0.15", "5m", "critical"),
        "HearthRollbackErrors": ("> 0.005", "2m", "critical"),
        "HearthRollbackAccuracy": ("< 0.65", "10m", "critical"),
    }
    for name, (threshold, duration, severity) in expected.items():
        rule = by_name[name]
        assert threshold in rule["expr"], name
        assert rule["for"] == duration and rule["labels"]["severity"] == severity, name
    assert {r["labels"].get("action") for n, r in by_name.items() if n.startswith("HearthRollback")} == {"rollback"}


def test_counters_created_on_first_use_have_a_first_increment_case():
    """Every alert on increase() of a labelled counter also fires for a series born above
    0 (the `unless ... offset` arm), and the promtool tests include such a series."""
    tested = RULE_TESTS.read_text()
    for rule in _rules():
        if "alert" not in rule or "increase(" not in rule["expr"] or "[1h]" in rule["expr"] \
                or "[1d]" in rule["expr"]:
            continue   # rate-like alerts over long windows (storms, ratios) need many increments
        assert "unless" in rule["expr"] and "offset" in rule["expr"], rule["alert"]
        metric = re.search(r"increase\((hearth_[a-z_]+)", rule["expr"]).group(1)
        assert re.search(rf"series: '{metric}\{{[^']*'\n\s+values: '_ ", tested), \
            f"no first-increment (born at 1) test series for {metric}"
