"""The chart's egress NetworkPolicies (networkPolicy.egress, opt-in) and who may reach the
gateway's HTTP port (networkPolicy.gatewayFrom), read offline from `helm template`.

Each pod of the release may open connections only to DNS, the release's pods it calls and
the external dependencies it uses. What the services call is the code's statement of it,
config.PEER_CALLS (held to the peer addresses each entry point reads by
tests/unit/common/test_peer_calls.py); the chart derives its egress from
`networkPolicy.peers`, which these tests hold to it. Offline the
rules can be rendered and checked, not enforced: that needs a cluster with a
policy-enforcing CNI.
"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from services.common import config
from tests.deploy.conftest import (
    GRPC_SERVICES,
    LOCAL_SQLITE_VALUES,
    MIN_KUBE_VERSION,
    PRODUCTION_VALUES,
    TARGET_KUBE_VERSION,
    HelmError,
    by_kind,
    component_name,
)
from tests.deploy.test_chart import CHART_VALUES

# The default DNS destination: kube-dns / CoreDNS pods in kube-system.
DNS_TO = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
POSTGRES_TO = [{"ipBlock": {"cidr": "10.0.5.10/32"}}]
REDIS_TO = [{"ipBlock": {"cidr": "10.0.6.0/24"}}]
OTLP_TO = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "opentelemetry-collector"}}}]
DEPENDENCIES_SET = (
    "networkPolicy.egress.enabled=true",
    "networkPolicy.egress.postgres.to[0].ipBlock.cidr=10.0.5.10/32",
    "networkPolicy.egress.redis.to[0].ipBlock.cidr=10.0.6.0/24",
    r"networkPolicy.egress.otlp.to[0].namespaceSelector.matchLabels.kubernetes\.io/metadata\.name=observability",
    r"networkPolicy.egress.otlp.to[0].podSelector.matchLabels.app\.kubernetes\.io/name=opentelemetry-collector",
)
# Production values (PostgreSQL, Redis, OTLP, backups) with egress on, and with every
# optional pod of the chart on as well.
PRODUCTION_EGRESS = dict(values_files=(PRODUCTION_VALUES,), set_values=DEPENDENCIES_SET)
EVERYTHING_EGRESS = dict(values_files=(PRODUCTION_VALUES,), set_values=(
    *DEPENDENCIES_SET, "edge.enabled=true", "tls.mesh.secretPrefix=hearth-mesh-tls",
    "rolloutWebhook.enabled=true", "rolloutWebhook.from[0].podSelector.matchLabels.app=alertmanager",
    "storage.postgres.provisionRoles.enabled=true", "storage.postgres.provisionRoles.adminSecretName=hearth-postgres-admin"))
# SQLite, no Redis, no tracing: DNS and the mesh only.
SQLITE_EGRESS = dict(values_files=(LOCAL_SQLITE_VALUES,), set_values=("networkPolicy.egress.enabled=true",))

SERVICE_PORTS = {name: CHART_VALUES["services"][name]["grpcPort"] for name in GRPC_SERVICES}
GATEWAY_PORT = CHART_VALUES["gateway"]["port"]
AUTHORIZER_PORT = CHART_VALUES["edge"]["authorizerPort"]


# --- what the code dials --------------------------------------------------------------------


def calls_from_code() -> dict[str, set[str]]:
    """The mesh services each component dials: config.PEER_CALLS, which
    tests/unit/common/test_peer_calls.py holds to the peer addresses each entry point reads."""
    return {name: set(peers) for name, peers in config.PEER_CALLS.items()}


def test_the_charts_peers_are_the_calls_the_code_makes():
    """networkPolicy.peers (callee -> callers) is the one list both the ingress and the
    egress policies come from: it must say exactly who dials whom in the code."""
    calls = calls_from_code()
    assert calls["gateway"] == set(GRPC_SERVICES)
    assert all(calls[name] for name in GRPC_SERVICES)   # the scan found something
    callers = {callee: {caller for caller, callees in calls.items() if callee in callees} for callee in GRPC_SERVICES}
    assert {callee: set(names) for callee, names in CHART_VALUES["networkPolicy"]["peers"].items()} == callers


# --- reading the rendered policies ----------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) \
        and not selector.get("matchExpressions")


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    """Every pod the release runs: name -> the pod's labels."""
    pods = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            pods[obj["metadata"]["name"]] = obj["spec"]["template"]["metadata"]["labels"]
        elif obj["kind"] == "CronJob":
            pods[obj["metadata"]["name"]] = obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        elif obj["kind"] == "Job":
            pods[obj["metadata"]["name"]] = obj["spec"]["template"]["metadata"]["labels"]
        elif obj["kind"] == "Pod":
            pods[obj["metadata"]["name"]] = obj["metadata"]["labels"]
    return pods


def admitted(policy: dict) -> set[tuple[str, int, str]]:
    """The (destination, port, protocol) triples a policy's egress rules admit; a
    destination is one `to` entry as canonical JSON, or "*" for a rule without `to`."""
    out = set()
    for rule in policy["spec"].get("egress", []):
        assert rule.get("ports"), f"{policy['metadata']['name']}: an egress rule on every port"
        for to in rule.get("to") or ["*"]:
            for port in rule["ports"]:
                out.add((to if to == "*" else json.dumps(to, sort_keys=True), port["port"], port.get("protocol", "TCP")))
    return out


def to_pods(component: str, port: int) -> tuple[str, int, str]:
    selector = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "hearth", "app.kubernetes.io/instance": "hearth",
                                                "app.kubernetes.io/component": component}}}
    return json.dumps(selector, sort_keys=True), port, "TCP"


def to_dependency(entries: list[dict], port: int, *protocols: str) -> set[tuple[str, int, str]]:
    return {(json.dumps(e, sort_keys=True), port, protocol) for e in entries for protocol in protocols or ("TCP",)}


DNS = to_dependency(DNS_TO, 53, "UDP", "TCP")
POSTGRES = to_dependency(POSTGRES_TO, 5432)
REDIS = to_dependency(REDIS_TO, 6379)
OTLP = to_dependency(OTLP_TO, 4317)


def egress_policies(objects: list[dict]) -> dict[str, dict]:
    return {name: p for name, p in by_kind(objects, "NetworkPolicy").items() if "Egress" in p["spec"]["policyTypes"]}


def admitted_per_pod(objects: list[dict]) -> dict[str, set]:
    """For each pod of the release: what the egress policies selecting it admit (their
    union, as Kubernetes applies them). Every pod must be selected by the default deny."""
    policies = egress_policies(objects)
    deny = policies.pop(component_name("default-deny"))
    assert "egress" not in deny["spec"]
    result = {}
    for pod, labels in pod_templates(objects).items():
        assert selects(deny["spec"]["podSelector"], labels), f"{pod} escapes the default deny"
        mine = [p for p in policies.values() if selects(p["spec"]["podSelector"], labels)]
        assert len(mine) == 1, f"{pod}: {len(mine)} egress policies select it"
        result[pod] = admitted(mine[0])
    return result


# --- egress ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values_files", [(), (PRODUCTION_VALUES,), (LOCAL_SQLITE_VALUES,)],
                         ids=["default", "production", "local-sqlite"])
def test_egress_is_off_unless_asked_for(render, values_files):
    """Off by default and in production values: the chart cannot know where PostgreSQL,
    Redis and the collector live, and a wrong address stops every service."""
    egress = CHART_VALUES["networkPolicy"]["egress"]
    assert egress["enabled"] is False and egress["dns"]["to"] == DNS_TO
    policies = by_kind(render(values_files=values_files), "NetworkPolicy")
    assert policies and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies.values())


def test_production_values_name_the_collector_of_their_own_endpoint():
    values = yaml.safe_load(PRODUCTION_VALUES.read_text(encoding="utf-8"))
    host = values["tracing"]["otlpEndpoint"].split("://", 1)[1].rsplit(":", 1)[0]   # otel-collector.observability
    [entry] = values["networkPolicy"]["egress"]["otlp"]["to"]
    assert entry == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": host.split(".")[1]}}}
    assert values["networkPolicy"]["egress"]["enabled"] is False


def test_each_pod_may_reach_exactly_its_peers_and_its_dependencies(render):
    calls = calls_from_code()
    per_pod = admitted_per_pod(render(**EVERYTHING_EGRESS))
    for name in GRPC_SERVICES:
        peers = {to_pods(callee, SERVICE_PORTS[callee]) for callee in calls[name]}
        assert per_pod[component_name(name)] == DNS | peers | POSTGRES | REDIS | OTLP, name
    # The gateway opens no database (it holds no DSN).
    assert per_pod[component_name("gateway")] == DNS | {to_pods(s, p) for s, p in SERVICE_PORTS.items()} | REDIS | OTLP
    # Envoy: the four services and the gateway's authorizer port, not its public port.
    assert per_pod[component_name("envoy")] == DNS | {to_pods(s, p) for s, p in SERVICE_PORTS.items()} | {
        to_pods("gateway", AUTHORIZER_PORT)}
    assert per_pod[component_name("rollout-webhook")] == DNS | {to_pods("gateway", GATEWAY_PORT)}
    assert per_pod[component_name("test-health")] == DNS | {to_pods("gateway", GATEWAY_PORT)}
    # Snapshots, the ledger export and the provision-roles hook: PostgreSQL only.
    for job in ("backup", "ledger", "db-provision"):
        assert per_pod[component_name(job)] == DNS | POSTGRES, job
    assert len(per_pod) == 5 + 1 + 1 + 1 + 3


def test_without_postgres_redis_or_tracing_only_dns_and_the_mesh_are_admitted(render):
    calls = calls_from_code()
    per_pod = admitted_per_pod(render(**SQLITE_EGRESS))
    for name in (*GRPC_SERVICES, "gateway"):
        assert per_pod[component_name(name)] == DNS | {to_pods(c, SERVICE_PORTS[c]) for c in calls[name]}, name


def test_dependency_ports_are_values(render):
    per_pod = admitted_per_pod(render(values_files=(PRODUCTION_VALUES,), set_values=(
        *DEPENDENCIES_SET, "networkPolicy.egress.postgres.port=6432", "networkPolicy.egress.redis.port=6380",
        "networkPolicy.egress.otlp.port=4318", "networkPolicy.egress.dns.port=5353")))
    assert per_pod[component_name("feedback")] >= (to_dependency(DNS_TO, 5353, "UDP", "TCP") | to_dependency(POSTGRES_TO, 6432)
                                                   | to_dependency(REDIS_TO, 6380) | to_dependency(OTLP_TO, 4318))
    assert not per_pod[component_name("feedback")] & (DNS | POSTGRES | REDIS | OTLP)


@pytest.mark.parametrize("dependency", ["postgres", "redis", "otlp", "dns"])
def test_a_dependency_in_use_without_a_destination_is_refused_naming_the_value(render, dependency):
    """An empty `to` would admit every address on the port, and no `to` the chart could
    guess is right: it refuses to render, naming the value to set."""
    without = (*(s for s in DEPENDENCIES_SET if not s.startswith(f"networkPolicy.egress.{dependency}.to")),
               f"networkPolicy.egress.{dependency}.to=null")
    with pytest.raises(HelmError, match=rf"networkPolicy\.egress\.{dependency}\.to is empty"):
        render(values_files=(PRODUCTION_VALUES,), set_values=without)


def test_egress_without_network_policies_is_refused(render):
    """networkPolicy.enabled=false renders no policy at all: egress asked for there would
    silently stay open."""
    with pytest.raises(HelmError, match="networkPolicy.egress.enabled needs networkPolicy.enabled"):
        render(values_files=(PRODUCTION_VALUES,), set_values=(*DEPENDENCIES_SET, "networkPolicy.enabled=false"))
    assert not by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=("networkPolicy.enabled=false",)),
                       "NetworkPolicy")


def test_a_dependency_not_in_use_needs_no_destination(render):
    # SQLite, Redis off, no tracing: none of postgres/redis/otlp is asked for.
    render(**SQLITE_EGRESS)
    # Egress off: nothing is asked for, whatever is in use.
    render(values_files=(PRODUCTION_VALUES,))


def test_egress_policies_validate_against_the_kubernetes_schemas(render):
    for obj in egress_policies(render(**EVERYTHING_EGRESS)).values():
        for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
            kubernetes_validate.validate(obj, version, strict=True)


# --- gatewayFrom ----------------------------------------------------------------------------


def gateway_http_rule(objects: list[dict]) -> dict:
    policy = by_kind(objects, "NetworkPolicy")[component_name("gateway")]
    [rule] = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == GATEWAY_PORT]
    return rule


@pytest.mark.parametrize("values_files", [(), (PRODUCTION_VALUES,)], ids=["default", "production"])
def test_anyone_may_reach_the_gateway_only_when_the_values_say_anyone(render, values_files):
    """The default is written out (`anyone`): the gateway authenticates every request and
    its clients (an ingress controller, a LoadBalancer's addresses) cannot be guessed."""
    assert CHART_VALUES["networkPolicy"]["gatewayFrom"] == "anyone"
    assert "from" not in gateway_http_rule(render(values_files=values_files))


def test_empty_gateway_from_is_refused_and_other_words_too(render, tmp_path):
    """session 32: `gatewayFrom: []` meant anyone, so emptying the list to close the
    gateway opened it. Now [] is refused, as `metricsFrom: []` is."""
    empty, everyone = tmp_path / "empty.yaml", tmp_path / "everyone.yaml"
    empty.write_text("networkPolicy: {gatewayFrom: []}\n")
    everyone.write_text("networkPolicy: {gatewayFrom: everyone}\n")
    for values in ((), (PRODUCTION_VALUES,)):
        with pytest.raises(HelmError, match="networkPolicy.gatewayFrom is empty"):
            render(values_files=(*values, empty))
        with pytest.raises(HelmError, match="gatewayFrom"):
            render(values_files=(*values, everyone))


def test_a_listed_gateway_from_admits_the_list_and_the_charts_own_callers(render, tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("networkPolicy:\n  gatewayFrom:\n    - namespaceSelector:\n"
                      "        matchLabels: {kubernetes.io/metadata.name: ingress-nginx}\n")
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    test_pod = json.loads(to_pods("test", 0)[0])
    webhook = json.loads(to_pods("rollout-webhook", 0)[0])
    assert gateway_http_rule(render(values_files=(PRODUCTION_VALUES, listed)))["from"] == [ingress, test_pod]
    assert gateway_http_rule(render(values_files=(PRODUCTION_VALUES, listed), set_values=("tests.enabled=false",)))[
        "from"] == [ingress]
    assert gateway_http_rule(render(values_files=(PRODUCTION_VALUES, listed), set_values=(
        "rolloutWebhook.enabled=true", "rolloutWebhook.from[0].podSelector.matchLabels.app=alertmanager")))[
        "from"] == [ingress, webhook, test_pod]


def test_the_edge_follows_the_same_rule(render, tmp_path):
    """edge.from had the same trap ([] = anyone, the default): `anyone` written out, [] refused."""
    assert CHART_VALUES["edge"]["from"] == "anyone"
    edge = ("edge.enabled=true", "tls.mesh.secretPrefix=hearth-mesh-tls")
    (rule,) = by_kind(render(values_files=(PRODUCTION_VALUES,), set_values=edge), "NetworkPolicy")[
        component_name("envoy")]["spec"]["ingress"]
    assert "from" not in rule
    empty = tmp_path / "empty.yaml"
    empty.write_text("edge: {from: []}\n")
    with pytest.raises(HelmError, match="edge.from is empty"):
        render(values_files=(PRODUCTION_VALUES, empty), set_values=edge)
