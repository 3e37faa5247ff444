"""What `helm install` prints (templates/NOTES.txt) agrees with the chart: until session 21
it listed `/metrics` among the gateway Service's paths, while the chart serves the
gateway's metrics only on their own port and Service (docs/deploy.md, "Security")."""

from __future__ import annotations

from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, by_kind, run_helm


def test_the_notes_name_the_gateway_metrics_service_not_its_public_port(helm, helm_env, render):
    out = run_helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = out.split("\nNOTES:\n", 1)[1]
    services = by_kind(render(), "Service")
    public, metrics = services[f"{RELEASE}-gateway"], services[f"{RELEASE}-gateway-metrics"]
    line = next(line for line in notes.splitlines() if line.strip().startswith("gateway "))
    assert f"http {RELEASE}-gateway:{public['spec']['ports'][0]['port']} " in line
    assert "/metrics" not in line.split(" metrics ")[0]
    assert line.endswith(f"metrics {RELEASE}-gateway-metrics:{metrics['spec']['ports'][0]['port']}")
