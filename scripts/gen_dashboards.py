"""Generate the five Grafana dashboards of the report as code (grafana-foundation-sdk).

    .venv/bin/python scripts/gen_dashboards.py            # write deploy/helm/hearth/dashboards/*.json
    .venv/bin/python scripts/gen_dashboards.py --check    # exit 1 when a file is stale

The JSON files are committed (the chart ships them as provisioning ConfigMaps and a
cluster has no Python to run this); tests/deploy/test_dashboards.py fails when they differ
from what this script generates, and tests/e2e/test_dashboards_live.py evaluates every
panel's query against a real Prometheus scraping the mesh.

Every query uses only the metrics the processes export (docs/deploy.md, "Metrics the
alerts expect") and the `$__rate_interval` Grafana variable; the datasource is the
`${datasource}` variable, so the dashboards work with whatever Prometheus is provisioned.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphTresholdsStyleMode, LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

OUT = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "hearth" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RI = "$__rate_interval"

# Interactive gateway routes (the latency alerts' selection; batch routes are separate).
INTERACTIVE = 'route!~"/v1/attribution|/v1/household/\\\\{account_id\\\\}/export|/v1/audit/export|/health|/metrics|/openapi.json|/docs.*|/redoc|unmatched"'
SERVER_FAULTS = 'code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"'


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""


def _query(q: Q, ref: str) -> Dataquery:
    return Dataquery().expr(q.expr).legend_format(q.legend or "__auto").ref_id(ref).datasource(DATASOURCE)


def _thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


def series(title: str, unit: str, *queries: Q, lines: tuple[tuple[float, str], ...] = (),
           description: str = "", width: int = 12) -> Timeseries:
    """A time series panel; ``lines``: thresholds drawn as dashed lines (alert levels)."""
    panel = (Timeseries().title(title).unit(unit).datasource(DATASOURCE).height(8).span(width)
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.TABLE)
                     .placement(LegendPlacement.BOTTOM).show_legend(True)))
    if description:
        panel = panel.description(description)
    if lines:
        panel = (panel.thresholds(_thresholds((None, "transparent"), *lines))
                 .thresholds_style(GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.DASHED)))
    for i, q in enumerate(queries):
        panel = panel.with_target(_query(q, chr(ord("A") + i)))
    return panel


def stat(title: str, unit: str, q: Q, *steps: tuple[float | None, str], description: str = "",
         width: int = 6) -> Stat:
    panel = Stat().title(title).unit(unit).datasource(DATASOURCE).height(4).span(width).with_target(_query(q, "A"))
    if steps:
        panel = panel.thresholds(_thresholds(*steps))
    if description:
        panel = panel.description(description)
    return panel


def _dashboard(uid: str, title: str, description: str) -> Dashboard:
    return (Dashboard(title).uid(uid).description(description).tags(["hearth", "generated"])
            .refresh("30s").time("now-6h", "now").timezone("utc").editable()
            .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus")))


def _quantile(q: float, selector: str, by: str) -> str:
    return (f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate(hearth_http_request_duration_seconds_bucket{{{selector}}}[{RI}])))")


def latency() -> Dashboard:
    return (_dashboard("hearth-latency", "Hearth / Latency",
                       "Gateway and RPC latency against the report's thresholds (p95 90 ms warning, "
                       "p99 110 ms critical, 150 ms rollback).")
            .with_row(Row("Gateway (interactive routes)"))
            .with_panel(series("p99 per route", "s", Q(_quantile(0.99, INTERACTIVE, "route"), "{{route}}"),
                               lines=((0.11, "orange"), (0.15, "red")),
                               description="Alert HearthLatencyP99High above 110 ms for 5 m; rollback at 150 ms."))
            .with_panel(series("p95 per route", "s", Q(_quantile(0.95, INTERACTIVE, "route"), "{{route}}"),
                               lines=((0.09, "orange"),)))
            .with_panel(series("p50 / p95 / p99 overall", "s",
                               Q(_quantile(0.5, INTERACTIVE, "namespace"), "p50"),
                               Q(_quantile(0.95, INTERACTIVE, "namespace"), "p95"),
                               Q(_quantile(0.99, INTERACTIVE, "namespace"), "p99"),
                               lines=((0.09, "yellow"), (0.11, "orange"), (0.15, "red"))))
            .with_panel(series("5xx ratio", "percentunit",
                               Q('sum(rate(hearth_http_requests_total{status=~"5.."}[$__rate_interval])) '
                                 '/ sum(rate(hearth_http_requests_total[$__rate_interval]))', "5xx"),
                               lines=((0.001, "orange"), (0.005, "red"))))
            .with_panel(series("requests per second by route and status", "reqps",
                               Q(f"sum by (route, status) (rate(hearth_http_requests_total[{RI}]))",
                                 "{{route}} {{status}}"), width=24))
            .with_row(Row("Services (gRPC)"))
            .with_panel(series("RPC p99 by service and method", "s",
                               Q(f"histogram_quantile(0.99, sum by (service, method, le) "
                                 f"(rate(hearth_rpc_duration_seconds_bucket[{RI}])))", "{{service}}/{{method}}"),
                               lines=((0.11, "orange"),)))
            .with_panel(series("RPC server-error ratio", "percentunit",
                               Q(f"sum by (service, method) (rate(hearth_rpc_errors_total{{{SERVER_FAULTS}}}[{RI}])) "
                                 f"/ sum by (service, method) (rate(hearth_rpc_requests_total[{RI}]))",
                                 "{{service}}/{{method}}"), lines=((0.001, "orange"),)))
            .with_panel(series("RPCs per second by code", "reqps",
                               Q(f"sum by (service, code) (rate(hearth_rpc_requests_total[{RI}]))",
                                 "{{service}} {{code}}"), width=24)))


def accuracy() -> Dashboard:
    return (_dashboard("hearth-accuracy", "Hearth / Accuracy and calibration",
                       "Accuracy per model variant from feedback, Brier and ECE, feedback rate and "
                       "retraining triggers.")
            .with_row(Row("Now"))
            .with_panel(stat("lowest variant accuracy", "percentunit", Q("min(hearth_variant_accuracy)"),
                             (None, "red"), (0.65, "orange"), (0.70, "green")))
            .with_panel(stat("Brier (all)", "none", Q('max(hearth_calibration_brier{group="all"})'),
                             (None, "green"), (0.15, "orange")))
            .with_panel(stat("ECE (all, calibrated)", "none", Q('max(hearth_calibration_ece{group="calibrated:all"})'),
                             (None, "green"), (0.05, "orange")))
            .with_panel(stat("feedback rate", "percentunit", Q("max(hearth_feedback_rate)"),
                             (None, "orange"), (0.02, "green")))
            .with_row(Row("Over time"))
            .with_panel(series("accuracy per variant", "percentunit",
                               Q("max by (variant) (hearth_variant_accuracy)", "{{variant}}"),
                               lines=((0.65, "red"), (0.70, "orange"))))
            .with_panel(series("Brier per group", "none",
                               Q('max by (group) (hearth_calibration_brier{group=~"all|variant=.+"})', "{{group}}"),
                               lines=((0.15, "orange"),)))
            .with_panel(series("ECE after recalibration, per variant", "none",
                               Q('max by (group) (hearth_calibration_ece{group=~"calibrated:variant=.+"})', "{{group}}"),
                               lines=((0.05, "orange"),)))
            .with_panel(series("ECE raw vs calibrated (all)", "none",
                               Q('max by (group) (hearth_calibration_ece{group=~"all|calibrated:all"})', "{{group}}")))
            .with_panel(series("feedback per second by kind", "ops",
                               Q(f"sum by (kind) (rate(hearth_feedback_total[{RI}]))", "{{kind}}")))
            .with_panel(series("retraining triggers (per hour)", "none",
                               Q("sum by (kind) (increase(hearth_retrain_triggers_total[1h]))", "{{kind}}"))))


def attribution() -> Dashboard:
    svc = 'service="attribution"'
    return (_dashboard("hearth-attribution", "Hearth / Attribution",
                       "Touchpoints and conversions recorded, attribution runs, their latency and errors.")
            .with_panel(series("calls per second by method", "reqps",
                               Q(f"sum by (method) (rate(hearth_rpc_requests_total{{{svc}}}[{RI}]))", "{{method}}")))
            .with_panel(series("errors per second by method and code", "reqps",
                               Q(f"sum by (method, code) (rate(hearth_rpc_errors_total{{{svc}}}[{RI}]))",
                                 "{{method}} {{code}}")))
            .with_panel(series("Attribute p50 / p99", "s",
                               Q(f'histogram_quantile(0.5, sum by (le) (rate(hearth_rpc_duration_seconds_bucket'
                                 f'{{{svc},method="Attribute"}}[{RI}])))', "p50"),
                               Q(f'histogram_quantile(0.99, sum by (le) (rate(hearth_rpc_duration_seconds_bucket'
                                 f'{{{svc},method="Attribute"}}[{RI}])))', "p99"),
                               lines=((5, "orange"),)))
            .with_panel(series("recording p99 (touchpoints, conversions)", "s",
                               Q(f'histogram_quantile(0.99, sum by (method, le) (rate(hearth_rpc_duration_seconds_bucket'
                                 f'{{{svc},method=~"RecordTouchpoints|RecordConversions"}}[{RI}])))', "{{method}}"),
                               lines=((0.11, "orange"),)))
            .with_panel(series("POST /v1/attribution through the gateway", "s",
                               Q(_quantile(0.99, 'route="/v1/attribution"', "route"), "p99"),
                               Q(_quantile(0.5, 'route="/v1/attribution"', "route"), "p50")))
            .with_panel(series("gateway attribution routes per second by status", "reqps",
                               Q(f'sum by (route, status) (rate(hearth_http_requests_total'
                                 f'{{route=~"/v1/attribution|/v1/touchpoints|/v1/conversions"}}[{RI}]))',
                                 "{{route}} {{status}}")))
            .with_panel(series("GetPersonDevices refused or failed per hour, by reason", "none",
                               Q("sum by (reason) (increase(hearth_person_devices_fallbacks_total[1h]))",
                                 "{{reason}}"),
                               description="unimplemented: an older clustering (a rolling upgrade), the erasure "
                                           "fenced without the person's own devices; permission_denied and "
                                           "unauthenticated (retried): a misconfiguration, "
                                           "HearthPersonDevicesRefused; unavailable: an outage, retried "
                                           "(docs/operations.md, 'Upgrading to session 33').")))


def drift() -> Dashboard:
    return (_dashboard("hearth-drift", "Hearth / Drift",
                       "Drift alarms by type, the refits they trigger and how many changed nothing "
                       "(the false-positive proxy of HearthDriftFalsePositivesHigh).")
            .with_panel(series("drift events per hour by type", "none",
                               Q("sum by (drift_type) (increase(hearth_drift_events_total[1h]))", "{{drift_type}}")))
            .with_panel(series("drift refits per hour by outcome", "none",
                               Q("sum by (outcome) (increase(hearth_drift_refits_total[1h]))", "{{outcome}}")))
            .with_panel(series("drift false-positive rate (refits that changed no person, 1 d)", "percentunit",
                               Q('sum(increase(hearth_drift_refits_total{outcome="persons_unchanged"}[1d])) '
                                 '/ sum(increase(hearth_drift_refits_total[1d]))', "false positives"),
                               lines=((0.05, "red"),)))
            .with_panel(series("model refits per hour by reason", "none",
                               Q("sum by (reason) (increase(hearth_model_refits_total[1h]))", "{{reason}}")))
            .with_panel(series("GMM numerical fallbacks per hour", "none",
                               Q("sum(increase(hearth_gmm_fallbacks_total[1h]))", "fallbacks")))
            .with_panel(series("household drift/disagreement triggers per hour", "none",
                               Q('sum by (kind) (increase(hearth_retrain_triggers_total{kind=~"drift|disagreement"}[1h]))',
                                 "{{kind}}"), lines=((100, "orange"),))))


def infrastructure() -> Dashboard:
    return (_dashboard("hearth-infrastructure", "Hearth / Infrastructure",
                       "Targets up, memory against limits, CPU, audit delivery, deletion jobs, outboxes "
                       "and security counters.")
            .with_row(Row("Processes"))
            .with_panel(series("targets up by component", "none",
                               Q("sum by (hearth_component) (up)", "{{hearth_component}}")))
            .with_panel(series("memory / limit", "percentunit",
                               Q("process_resident_memory_bytes / hearth_memory_limit_bytes", "{{instance}}"),
                               lines=((0.85, "red"),),
                               description="Empty for a process without a cgroup memory limit."))
            .with_panel(series("resident memory", "bytes",
                               Q("sum by (hearth_component) (process_resident_memory_bytes)", "{{hearth_component}}")))
            .with_panel(series("CPU (cores)", "none",
                               Q(f"sum by (hearth_component) (rate(process_cpu_seconds_total[{RI}]))",
                                 "{{hearth_component}}")))
            .with_panel(series("data directory / limit, data volume used", "percentunit",
                               Q("hearth_data_dir_used_bytes / hearth_data_dir_limit_bytes", "dir {{instance}}"),
                               Q("1 - hearth_data_volume_free_bytes / hearth_data_volume_size_bytes",
                                 "volume {{instance}}"),
                               lines=((0.8, "orange"), (0.95, "red")),
                               description="HEARTH_DATA_DIR against its size limit (the kubelet evicts the pod "
                                           "at 100 %: HearthDataDirNearLimit at 80 %) and the share of its "
                                           "filesystem in use (HearthDataVolumeLow at 95 %)."))
            .with_panel(series("dependencies reachable (1: the last health check passed)", "none",
                               Q("min by (hearth_component, dependency) (hearth_dependency_up)",
                                 "{{hearth_component}} {{dependency}}"),
                               description="Per component, its worst replica. `database writes` at 0 for 1 m: "
                                           "every write answers 503 (HearthDatabaseWritesRefused); `redis` or "
                                           "`database` at 0 for 5 m (HearthDependencyDown): with Redis gone "
                                           "requests are still answered but every deletion waits for it."))
            .with_row(Row("Privacy and delivery"))
            .with_panel(series("audit records sent / dropped per second", "ops",
                               Q(f"sum by (component) (rate(hearth_audit_records_sent_total[{RI}]))", "sent {{component}}"),
                               Q(f"sum by (component, reason) (rate(hearth_audit_records_dropped_total[{RI}]))",
                                 "dropped {{component}} {{reason}}")))
            .with_panel(series("audit records waiting: in memory, in the disk outbox", "none",
                               Q("sum by (component) (hearth_audit_records_held)", "in memory {{component}}"),
                               Q("sum by (outbox) (hearth_audit_outbox_depth)", "{{outbox}}"),
                               description="Both are normally 0. In memory: neither the audit log nor the disk "
                                           "outbox took them (a full disk; HearthAuditRecordsHeld after 5 m). "
                                           "In the outbox: privacy did not acknowledge them "
                                           "(HearthAuditOutboxBacklog after 10 m); an emptyDir dies with its pod."))
            .with_panel(series("deletion jobs finished per hour", "none",
                               Q("sum by (state) (increase(hearth_deletion_jobs_finished_total[1h]))", "{{state}}")))
            .with_panel(series("oldest open deletion job, by what it waits for", "s",
                               Q("max by (waiting) (hearth_deletion_oldest_open_job_age_seconds)", "{{waiting}}"),
                               lines=((3600, "orange"),)))
            .with_panel(series("off-site deletion ledger: since the last export", "s",
                               Q("time() - max(hearth_ledger_last_export_timestamp_seconds)", "age"),
                               lines=((900, "orange"),),
                               description="Seconds since the last successful `hearth ledger export` (the chart's "
                                           "ledger CronJob, every 5 min), as privacy's database notes it; past "
                                           "900 s for 5 min HearthLedgerExportStale fires. No line: no export "
                                           "recorded yet (SQLite, make run, backups off)."))
            .with_panel(series("privacy replicas' clock minus the database server's", "s",
                               Q("max by (instance) (hearth_deletion_clock_offset_seconds)", "{{instance}}"),
                               Q("sum(hearth_deletion_clock_disagrees)", "replicas taking no deletion jobs"),
                               description="PostgreSQL only (NaN on SQLite). A replica off by more than a quarter "
                                           "of HEARTH_DELETION_LEASE_S, and off the other replicas, takes no "
                                           "deletion job (HearthDeletionClockDisagrees); every replica off by the "
                                           "same amount: the server's clock is wrong."))
            .with_panel(series("household data key rotations per hour", "none",
                               Q("sum by (outcome) (increase(hearth_dek_rotations_total[1h]))", "{{outcome}}"),
                               Q("sum by (service) (increase(hearth_dek_rotation_purges_incomplete_total[1h]))",
                                 "completed, purge incomplete in {{service}}"),
                               description="`failed` in every 20 m for 30 m: HearthDataKeyRotationFailing (the "
                                           "older key still opens the household's data). A purge incomplete is "
                                           "no alert: every rotation on a default PostgreSQL (wal_recycle on)."))
            .with_panel(series("retention purges held back per day", "none",
                               Q("sum(increase(hearth_retention_purges_held_back_total[1d]))", "held back"),
                               description="A purge that would have erased more than a day past the last one "
                                           "erases one day only (HearthRetentionPurgeHeldBack on any): privacy's "
                                           "clock stepped forward, or it was stopped for over a day."))
            .with_panel(series("prediction outbox (clustering -> feedback)", "none",
                               Q("sum by (instance) (hearth_prediction_outbox_depth)", "{{instance}}"),
                               Q(f"sum(rate(hearth_prediction_forward_failures_total[{RI}]))", "failures/s"),
                               lines=((1000, "orange"),)))
            .with_panel(series("erasure fence: age of each clustering replica's last read", "s",
                               Q("max by (instance) (hearth_erasure_fence_read_age_seconds)", "age {{instance}}"),
                               Q("max by (instance) (hearth_erasure_fence_seconds)", "fence {{instance}}"),
                               description="A replica trusts a model version it holds only while its last read "
                                           "of the erasure fence began within HEARTH_ERASURE_FENCE_S (3 s): "
                                           "an age above the fence means it asks the database for every "
                                           "answer and sees no erasure (HearthErasureFenceStale after 2 min). "
                                           "+Inf before its first read; 0 and 0 on a replica that does not "
                                           "watch the fence. docs/security.md, \"Other replicas after an "
                                           "erasure\"."))
            .with_panel(series("erasure fence: erasures seen, failed reads, models dropped per second", "ops",
                               Q(f"sum by (instance) (rate(hearth_erasure_fence_moves_seen_total[{RI}]))",
                                 "erasures seen {{instance}}"),
                               Q(f"sum by (instance) (rate(hearth_erasure_fence_read_failures_total[{RI}]))",
                                 "failed reads {{instance}}"),
                               Q(f"sum by (instance) (rate(hearth_erasure_fence_models_dropped_total[{RI}]))",
                                 "models dropped {{instance}}"),
                               description="Each replica sees every erasure anywhere (a move of the fence); "
                                           "failed reads are the database unreachable from it; models dropped "
                                           "are decoded models whose version an erasure replaced."))
            .with_row(Row("Security"))
            .with_panel(series("authentication failures, denials, rate limits per second", "ops",
                               Q(f"sum by (component) (rate(hearth_auth_failures_total[{RI}]))", "auth {{component}}"),
                               Q(f"sum by (component) (rate(hearth_access_denied_total[{RI}]))", "denied {{component}}"),
                               Q(f"sum by (component) (rate(hearth_rate_limited_total[{RI}]))", "limited {{component}}")))
            .with_panel(series("security alerts per hour", "none",
                               Q("sum by (kind, threshold) (increase(hearth_security_alerts_total[1h]))",
                                 "{{kind}} ({{threshold}})"))))


DASHBOARDS = {"latency": latency, "accuracy": accuracy, "attribution": attribution, "drift": drift,
              "infrastructure": infrastructure}


def render() -> dict[str, str]:
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {f"{name}.json": encoder.encode(build().build()) + "\n" for name, build in DASHBOARDS.items()}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of a generated dashboard's JSON."""
    return [(p["title"], t["expr"]) for p in dashboard.get("panels", []) for t in p.get("targets", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed file differs")
    args = parser.parse_args(argv)
    files = render()
    stale = [name for name, text in files.items()
             if not (OUT / name).exists() or (OUT / name).read_text(encoding="utf-8") != text]
    if args.check:
        for name in stale:
            print(f"stale: {OUT / name} (run scripts/gen_dashboards.py)", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(json.dumps({"written": sorted(files), "dir": str(OUT)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
