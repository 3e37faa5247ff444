"""The chart's rollback webhook (rolloutWebhook.*): the Deployment runs the real
`hearth rollout webhook` command against the gateway's Service, with its secrets, its
own ServiceAccount and NetworkPolicy, and manifests valid for Kubernetes."""

from __future__ import annotations

import kubernetes_validate
import pytest

from services.cli import build_parser
from services.common.config import ConfigError, check_environment
from tests.deploy.conftest import MIN_KUBE_VERSION, NAMESPACE, HelmError, PRODUCTION_VALUES, TARGET_KUBE_VERSION, by_kind, component_name
from tests.deploy.test_chart import CHART_VALUES, container, effective_env

WEBHOOK = component_name("rollout-webhook")
ENABLED = dict(values_files=(PRODUCTION_VALUES,), set_values=(
    "rolloutWebhook.enabled=true", "tls.https.secretName=hearth-https",
    "rolloutWebhook.from[0].namespaceSelector.matchLabels.team=monitoring",
    "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ingress"))


def test_webhook_is_opt_in(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    assert not [o for o in objects if o["metadata"]["name"] == WEBHOOK]


def test_webhook_manifests_validate_against_the_kubernetes_schemas(render):
    objects = [o for o in render(**ENABLED) if o["metadata"]["name"] == WEBHOOK]
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "ServiceAccount", "NetworkPolicy"}
    for obj in objects:
        for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
            kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_webhook_runs_the_cli_against_the_gateway_service_with_its_secrets(render):
    objects = render(**ENABLED)
    deployment = by_kind(objects, "Deployment")[WEBHOOK]
    c = container(deployment)
    command = c["command"]
    assert command[0] == "hearth"
    # The real CLI parser accepts the rendered arguments and dispatches to the webhook.
    args = build_parser().parse_args(command[1:])
    assert args.command == "rollout" and args.rollout_command == "webhook"
    gateway_port = CHART_VALUES["gateway"]["service"]["port"]
    assert args.gateway == f"https://{component_name('gateway')}.{NAMESPACE}.svc:{gateway_port}"
    assert component_name("gateway") in by_kind(objects, "Service")
    listen_port = int(args.listen.rpartition(":")[2])
    assert c["ports"] == [{"name": "http", "containerPort": listen_port, "protocol": "TCP"}]
    service = by_kind(objects, "Service")[WEBHOOK]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    env = effective_env(deployment, objects)
    assert env["HEARTH_ROLLOUT_API_KEY"] == ("secret", "hearth-rollout", "api-key")
    assert env["HEARTH_ROLLOUT_WEBHOOK_TOKEN"] == ("secret", "hearth-rollout", "webhook-token")
    assert env["HEARTH_ROLLOUT_CA_FILE"] == "/etc/hearth/tls/https/ca.crt"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/etc/hearth/tls/https"]]["secret"]["secretName"] == "hearth-https"
    # Every HEARTH_* variable it gets (incl. the shared ConfigMap) is one the code reads.
    check_environment({k: "x" for k in env if k.startswith("HEARTH_")})
    with pytest.raises(ConfigError):
        check_environment({"HEARTH_ROLLOUT_CA_FILES": "x"})
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == WEBHOOK and pod["automountServiceAccountToken"] is False
    assert by_kind(objects, "ServiceAccount")[WEBHOOK]["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_webhook_is_reachable_by_alertmanager_and_may_call_the_gateway(render):
    objects = render(**ENABLED)
    policies = by_kind(objects, "NetworkPolicy")
    (rule,) = policies[WEBHOOK]["spec"]["ingress"]
    assert rule["ports"] == [{"port": CHART_VALUES["rolloutWebhook"]["port"], "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
    http_rule = policies[component_name("gateway")]["spec"]["ingress"][0]
    callers = [f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
               for f in http_rule["from"]]
    assert "rollout-webhook" in callers
    # Without the webhook (and the `helm test` pod, tests/deploy/test_chart_egress.py) the
    # gateway's allow list is exactly the operator's.
    plain = render(values_files=(PRODUCTION_VALUES,), set_values=(
        "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ingress", "tests.enabled=false"))
    assert by_kind(plain, "NetworkPolicy")[component_name("gateway")]["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "ingress"}}}]


def test_webhook_without_https_calls_the_gateway_over_http(render):
    objects = render(set_values=("rolloutWebhook.enabled=true", "rolloutWebhook.token.secretName=",
                                 "rolloutWebhook.from[0].podSelector.matchLabels.app=alertmanager"))
    deployment = by_kind(objects, "Deployment")[WEBHOOK]
    args = build_parser().parse_args(container(deployment)["command"][1:])
    assert args.gateway.startswith("http://")
    env = effective_env(deployment, objects)
    assert "HEARTH_ROLLOUT_CA_FILE" not in env and "HEARTH_ROLLOUT_WEBHOOK_TOKEN" not in env


def test_an_unauthenticated_webhook_open_to_the_whole_cluster_is_refused(render):
    """attack26: `token.secretName: ""` (unauthenticated POSTs, "only behind the
    NetworkPolicy") with the default `from: []` (anyone in the cluster) rendered: any pod
    could POST a firing rollback alert and turn the experiment's kill switch on with the
    webhook's admin key. Either alone still renders."""
    open_to_all = ("rolloutWebhook.enabled=true", "tls.https.secretName=hearth-https",
                   "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ingress",
                   "rolloutWebhook.token.secretName=")
    with pytest.raises(HelmError, match="rolloutWebhook.token.secretName"):
        render(values_files=(PRODUCTION_VALUES,), set_values=open_to_all)
    render(values_files=(PRODUCTION_VALUES,), set_values=(
        *open_to_all, "rolloutWebhook.from[0].namespaceSelector.matchLabels.team=monitoring"))
    render(values_files=(PRODUCTION_VALUES,), set_values=open_to_all[:-1])


def test_the_webhooks_from_follows_the_gateways_rule(render, tmp_path):
    """session 32: rolloutWebhook.from had gatewayFrom's trap ([] = anyone, the default),
    so an SRE emptying the list to close the webhook opened it to every pod. `anyone` is
    written out (a rule without `from`; the token guards each POST), [] is refused, and
    `anyone` without a token is refused as [] without one was."""
    assert CHART_VALUES["rolloutWebhook"]["from"] == "anyone"
    on = ("rolloutWebhook.enabled=true", "tls.https.secretName=hearth-https",
          "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ingress")
    (rule,) = by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=on), "NetworkPolicy")[
        WEBHOOK]["spec"]["ingress"]
    assert "from" not in rule
    empty = tmp_path / "empty.yaml"
    empty.write_text("rolloutWebhook: {from: []}\n")
    with pytest.raises(HelmError, match="rolloutWebhook.from is empty"):
        render(values_files=(PRODUCTION_VALUES, empty), set_values=on)
    with pytest.raises(HelmError, match="rolloutWebhook.token.secretName"):
        render(values_files=(PRODUCTION_VALUES,), set_values=(*on, "rolloutWebhook.token.secretName="))
