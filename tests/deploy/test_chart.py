"""The Helm chart (deploy/helm/hearth): lint, render, validate against the Kubernetes
schemas, and check the rendered objects against what the processes actually need
(ports, env that the config classes accept, probes, shutdown timing, security)."""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml

from services.common.config import byte_quantity
from tests.deploy.conftest import (
    CHART,
    COMPONENTS,
    GRPC_SERVICES,
    LOCAL_SQLITE_VALUES,
    MIN_KUBE_VERSION,
    NAMESPACE,
    PRODUCTION_VALUES,
    RELEASE,
    ROOT,
    RULES,
    TARGET_KUBE_VERSION,
    HelmError,
    by_kind,
    component_name,
    run_helm,
)

CHART_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# Objects of these kinds come from CRDs (Prometheus Operator): no schema in
# kubernetes-validate, so their structure is checked by hand below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

SCENARIOS = {
    "default": dict(),
    "production": dict(values_files=(PRODUCTION_VALUES,)),
    "local-sqlite": dict(values_files=(LOCAL_SQLITE_VALUES,)),
    "client-side-balancing": dict(set_values=("mesh.clientSideBalancing=true", "redis.enabled=true",
                                              "serviceMonitor.enabled=true", "prometheusRule.enabled=true",
                                              "image.digest=sha256:" + "a" * 64)),
    "tls-ingress": dict(values_files=(PRODUCTION_VALUES,), set_values=(
        "tls.mesh.secretPrefix=hearth-mesh-tls", "tls.https.secretName=hearth-https",
        "ingress.enabled=true", "ingress.className=nginx", "ingress.hosts[0].host=hearth.example.com",
        "ingress.tls[0].secretName=hearth-public-tls", "ingress.tls[0].hosts[0]=hearth.example.com",
        r"networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\.io/metadata\.name=observability")),
}


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def effective_env(deployment: dict, objects: list[dict]) -> dict[str, object]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first,
    then env entries (which win). Plain values are strings; secret references are
    ("secret", name, key) tuples."""
    configmaps = by_kind(objects, "ConfigMap")
    result: dict[str, object] = {}
    c = container(deployment)
    for source in c.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom references missing ConfigMap {ref}"
        result.update(configmaps[ref]["data"])
    for item in c.get("env", []):
        if "value" in item:
            result[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            result[item["name"]] = ("secret", ref["name"], ref["key"])
    return result


def deployment_of(objects: list[dict], component: str) -> dict:
    return by_kind(objects, "Deployment")[component_name(component)]


# --- lint and render ---------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, PRODUCTION_VALUES, LOCAL_SQLITE_VALUES],
                         ids=["default", "production", "local-sqlite"])
def test_helm_lint_is_clean(helm, helm_env, values_file):
    args = ["lint", "--strict", str(CHART), "--kube-version", TARGET_KUBE_VERSION]
    if values_file:
        args += ["--values", str(values_file)]
    out = run_helm(helm, helm_env, *args)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_manifest_validates_against_the_kubernetes_schemas(render, scenario):
    objects = render(**SCENARIOS[scenario])
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{scenario}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                            f"Kubernetes {version}: {exc.caught}")
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE


def test_the_validator_rejects_a_broken_manifest(render):
    """Guards the test above: strict validation must catch a misspelt field and a wrong
    type, or a passing run proves nothing."""
    deployment = copy.deepcopy(deployment_of(render(), "clustering"))
    container(deployment)["readinessProbe"]["grpcc"] = container(deployment)["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, TARGET_KUBE_VERSION, strict=True)
    deployment = copy.deepcopy(deployment_of(render(), "clustering"))
    container(deployment)["ports"][0]["containerPort"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, TARGET_KUBE_VERSION, strict=True)


def test_chart_refuses_kubernetes_older_than_native_grpc_probes(helm, helm_env):
    with pytest.raises(HelmError, match="kubeVersion|incompatible"):
        run_helm(helm, helm_env, "template", RELEASE, str(CHART), "--kube-version", "1.26.0")


# --- objects per component ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_each_component_has_deployment_service_hpa_and_pdb(render, scenario):
    objects = render(**SCENARIOS[scenario])
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    hpas, pdbs = by_kind(objects, "HorizontalPodAutoscaler"), by_kind(objects, "PodDisruptionBudget")
    expected = {component_name(c) for c in COMPONENTS}
    assert set(deployments) == expected
    assert expected <= set(services)
    assert set(hpas) == expected
    assert set(pdbs) == expected
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        # The Service and the PDB must select exactly this component's pods, not the others.
        for selecting in (services[name]["spec"]["selector"], pdbs[name]["spec"]["selector"]["matchLabels"]):
            assert selecting.items() <= pod_labels.items()
            others = [d for n, d in deployments.items() if n != name]
            assert not any(selecting.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                           for d in others)
        hpa = hpas[name]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        # The HPA owns the replica count: a fixed one would be reset on every upgrade.
        assert "replicas" not in deployment["spec"]


def test_each_service_scales_on_its_own_settings(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    production = yaml.safe_load(PRODUCTION_VALUES.read_text())
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    for name in GRPC_SERVICES:
        wanted = production["services"][name]["autoscaling"]
        spec = hpas[component_name(name)]["spec"]
        assert (spec["minReplicas"], spec["maxReplicas"]) == (wanted["minReplicas"], wanted["maxReplicas"])
        assert spec["metrics"][0]["resource"]["target"]["averageUtilization"] == \
            wanted["targetCPUUtilizationPercentage"]


def test_grpc_probes_use_the_grpc_port_the_process_listens_on(render):
    objects = render()
    services = by_kind(objects, "Service")
    for name in GRPC_SERVICES:
        deployment = deployment_of(objects, name)
        c = container(deployment)
        port = CHART_VALUES["services"][name]["grpcPort"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port
        assert effective_env(deployment, objects)["HEARTH_GRPC_PORT"] == str(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "httpGet" not in c[probe] and "tcpSocket" not in c[probe]
        # Readiness: the overall status (NOT_SERVING while the database fails). Startup and
        # liveness: the process's own "liveness" status, never the dependencies' — a
        # database outage must not restart every service pod (tests/e2e/test_outages_e2e.py).
        assert c["readinessProbe"]["grpc"] == {"port": port}, name
        assert c["startupProbe"]["grpc"] == {"port": port, "service": "liveness"}, name
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}, name
        assert c["command"] == ["python", "-m", f"services.{name}"]
        service_ports = {p["name"]: p for p in services[component_name(name)]["spec"]["ports"]}
        assert service_ports["grpc"]["port"] == port and service_ports["grpc"]["targetPort"] == "grpc"
        assert service_ports["metrics"]["port"] == CHART_VALUES["services"][name]["metricsPort"]


def test_gateway_uses_http_probes_and_neither_depends_on_the_mesh(render):
    c = container(deployment_of(render(), "gateway"))
    # /health fans out to every service: as a liveness probe, one backend outage would
    # restart every gateway pod; as the readiness probe (until session 21), an outage of
    # every service (the database) took every gateway pod out of the Service, and clients
    # got the ingress's 503 page instead of the gateway's JSON 503 with Retry-After
    # (tests/e2e/test_routes_with_services_down.py checks the path stays 200 then).
    assert c["readinessProbe"]["httpGet"] == {"path": "/openapi.json", "port": "http"}
    assert c["livenessProbe"]["httpGet"]["path"] != "/health"
    assert c["livenessProbe"]["httpGet"]["port"] == "http"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": CHART_VALUES["gateway"]["port"], "metrics": CHART_VALUES["gateway"]["metricsPort"]}
    assert c["command"] == ["python", "-m", "gateway"]


def test_gateway_metrics_are_on_their_own_port_behind_a_cluster_internal_service(render):
    objects = render(values_files=(PRODUCTION_VALUES,), set_values=("gateway.service.type=LoadBalancer",))
    env = effective_env(deployment_of(objects, "gateway"), objects)
    assert env["HEARTH_METRICS_PORT"] == str(CHART_VALUES["gateway"]["metricsPort"])
    services = by_kind(objects, "Service")
    public = services[component_name("gateway")]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    assert "hearth.io/scrape" not in public["metadata"]["labels"]
    metrics = services[component_name("gateway") + "-metrics"]
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["metadata"]["labels"]["hearth.io/scrape"] == "true"
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]


def test_resources_are_set_on_every_container(render):
    for scenario in ("default", "production"):
        objects = render(**SCENARIOS[scenario])
        for component in COMPONENTS:
            resources = container(deployment_of(objects, component))["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], (scenario, component)
            assert resources["limits"]["memory"], (scenario, component)


def test_pods_run_non_root_with_a_read_only_root_filesystem(render):
    for scenario in SCENARIOS:
        objects = render(**SCENARIOS[scenario])
        for component in COMPONENTS:
            pod = deployment_of(objects, component)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            assert pod["automountServiceAccountToken"] is False
            security = container(deployment_of(objects, component))["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container(deployment_of(objects, component))["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
            # Every process writes under HEARTH_DATA_DIR: the services their SQLite files
            # and the privacy public key, all of them (the gateway too) the audit outbox
            # opened at start (a read-only data dir stopped the gateway at start).
            data_dir = effective_env(deployment_of(objects, component), objects)["HEARTH_DATA_DIR"]
            assert data_dir in mounts, f"{component}: {data_dir} is on the read-only root filesystem"
            assert "emptyDir" in volumes[mounts[data_dir]], f"{component}: {data_dir} must be writable"
            # The process reports the volume's limit (HearthDataDirNearLimit): the same quantity.
            limit = effective_env(deployment_of(objects, component), objects)["HEARTH_DATA_DIR_SIZE_LIMIT"]
            assert limit == volumes[mounts[data_dir]]["emptyDir"]["sizeLimit"], component
            assert byte_quantity(limit) > 0


def test_shutdown_budget_covers_prestop_sleep_and_the_drain_grace(render):
    """SIGKILL must not land while calls drain: terminationGracePeriodSeconds >
    preStop sleep + HEARTH_GRACE_SECONDS (the time serve() gives calls in flight) + the
    stop's bounded tail."""
    for scenario in ("default", "production"):
        objects = render(**SCENARIOS[scenario])
        for component in COMPONENTS:
            deployment = deployment_of(objects, component)
            c = container(deployment)
            command = c["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep"
            sleep_s = float(command[1])
            grace_s = float(effective_env(deployment, objects)["HEARTH_GRACE_SECONDS"])
            assert sleep_s > 0 and grace_s > 0
            # ... and the stop's bounded tail after the grace (the gRPC server's stop, one
            # health check of the peers before the closers: RunningServer.stop).
            from services.common.server import PEER_PROBE_TIMEOUT_S, STOP_AFTER_DRAIN_S

            assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= \
                sleep_s + grace_s + STOP_AFTER_DRAIN_S + PEER_PROBE_TIMEOUT_S


# --- configuration: what the processes will see -------------------------------------------


def _settings_classes() -> dict[str, type]:
    """The settings class each process validates its environment with."""
    from services.attribution.settings import AttributionSettings
    from services.clustering.settings import ClusteringSettings
    from services.feedback.settings import FeedbackSettings
    from services.privacy.settings import PrivacySettings

    return {"privacy": PrivacySettings, "feedback": FeedbackSettings, "clustering": ClusteringSettings,
            "attribution": AttributionSettings}


SETTINGS_CLASSES = _settings_classes()


def _load_settings(env: dict[str, object], component: str, monkeypatch):
    """Build the process's settings object from the rendered environment, exactly as
    the process would at start (secrets replaced by plausible stand-ins)."""
    from gateway.config import GatewaySettings
    from services.common import config

    stand_ins = {"HEARTH_POSTGRES_DSN": "postgresql://hearth:pw@db:5432/hearth",
                 "HEARTH_REDIS_URL": "redis://redis:6379/0",
                 "HEARTH_LOG_PSEUDONYM_KEY": "k" * 32,
                 "HEARTH_KEKS": "k1=" + "A" * 43 + "=",
                 "HEARTH_RECEIPT_SIGNING_KEY": "B" * 43 + "=",
                 "HEARTH_AUDIT_SIGNING_KEY": "C" * 43 + "="}
    for name in [n for n in list(__import__("os").environ) if n.startswith("HEARTH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, stand_ins.get(name, "secret") if isinstance(value, tuple) else value)
    if component == "gateway":
        return GatewaySettings()
    return config.load(SETTINGS_CLASSES.get(component, config.ServiceSettings), service_name=component)


@pytest.mark.parametrize("scenario", ["default", "production", "local-sqlite", "client-side-balancing"])
def test_rendered_environment_is_accepted_by_the_config_classes(render, scenario, monkeypatch):
    objects = render(**SCENARIOS[scenario])
    for component in COMPONENTS:
        deployment = deployment_of(objects, component)
        env = effective_env(deployment, objects)
        with monkeypatch.context() as patch:
            settings = _load_settings(env, component, patch)
        # Bound to every interface, or the kubelet's probes and the peers cannot connect.
        assert settings.host == "0.0.0.0", component
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        if component == "gateway":
            assert settings.gateway_port == ports["http"]
        else:
            assert settings.resolved_grpc_port == ports["grpc"]
            assert settings.resolved_metrics_port == ports["metrics"]
            assert settings.storage == env["HEARTH_STORAGE"]
        for peer in GRPC_SERVICES:
            assert getattr(settings, f"{peer}_addr") == env[f"HEARTH_{peer.upper()}_ADDR"]


def test_every_hearth_variable_the_chart_sets_is_one_the_code_reads(render):
    """A misspelt variable is silently ignored by the settings classes (extra="ignore"),
    so check each name against the fields and the env names the code reads."""
    from gateway.config import GatewaySettings
    from services.common import identity, tls
    from services.common.config import ServiceSettings
    from services.privacy.audit import app as audit_app

    known = {f"HEARTH_{field.upper()}" for cls in (ServiceSettings, GatewaySettings, *SETTINGS_CLASSES.values())
             for field in cls.model_fields}
    known |= {identity.TOKEN_KEY_ENV, identity.TOKEN_TTL_ENV, tls.CERT_ENV, tls.KEY_ENV, tls.CA_ENV,
              tls.SERVER_NAME_ENV, audit_app.KEY_ENV, audit_app.KEY_FILE_ENV}
    for scenario in SCENARIOS:
        objects = render(**SCENARIOS[scenario])
        for component in COMPONENTS:
            env = effective_env(deployment_of(objects, component), objects)
            unknown = {name for name in env if name.startswith("HEARTH_")} - known
            assert not unknown, f"{scenario}/{component}: unknown variables {sorted(unknown)}"


def test_production_uses_postgres_redis_and_secrets_for_credentials(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    for component in COMPONENTS:
        env = effective_env(deployment_of(objects, component), objects)
        if component == "gateway":
            # attack27: the gateway opens no database, yet was handed the DSN whose
            # credentials read and write every service's schema (privacy's keys, consent
            # and audit log included): the internet-facing pod held the mesh's data.
            assert "HEARTH_POSTGRES_DSN" not in env and "HEARTH_STORAGE" not in env
        else:
            assert env["HEARTH_STORAGE"] == "postgres"
            # Session 28: a login per service (test_chart_db_roles.py).
            assert env["HEARTH_POSTGRES_DSN"] == ("secret", f"hearth-postgres-{component}", "dsn")
        assert env["HEARTH_REDIS_URL"] == ("secret", "hearth-redis", "url")
        # The shared secret no longer signs (a key per component, mounted from a Secret:
        # test_each_pod_mounts_only_its_own_components_signing_key); it keys the pseudonyms.
        assert "HEARTH_SERVICE_TOKEN_KEY" not in env
        assert env["HEARTH_LOG_PSEUDONYM_KEY"] == ("secret", "hearth-service-token", "key")
    privacy = effective_env(deployment_of(objects, "privacy"), objects)
    # One set of keys for every privacy replica, from a Secret.
    assert privacy["HEARTH_KEKS"] == ("secret", "hearth-privacy-keys", "keks")
    assert privacy["HEARTH_RECEIPT_SIGNING_KEY"] == ("secret", "hearth-privacy-keys", "receipt-signing-key")
    assert privacy["HEARTH_AUDIT_SIGNING_KEY"] == ("secret", "hearth-privacy-keys", "audit-signing-key")
    # No credential in a ConfigMap or a plain env value.
    for cm in by_kind(objects, "ConfigMap").values():
        assert not {"HEARTH_POSTGRES_DSN", "HEARTH_REDIS_URL", "HEARTH_SERVICE_TOKEN_KEY",
                    "HEARTH_LOG_PSEUDONYM_KEY"} & set(cm["data"])
        assert not any(re.search(r"postgres(ql)?://|redis://", str(v)) for v in cm["data"].values())


def test_the_gateway_may_have_a_redis_login_of_its_own(render):
    """The gateway uses Redis for its rate-limit buckets only, but got the services' URL,
    and with it clustering's cached household models: a compromised gateway could replay a
    household's model from before an erasure (docs/security.md, attack28). With
    ``redis.gatewaySecretName`` its URL comes from a Secret of its own (a Redis user an ACL
    limits to ``hearth:ratelimit:*``); the services keep theirs; unset, all share one."""
    objects = render(set_values=("redis.enabled=true", "redis.gatewaySecretName=hearth-redis-gateway"))
    for component in COMPONENTS:
        env = effective_env(deployment_of(objects, component), objects)
        secret = "hearth-redis-gateway" if component == "gateway" else "hearth-redis"
        assert env["HEARTH_REDIS_URL"] == ("secret", secret, "url"), component
    shared = render(set_values=("redis.enabled=true",))
    assert effective_env(deployment_of(shared, "gateway"), shared)["HEARTH_REDIS_URL"] == ("secret", "hearth-redis", "url")


def test_gateway_reads_api_keys_from_a_mounted_secret(render):
    objects = render()
    deployment = deployment_of(objects, "gateway")
    env = effective_env(deployment, objects)
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = mounts["api-keys"]
    assert mount["readOnly"] is True
    assert volumes["api-keys"]["secret"]["secretName"] == "hearth-api-keys"
    item = volumes["api-keys"]["secret"]["items"][0]
    assert env["HEARTH_API_KEYS_FILE"] == f"{mount['mountPath']}/{item['path']}"


def test_gateway_admission_limits_flow_from_values_to_the_settings(render, monkeypatch):
    """gateway.admission renders HEARTH_ADMISSION_* that GatewaySettings reads back as
    the same limits (defaults, and a per-service override)."""
    objects = render(set_values=("gateway.admission.maxInFlight=7", "gateway.admission.queueTimeoutSeconds=3",
                                 "gateway.admission.perService.attribution.maxInFlight=2",
                                 "gateway.admission.perService.attribution.maxQueue=3",
                                 "gateway.admission.perService.attribution.queueTimeoutSeconds=4"))
    env = effective_env(deployment_of(objects, "gateway"), objects)
    settings = _load_settings(env, "gateway", monkeypatch)
    assert settings.admission_enabled is True
    assert (settings.admission_for("clustering").max_in_flight, settings.admission_for("clustering").max_queue,
            settings.admission_for("clustering").queue_timeout_s) == (7, CHART_VALUES["gateway"]["admission"]["maxQueue"], 3.0)
    assert (settings.admission_for("attribution").max_in_flight, settings.admission_for("attribution").max_queue,
            settings.admission_for("attribution").queue_timeout_s) == (2, 3, 4.0)
    # Defaults: no per-service variable at all.
    default_env = effective_env(deployment_of(render(), "gateway"), render())
    assert "HEARTH_ADMISSION_LIMITS" not in default_env
    assert json.loads(default_env["HEARTH_ADMISSION_DEFAULT"])["max_in_flight"] == \
        CHART_VALUES["gateway"]["admission"]["maxInFlight"]


def test_expected_bulk_readers_flow_from_values_to_the_privacy_settings(render, monkeypatch):
    """services.privacy.bulkReaders (session 35) renders HEARTH_AUDIT_BULK_READERS on
    privacy's pods only, read back by PrivacySettings as the same thresholds; by default
    none is named (the variable is not set)."""
    objects = render(set_values=("services.privacy.bulkReaders.reporting-svc=5000",))
    env = effective_env(deployment_of(objects, "privacy"), objects)
    assert json.loads(env["HEARTH_AUDIT_BULK_READERS"]) == {"reporting-svc": 5000}
    assert _load_settings(env, "privacy", monkeypatch).audit_bulk_readers == {"reporting-svc": 5000}
    for other in ("gateway", "clustering", "attribution", "feedback"):
        assert "HEARTH_AUDIT_BULK_READERS" not in effective_env(deployment_of(objects, other), objects), other
    assert "HEARTH_AUDIT_BULK_READERS" not in effective_env(deployment_of(render(), "privacy"), render())


def test_peer_addresses_point_at_the_rendered_services(render):
    objects = render()
    services = by_kind(objects, "Service")
    env = effective_env(deployment_of(objects, "gateway"), objects)
    for name in GRPC_SERVICES:
        host, port = env[f"HEARTH_{name.upper()}_ADDR"].rsplit(":", 1)
        grpc_port = next(p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc")
        assert int(port) == grpc_port


def test_client_side_balancing_targets_the_headless_services(render):
    objects = render(**SCENARIOS["client-side-balancing"])
    services = by_kind(objects, "Service")
    env = effective_env(deployment_of(objects, "gateway"), objects)
    for name in GRPC_SERVICES:
        address = env[f"HEARTH_{name.upper()}_ADDR"]
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", address)
        assert match, address
        headless = services[match.group(1)]
        assert headless["spec"]["clusterIP"] == "None"
        assert match.group(2) == NAMESPACE
        assert int(match.group(3)) == CHART_VALUES["services"][name]["grpcPort"]
        assert headless["spec"]["selector"] == services[component_name(name)]["spec"]["selector"]


def test_image_digest_pins_every_component(render):
    objects = render(**SCENARIOS["client-side-balancing"])
    for component in COMPONENTS:
        assert container(deployment_of(objects, component))["image"] == "hearth@sha256:" + "a" * 64


def test_config_change_rolls_the_pods(render):
    before = deployment_of(render(), "clustering")["spec"]["template"]["metadata"]["annotations"]
    after = deployment_of(render(set_values=("config.logLevel=DEBUG",)), "clustering")
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before["checksum/config"]


# --- storage modes ---------------------------------------------------------------------


def test_local_sqlite_runs_one_replica_with_a_data_volume(render):
    objects = render(values_files=(LOCAL_SQLITE_VALUES,))
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    for name in GRPC_SERVICES:
        deployment = deployment_of(objects, name)
        env = effective_env(deployment, objects)
        assert env["HEARTH_STORAGE"] == "sqlite"
        assert "HEARTH_POSTGRES_DSN" not in env
        assert deployment["spec"]["replicas"] == 1
        mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
        assert env["HEARTH_DATA_DIR"] in mounts, "SQLite needs a writable data dir"
        # The single privacy pod generates its keys into that data dir.
        assert "HEARTH_KEKS" not in env


@pytest.mark.parametrize("override", ["services.privacy.replicas=2", "services.privacy.autoscaling.enabled=true"])
def test_sqlite_with_more_than_one_replica_is_refused(render, override):
    values = ["storage.backend=sqlite", *(f"services.{s}.autoscaling.enabled=false" for s in GRPC_SERVICES),
              *(f"services.{s}.replicas=1" for s in GRPC_SERVICES)]
    render(set_values=tuple(values))  # the baseline renders
    with pytest.raises(HelmError, match=r"services\.privacy: storage.backend=sqlite allows one replica"):
        render(set_values=(*values, override))


@pytest.mark.parametrize("bad, message", [
    # values.schema.json: unknown keys and values fail with their path.
    ("storage.backend=mysql", "at '/storage/backend': value must be one of 'postgres', 'sqlite'"),
    ("gateway.metricPort=9100", "at '/gateway': additional properties 'metricPort' not allowed"),
    ("services.clustering.replica=3", "at '/services/clustering': additional properties 'replica' not allowed"),
    ("tracing.protocol=http/json", "at '/tracing/protocol': value must be one of 'grpc', 'http/protobuf'"),
    ("serviceToken.secretName=", "serviceToken.secretName and serviceToken.secretKey are required"),
    ("serviceKeys.secretPrefix=", "serviceKeys.secretPrefix, .secretKey, .publicKeysConfigMap and .publicKeysKey are required"),
    ("services.clustering.metricsPort=50051", "services.clustering: grpcPort and metricsPort must differ"),
    ("gateway.autoscaling.minReplicas=20", "gateway.autoscaling: minReplicas must be <= maxReplicas"),
    ("config.extra.LOG_LEVEL=x", "config.extra.LOG_LEVEL: keys must be HEARTH_"),
    ("storage.postgres.provisionRoles.lockTimeoutSeconds=-1",
     "at '/storage/postgres/provisionRoles/lockTimeoutSeconds': minimum: got -1, want 0"),
    ("storage.postgres.provisionRoles.lockTimeoutSeconds=10000000",
     "at '/storage/postgres/provisionRoles/lockTimeoutSeconds': maximum: got 1×10⁰⁷"),
    ("services.privacy.keys.secretName=", "services.privacy.keys.secretName, .receiptSigningKeyKey, .auditSigningKeyKey and .keksKey are required"),
    # a bulk reader's threshold is a number of households, never 0 or unlimited (session 35)
    ("services.privacy.bulkReaders.reporting-svc=0",
     "at '/services/privacy/bulkReaders/reporting-svc': minimum: got 0, want 1"),
])
def test_bad_values_fail_with_a_message_naming_the_value(render, bad, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        render(set_values=(bad,))


# --- monitoring objects --------------------------------------------------------------------


def test_monitoring_objects_are_opt_in(render):
    kinds = {o["kind"] for o in render()}
    assert not kinds & CRD_KINDS


def test_service_monitor_scrapes_every_component_once(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    (monitor,) = by_kind(objects, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in by_kind(objects, "Service").values()
                if selector.items() <= s["metadata"]["labels"].items()]
    # One scraped Service per component (the headless ones would double every series).
    assert sorted(s["metadata"]["name"] for s in selected) == sorted(
        component_name(c) + ("-metrics" if c == "gateway" else "") for c in COMPONENTS)
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in selected:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert len(names & endpoint_ports) == 1, service["metadata"]["name"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        # Keep the RPC metrics' own `service` label; add the component the alerts group by.
        assert endpoint["honorLabels"] is True
        assert {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_component"],
                "targetLabel": "hearth_component"} in endpoint["relabelings"]


def test_prometheus_rule_ships_the_tested_rules_with_runbook_urls_from_the_value(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    (rule,) = by_kind(objects, "PrometheusRule").values()
    base = yaml.safe_load(PRODUCTION_VALUES.read_text())["prometheusRule"]["runbookBaseUrl"]
    tested = yaml.safe_load(RULES.read_text())["groups"]
    shipped = rule["spec"]["groups"]
    alerts = 0
    for tested_group, shipped_group in zip(tested, shipped, strict=True):
        for tested_rule, shipped_rule in zip(tested_group["rules"], shipped_group["rules"], strict=True):
            if "alert" in tested_rule:
                alerts += 1
                assert shipped_rule["annotations"]["runbook_url"] == f"{base}#{tested_rule['alert'].lower()}"
                tested_rule["annotations"]["runbook_url"] = shipped_rule["annotations"]["runbook_url"]
            # Everything else (expressions, thresholds, labels, summaries) ships as tested.
            assert shipped_rule == tested_rule
    assert alerts >= 20


def test_object_names_fit_a_dns_label_even_for_a_long_release_name(helm, helm_env):
    release = "r" * 53  # the longest release name helm accepts
    out = run_helm(helm, helm_env, "template", release, str(CHART), "--kube-version", TARGET_KUBE_VERSION)
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "two objects of one kind share a name"
    for _, name in keys:
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_backup_cronjob_snapshots_postgres_into_the_claim(render):
    assert not by_kind(render(), "CronJob")
    objects = render(values_files=(PRODUCTION_VALUES,))
    cron = by_kind(objects, "CronJob")["hearth-backup"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:4] == ["hearth", "backup", "--out", "/backups"]
    assert {"name": "backups", "mountPath": "/backups"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "hearth-backups"
    env = {e["name"]: e for e in container["env"]}
    assert env["HEARTH_POSTGRES_DSN"]["valueFrom"]["secretKeyRef"]["name"] == "hearth-postgres-privacy"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_backup_with_sqlite_is_refused(render, helm, helm_env):
    import subprocess
    done = subprocess.run([helm, "template", "x", str(CHART), "-f", str(LOCAL_SQLITE_VALUES),
                           "--set", "backup.enabled=true", "--set", "backup.existingClaim=c"],
                          capture_output=True, text=True, env=helm_env)
    assert done.returncode != 0 and "backup.enabled: scheduled backups need storage.backend=postgres" in done.stderr



def test_each_component_runs_under_its_own_service_account_without_a_token(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    accounts = by_kind(objects, "ServiceAccount")
    names = set()
    for component in COMPONENTS:
        pod = deployment_of(objects, component)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == component_name(component)
        assert accounts[component_name(component)]["automountServiceAccountToken"] is False
        names.add(pod["serviceAccountName"])
    assert len(names) == len(COMPONENTS)
    cron = by_kind(objects, "CronJob")["hearth-backup"]
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] in accounts


def test_network_policies_deny_by_default_and_allow_only_the_callers(render):
    objects = render(**SCENARIOS["tls-ingress"])
    policies = by_kind(objects, "NetworkPolicy")
    deny = next(p for name, p in policies.items() if name.endswith("-default-deny"))
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    assert deny["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "hearth"
    peers = CHART_VALUES["networkPolicy"]["peers"]
    for component in GRPC_SERVICES:
        policy = policies[component_name(component)]
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        grpc_rule, metrics_rule = policy["spec"]["ingress"]
        assert grpc_rule["ports"] == [{"port": CHART_VALUES["services"][component]["grpcPort"], "protocol": "TCP"}]
        callers = {f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in grpc_rule["from"]}
        assert callers == set(peers[component]) and component not in callers
        # --set on metricsFrom[0] edits the default entry: Prometheus's pods, now in observability.
        assert metrics_rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    gateway = policies[component_name("gateway")]
    assert [r["ports"][0]["port"] for r in gateway["spec"]["ingress"]] == [
        CHART_VALUES["gateway"]["port"], CHART_VALUES["gateway"]["metricsPort"]]
    # Every component is selected by exactly one allow policy.
    assert len(policies) == 1 + len(COMPONENTS)


PROMETHEUS_ONLY = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def metrics_rules(objects: list[dict]) -> dict[str, dict]:
    """Each component's ingress rule for its metrics port."""
    policies = by_kind(objects, "NetworkPolicy")
    rules = {}
    for component in COMPONENTS:
        port = (CHART_VALUES["gateway"] if component == "gateway" else CHART_VALUES["services"][component])["metricsPort"]
        [rule] = [r for r in policies[component_name(component)]["spec"]["ingress"] if r["ports"][0]["port"] == port]
        rules[component] = rule
    return rules


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_only_prometheus_may_scrape_the_metrics_ports(render, scenario):
    """attack31: `networkPolicy.metricsFrom: []` (the default, production values included)
    rendered metrics rules with no `from`, which admits every pod of every namespace. Now
    both admit kube-prometheus-stack's Prometheus pods in namespace monitoring only (one
    entry: namespace AND pod selector), and the chart refuses []."""
    for component, rule in metrics_rules(render(**SCENARIOS[scenario])).items():
        assert rule.get("from") == PROMETHEUS_ONLY, component


def test_empty_metrics_from_is_refused_and_every_pod_must_be_asked_for(render, tmp_path):
    empty, anyone = tmp_path / "empty.yaml", tmp_path / "anyone.yaml"
    empty.write_text("networkPolicy: {metricsFrom: []}\n")
    anyone.write_text("networkPolicy: {metricsFrom: [{namespaceSelector: {}}]}\n")
    for values in ((), (PRODUCTION_VALUES,)):
        with pytest.raises(HelmError, match="networkPolicy.metricsFrom is empty"):
            render(values_files=(*values, empty))
    for component, rule in metrics_rules(render(values_files=(PRODUCTION_VALUES, anyone))).items():
        assert rule["from"] == [{"namespaceSelector": {}}], component


def test_tls_secrets_are_mounted_and_wired_to_the_settings(render):
    objects = render(**SCENARIOS["tls-ingress"])
    for component in COMPONENTS:
        deployment = deployment_of(objects, component)
        env = effective_env(deployment, objects)
        assert env["HEARTH_TLS_CERT"] == "/etc/hearth/tls/mesh/tls.crt", component
        assert env["HEARTH_TLS_CA"] == "/etc/hearth/tls/mesh/ca.crt"
        mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
        assert mounts["mesh-tls"]["mountPath"] == "/etc/hearth/tls/mesh" and mounts["mesh-tls"]["readOnly"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        # The component's own certificate, in its pods only (session 20: one mesh
        # certificate in every pod let any pod pass for any component over mutual TLS).
        assert volumes["mesh-tls"]["secret"]["secretName"] == f"hearth-mesh-tls-{component}", component
        mesh_secrets = {v["secret"]["secretName"] for v in volumes.values()
                        if "secret" in v and v["secret"]["secretName"].startswith("hearth-mesh-tls")}
        assert mesh_secrets == {f"hearth-mesh-tls-{component}"}, component
        assert ("HEARTH_HTTPS_CERT" in env) == (component == "gateway")
    gateway = deployment_of(objects, "gateway")
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["https-tls"]["secret"]["secretName"] == "hearth-https"
    # Without the values nothing TLS is rendered.
    plain = render()
    assert "HEARTH_TLS_CERT" not in effective_env(deployment_of(plain, "clustering"), plain)
    # The kubelet's gRPC probes take no TLS parameters: with mesh TLS they go to the
    # plaintext health-only port (until session 20 they went to the mTLS port and failed).
    for objs, tls_on in ((objects, True), (plain, False)):
        for component in ("clustering", "attribution", "privacy", "feedback"):
            deployment = deployment_of(objs, component)
            env = effective_env(deployment, objs)
            probe_ports = {container(deployment)[probe]["grpc"]["port"]
                           for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
            if tls_on:
                assert probe_ports == {CHART_VALUES["grpcProbes"]["healthPort"]}, component
                assert env["HEARTH_HEALTH_PORT"] == str(CHART_VALUES["grpcProbes"]["healthPort"]), component
            else:
                assert probe_ports == {CHART_VALUES["services"][component]["grpcPort"]}, component
                assert "HEARTH_HEALTH_PORT" not in env, component
    # The one shared mesh certificate of sessions <= 19 is no longer a value (the schema refuses it).
    with pytest.raises(Exception, match="secretName"):
        render(set_values=("tls.mesh.secretName=hearth-mesh-tls",))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_pod_mounts_only_its_own_components_signing_key(render, scenario):
    """A key per component (session 19): the gateway's pods hold the gateway's private key
    and no other, so a compromised gateway cannot sign as svc:privacy; every pod holds
    every component's public key. The files are where the settings point."""
    objects = render(**SCENARIOS[scenario])
    for component in COMPONENTS:
        deployment = deployment_of(objects, component)
        env = effective_env(deployment, objects)
        assert "HEARTH_SERVICE_TOKEN_KEY" not in env, component
        mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        signing_secrets = {v["secret"]["secretName"] for v in volumes
                           if "secret" in v and v["secret"]["secretName"].startswith("hearth-signing-")}
        assert signing_secrets == {f"hearth-signing-{component}"}, component
        by_name = {v["name"]: v for v in volumes}
        assert by_name["public-keys"]["configMap"]["name"] == "hearth-service-public-keys"
        assert mounts["signing-key"]["readOnly"] and mounts["public-keys"]["readOnly"]
        key_path = mounts["signing-key"]["mountPath"] + "/" + by_name["signing-key"]["secret"]["items"][0]["path"]
        keys_path = mounts["public-keys"]["mountPath"] + "/" + by_name["public-keys"]["configMap"]["items"][0]["path"]
        assert env["HEARTH_SERVICE_SIGNING_KEY_FILE"] == key_path, component
        assert env["HEARTH_SERVICE_PUBLIC_KEYS_FILE"] == keys_path, component


def test_jwt_public_key_is_mounted_and_wired_to_the_gateway_settings(render, monkeypatch):
    """RS256/ES256 JWTs need HEARTH_JWT_PUBLIC_KEY_FILE, a file: before gateway.jwtPublicKey
    the chart had no way to put one in the pod (secretEnv gives variables only)."""
    objects = render(set_values=("gateway.jwtPublicKey.secretName=hearth-jwt",
                                 "gateway.env.HEARTH_JWT_ALGORITHM=RS256",
                                 "gateway.env.HEARTH_JWT_ISSUER=https://idp.example.com",
                                 "gateway.env.HEARTH_JWT_AUDIENCE=hearth"))
    gateway = deployment_of(objects, "gateway")
    env = effective_env(gateway, objects)
    with monkeypatch.context() as patch:
        settings = _load_settings(env, "gateway", patch)
    assert settings.jwt_algorithm == "RS256"
    key_file = str(settings.jwt_public_key_file)
    mounts = {m["mountPath"]: m for m in container(gateway)["volumeMounts"]}
    directory, _, name = key_file.rpartition("/")
    assert mounts[directory]["readOnly"] is True
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[directory]["name"]]["secret"]
    assert secret["secretName"] == "hearth-jwt"
    assert {"key": "public.pem", "path": name} in secret["items"]
    # Off by default: no variable, no volume.
    plain = render()
    assert "HEARTH_JWT_PUBLIC_KEY_FILE" not in effective_env(deployment_of(plain, "gateway"), plain)


def test_ingress_routes_to_the_public_gateway_port_only(render):
    objects = render(**SCENARIOS["tls-ingress"])
    (ingress,) = by_kind(objects, "Ingress").values()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "hearth-public-tls", "hosts": ["hearth.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": component_name("gateway"), "port": {"name": "http"}}
    assert not by_kind(render(), "Ingress")


def test_helm_test_hook_checks_gateway_health(render):
    objects = render()
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{component_name('gateway')}." in script and "/health" in script
    assert '"SERVING"' in script
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True



def test_values_schema_is_generated_from_values_yaml():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "scripts/gen_values_schema.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_values_schema_accepts_the_optional_component_keys(render):
    objects = render(set_values=("services.clustering.nodeSelector.disk=ssd", "gateway.env.HEARTH_ACCESS_LOG=false",
                                 "services.feedback.autoscaling.targetMemoryUtilizationPercentage=80"))
    assert deployment_of(objects, "clustering")["spec"]["template"]["spec"]["nodeSelector"] == {"disk": "ssd"}


def test_retention_reaches_clustering_and_privacy_alike(render):
    """docs/privacy.md §7: clustering refuses at ingest what privacy's retention purge
    erases, so both must read one HEARTH_RETENTION_DAYS / _CHECK_S: `config.extra` is the
    shared ConfigMap every component reads."""
    objects = render(set_values=("config.extra.HEARTH_RETENTION_DAYS=30",
                                 "config.extra.HEARTH_RETENTION_CHECK_S=600"))
    seen = {c: {k: str(v) for k, v in effective_env(deployment_of(objects, c), objects).items()
                if k.startswith("HEARTH_RETENTION_")} for c in ("clustering", "privacy")}
    assert seen["clustering"] == seen["privacy"] == {"HEARTH_RETENTION_DAYS": "30", "HEARTH_RETENTION_CHECK_S": "600"}
