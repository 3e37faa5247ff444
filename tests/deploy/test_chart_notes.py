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


def test_the_notes_name_the_database_secrets_the_pods_reference(helm, helm_env, render):
    """Session 28: with a login per service the notes listed the shared Secret no pod
    references any more; without, they say what the shared login exposes."""
    from tests.deploy.conftest import PRODUCTION_VALUES

    out = run_helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "--values", str(PRODUCTION_VALUES))
    notes = out.split("\nNOTES:\n", 1)[1]
    for service in ("clustering", "attribution", "privacy", "feedback"):
        assert f"hearth-postgres-{service}  key dsn: {service}'s own PostgreSQL DSN" in notes
    assert "hearth-postgres  key" not in notes and "one database login for the four services" not in notes
    shared = run_helm(helm, helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert "hearth-postgres  key dsn: the PostgreSQL DSN every service shares" in shared
    assert "WARNING: one database login for the four services" in shared
