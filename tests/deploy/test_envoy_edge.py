"""The Envoy edge (edge.*): no Envoy binary can be installed here, so the rendered
bootstrap is parsed strictly into Envoy's own API types (envoy.config.bootstrap.v3.
Bootstrap from the pinned xds-protos, unknown fields are errors, every typed_config
unpacked into its message), and what it says is checked against the descriptor set
`make protos` writes: every transcoded service and HTTP rule names a method that exists,
every annotated method is routed to the cluster of the process that serves it, and the
authorization hop points at the gateway's authorizer with the mesh metadata keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

from gateway.routes.edge import PREFIX as AUTHORIZER_PREFIX
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY
from tests.deploy.conftest import (
    MIN_KUBE_VERSION, NAMESPACE, PRODUCTION_VALUES, ROOT, TARGET_KUBE_VERSION, by_kind, component_name)
from tests.deploy.test_chart import CHART_VALUES, container, effective_env

sys.path.insert(0, str(ROOT / "scripts"))
import gen_protos  # noqa: E402

ENVOY = component_name("envoy")
DESCRIPTORS = ROOT / "hearth" / gen_protos.DESCRIPTOR_SET
ENABLED = dict(values_files=(PRODUCTION_VALUES,), set_values=(
    "edge.enabled=true", "edge.tls.secretName=hearth-edge-tls", "tls.mesh.secretPrefix=hearth-mesh-tls",
    "tls.https.secretName=hearth-https", "edge.from[0].namespaceSelector.matchLabels.team=lb",
    "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=ingress"))
PLAIN = dict(set_values=("edge.enabled=true",))
# Which process serves each gRPC service (SERVICE_MODULES of the mesh).
SERVED_BY = {"hearth.clustering.v1": "clustering", "hearth.attribution.v1": "attribution",
             "hearth.privacy.v1": "privacy", "hearth.feedback.v1": "feedback"}

# Runs with the xds-protos folder as its only path (python -S): parse strictly, unpack
# every Any, print what the assertions need.
PARSE = r'''
import json, sys
from google.protobuf import json_format, any_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2

bootstrap = bootstrap_pb2.Bootstrap()
json_format.ParseDict(json.load(sys.stdin), bootstrap, ignore_unknown_fields=False)

def unpack(any_msg, cls):
    msg = cls()
    if not any_msg.Unpack(msg):
        raise SystemExit(f"typed_config {any_msg.type_url} is not {cls.DESCRIPTOR.full_name}")
    return msg

out = {"listeners": [], "clusters": []}
for listener in bootstrap.static_resources.listeners:
    for chain in listener.filter_chains:
        (net,) = chain.filters
        hcm = unpack(net.typed_config, hcm_pb2.HttpConnectionManager)
        filters = {}
        for f in hcm.http_filters:
            cls = {"envoy.filters.http.grpc_json_transcoder": transcoder_pb2.GrpcJsonTranscoder,
                   "envoy.filters.http.ext_authz": ext_authz_pb2.ExtAuthz,
                   "envoy.filters.http.router": router_pb2.Router}[f.name]
            filters[f.name] = json_format.MessageToDict(unpack(f.typed_config, cls), preserving_proto_field_name=True)
        for log in hcm.access_log:
            unpack(log.typed_config, stream_pb2.StdoutAccessLog)
        tls = None
        if chain.HasField("transport_socket"):
            tls = json_format.MessageToDict(unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext),
                                            preserving_proto_field_name=True)
        out["listeners"].append({"port": listener.address.socket_address.port_value,
                                 "filter_order": [f.name for f in hcm.http_filters], "filters": filters,
                                 "routes": [{"prefix": r.match.prefix, "cluster": r.route.cluster, "name": r.name}
                                            for vh in hcm.route_config.virtual_hosts for r in vh.routes],
                                 "tls": tls})
for cluster in bootstrap.static_resources.clusters:
    options = cluster.typed_extension_protocol_options
    http2 = False
    for key, value in options.items():
        http2 = unpack(value, http_protocol_options_pb2.HttpProtocolOptions).explicit_http_config.HasField(
            "http2_protocol_options")
    tls = None
    if cluster.HasField("transport_socket"):
        tls = json_format.MessageToDict(unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext),
                                        preserving_proto_field_name=True)
    addresses = [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                 for group in cluster.load_assignment.endpoints for e in group.lb_endpoints]
    out["clusters"].append({"name": cluster.name, "http2": http2, "tls": tls, "addresses": addresses,
                            "grpc_health": any(h.HasField("grpc_health_check") for h in cluster.health_checks)})
out["admin"] = [bootstrap.admin.address.socket_address.address, bootstrap.admin.address.socket_address.port_value]
print(json.dumps(out))
'''


def parse_bootstrap(xds_dir, bootstrap: dict) -> dict:
    done = subprocess.run([sys.executable, "-S", "-c", PARSE], input=json.dumps(bootstrap), capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(xds_dir), "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise AssertionError(f"Envoy rejects the bootstrap:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def rendered_bootstrap(objects: list[dict]) -> dict:
    return yaml.safe_load(by_kind(objects, "ConfigMap")[ENVOY]["data"]["envoy.yaml"])


def descriptor_pool_and_rules() -> tuple[descriptor_pool.DescriptorPool, dict[str, dict[str, object]]]:
    """The descriptor set as Envoy loads it, and every method's google.api.http rule by
    service ({service: {method: HttpRule}})."""
    assert DESCRIPTORS.exists(), "run `make protos`: it writes hearth/descriptors.pb"
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    rules: dict[str, dict[str, object]] = {}
    for f in files.file:
        for service in f.service:
            full = f"{f.package}.{service.name}"
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http):
                    rules.setdefault(full, {})[method.name] = method.options.Extensions[annotations_pb2.http]
    return pool, rules


@pytest.fixture(scope="module")
def enabled(render, xds_protos):
    objects = render(**ENABLED)
    return objects, parse_bootstrap(xds_protos, rendered_bootstrap(objects))


def test_edge_is_opt_in(render):
    objects = render(values_files=(PRODUCTION_VALUES,))
    assert not [o for o in objects if o["metadata"]["name"] == ENVOY]
    env = effective_env(by_kind(objects, "Deployment")[component_name("gateway")], objects)
    assert "HEARTH_EDGE_AUTHORIZER_PORT" not in env
    assert component_name("gateway") + "-edge-authz" not in by_kind(objects, "Service")


def test_strict_parsing_rejects_a_misspelt_field(render, xds_protos):
    bootstrap = rendered_bootstrap(render(**PLAIN))
    bootstrap["static_resources"]["clusters"][0]["conect_timeout"] = "2s"
    with pytest.raises(AssertionError, match="conect_timeout"):
        parse_bootstrap(xds_protos, bootstrap)
    bootstrap = rendered_bootstrap(render(**PLAIN))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["servces"] = []
    with pytest.raises(AssertionError, match="servces"):
        parse_bootstrap(xds_protos, bootstrap)


def test_every_transcoded_service_and_route_names_what_the_descriptor_set_has(enabled):
    _, parsed = enabled
    pool, rules = descriptor_pool_and_rules()
    (listener,) = parsed["listeners"]
    transcoder = listener["filters"]["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["proto_descriptor"] == f"/etc/envoy/descriptors/{gen_protos.DESCRIPTOR_SET}"
    # The transcoder covers exactly the services with annotated (client-facing) methods.
    assert set(transcoder["services"]) == set(rules)
    assert transcoder["request_validation_options"] == {"reject_unknown_method": True,
                                                         "reject_unknown_query_parameters": True}
    clusters = {c["name"]: c for c in parsed["clusters"]}
    routes = {r["prefix"]: r for r in listener["routes"]}
    for service, methods in rules.items():
        descriptor = pool.FindServiceByName(service)
        # Each annotated method's gRPC path is routed to the process that serves it.
        route = routes[f"/{service}/"]
        assert route["cluster"] == SERVED_BY[service.rsplit(".", 1)[0]], service
        assert clusters[route["cluster"]]["http2"], "gRPC upstreams must speak HTTP/2"
        for method_name, rule in methods.items():
            method = descriptor.FindMethodByName(method_name)
            assert method is not None
            pattern = rule.WhichOneof("pattern")
            path = getattr(rule, pattern)
            assert path.startswith("/v1/"), (service, method_name, path)
            # Path variables and the body name fields of the request message.
            fields = method.input_type.fields_by_name
            for variable in re.findall(r"\{([a-z_]+)\}", path):
                assert variable in fields, f"{service}.{method_name}: {{{variable}}} is not a request field"
            assert rule.body in ("", "*") or rule.body in fields
            assert not (pattern == "get" and rule.body), f"{service}.{method_name}: GET with a body"
    # No route points at a service the descriptor set lacks, or at a missing cluster.
    for prefix, route in routes.items():
        pool.FindServiceByName(prefix.strip("/"))
        assert route["cluster"] in clusters
    # Internal RPCs (service-to-service) are not published over HTTP.
    for internal in ("hearth.privacy.v1.Keys", "hearth.common.v1.DataHolder"):
        assert internal not in rules and f"/{internal}/" not in routes
    assert "RecordPrediction" not in rules["hearth.feedback.v1.FeedbackService"]
    assert "AppendAudit" not in rules["hearth.privacy.v1.AuditLog"]
    assert "ListWithdrawnConsent" not in rules["hearth.privacy.v1.Consent"]   # svc:attribution only
    # HTTP paths are unique: two methods on one verb+path would shadow each other.
    seen = [(rule.WhichOneof("pattern"), getattr(rule, rule.WhichOneof("pattern")))
            for methods in rules.values() for rule in methods.values()]
    assert len(seen) == len(set(seen))


def test_clusters_reach_every_pod_of_each_service_over_mutual_tls(enabled):
    _, parsed = enabled
    clusters = {c["name"]: c for c in parsed["clusters"]}
    for component in ("clustering", "attribution", "privacy", "feedback"):
        cluster = clusters[component]
        host = f"{component_name(component)}-headless.{NAMESPACE}.svc.cluster.local"
        assert cluster["addresses"] == [[host, CHART_VALUES["services"][component]["grpcPort"]]]
        assert cluster["grpc_health"]
        tls = cluster["tls"]["common_tls_context"]
        assert tls["validation_context"]["trusted_ca"]["filename"] == "/etc/hearth/tls/mesh/ca.crt"
        assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == "/etc/hearth/tls/mesh/tls.crt"


def test_each_cluster_takes_only_its_own_components_certificate_for_the_service(enabled):
    """A pod of the mesh CA on a hijacked service address is not the service: each cluster
    requires the DNS name hearth-<component> (the name the services read as a peer's
    component) among the upstream's names. Checked against real mesh certificates
    (scripts/certs.py, one per component like the chart's Secrets) with Envoy's rule for
    match_typed_subject_alt_names: accepted when any DNS name matches any matcher."""
    import certs  # scripts/certs.py (on the path above)
    from cryptography import x509

    from services.common.tls import component_of_names

    _, parsed = enabled
    clusters = {c["name"]: c for c in parsed["clusters"]}
    ca_key, ca_cert = certs.make_ca(1)
    dns_names = {name: certs.make_leaf(name, ca_key, ca_cert, 1)[1].extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) for name in certs.DEFAULT_NAMES}
    for component in ("clustering", "attribution", "privacy", "feedback"):
        upstream = clusters[component]["tls"]
        matchers = upstream["common_tls_context"]["validation_context"].get("match_typed_subject_alt_names")
        assert matchers, f"{component}: any certificate of the mesh CA is taken for the service"
        assert all(m["san_type"] == "DNS" and set(m["matcher"]) == {"exact"} for m in matchers)
        accepted = {name for name, names in dns_names.items()
                    if any(m["matcher"]["exact"] in names for m in matchers)}
        assert accepted == {component}
        assert {component_of_names("", [m["matcher"]["exact"]]) for m in matchers} == {component}
        assert upstream["sni"] == f"hearth-{component}"


def test_calls_are_authorized_by_the_gateway_before_routing(enabled):
    objects, parsed = enabled
    (listener,) = parsed["listeners"]
    # Transcode first (so the authorizer sees the gRPC method), authorize, then route.
    assert listener["filter_order"] == ["envoy.filters.http.grpc_json_transcoder", "envoy.filters.http.ext_authz",
                                        "envoy.filters.http.router"]
    authz = listener["filters"]["envoy.filters.http.ext_authz"]
    assert authz.get("failure_mode_allow", False) is False
    service = authz["http_service"]
    assert service["path_prefix"] == AUTHORIZER_PREFIX
    upstream = {p["exact"] for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]}
    assert upstream == {PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY}
    asked = {p["exact"] for p in service["authorization_request"]["allowed_headers"]["patterns"]}
    assert {"x-api-key", "authorization"} <= asked
    clusters = {c["name"]: c for c in parsed["clusters"]}
    authorizer = clusters[service["server_uri"]["cluster"]]
    # The gateway's authorizer listener, through a Service of its own: never the public port.
    authorizer_port = CHART_VALUES["edge"]["authorizerPort"]
    assert authorizer_port not in (CHART_VALUES["gateway"]["port"], CHART_VALUES["gateway"]["service"]["port"])
    gateway_service = f"{component_name('gateway')}-edge-authz.{NAMESPACE}.svc.cluster.local"
    assert authorizer["addresses"] == [[gateway_service, authorizer_port]]
    assert f"-edge-authz.{NAMESPACE}.svc:{authorizer_port}" in service["server_uri"]["uri"]
    assert service["server_uri"]["uri"].startswith("https://")  # the gateway serves HTTPS here
    assert authorizer["tls"]["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == \
        "/etc/envoy/gateway-ca/ca.crt"
    # ... and the gateway serves the authorizer (off unless the edge runs).
    env = effective_env(by_kind(objects, "Deployment")[component_name("gateway")], objects)
    assert env["HEARTH_EDGE_AUTHORIZER_PORT"] == str(authorizer_port)
    deployment = by_kind(objects, "Deployment")[component_name("gateway")]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["edge-authz"] == authorizer_port
    authz_service = by_kind(objects, "Service")[component_name("gateway") + "-edge-authz"]
    assert authz_service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in authz_service["spec"]["ports"]] == [(authorizer_port, "edge-authz")]
    public = by_kind(objects, "Service")[component_name("gateway")]
    assert {p["targetPort"] for p in public["spec"]["ports"]} == {"http"}
    # TLS termination with the edge's Secret; the admin interface stays on loopback.
    tls = listener["tls"]["common_tls_context"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == "/etc/envoy/tls/tls.crt"
    assert parsed["admin"][0] == "127.0.0.1"


def test_plain_render_parses_too(render, xds_protos):
    parsed = parse_bootstrap(xds_protos, rendered_bootstrap(render(**PLAIN)))
    (listener,) = parsed["listeners"]
    assert listener["tls"] is None
    assert all(c["tls"] is None for c in parsed["clusters"])
    authz = listener["filters"]["envoy.filters.http.ext_authz"]["http_service"]
    assert authz["server_uri"]["uri"].startswith("http://")


def test_edge_manifests_validate_and_mount_what_the_bootstrap_reads(render, enabled):
    objects, parsed = enabled
    mine = [o for o in objects if o["metadata"]["name"] == ENVOY]
    assert {o["kind"] for o in mine} == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy",
                                         "PodDisruptionBudget"}
    for obj in mine:
        for version in (TARGET_KUBE_VERSION, MIN_KUBE_VERSION):
            kubernetes_validate.validate(obj, version, strict=True)
    deployment = by_kind(objects, "Deployment")[ENVOY]
    pod = deployment["spec"]["template"]["spec"]
    envoy = container(deployment)
    mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = envoy["command"][envoy["command"].index("-c") + 1].rsplit("/", 1)[0]
    assert volumes[mounts[config_dir]]["configMap"]["name"] == ENVOY
    assert volumes[mounts["/etc/envoy/tls"]]["secret"]["secretName"] == "hearth-edge-tls"
    # The gateway's certificate: Envoy forwards the tokens the gateway's authorizer signs,
    # and a service accepts a token only from the component the peer's certificate names.
    assert volumes[mounts["/etc/hearth/tls/mesh"]]["secret"]["secretName"] == "hearth-mesh-tls-gateway"
    assert volumes[mounts["/etc/envoy/gateway-ca"]]["secret"]["secretName"] == "hearth-https"
    # The init container copies the descriptor set the Hearth image holds into the
    # folder the transcoder reads.
    (init,) = pod["initContainers"]
    assert f'"{gen_protos.DESCRIPTOR_SET}"' in init["command"][-1]
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}["/etc/envoy/descriptors"] == \
        mounts["/etc/envoy/descriptors"]
    assert init["image"] == by_kind(objects, "Deployment")[component_name("clustering")]["spec"]["template"][
        "spec"]["containers"][0]["image"]
    (listener,) = parsed["listeners"]
    assert envoy["ports"] == [{"name": "edge", "containerPort": listener["port"], "protocol": "TCP"}]
    assert pod["serviceAccountName"] == ENVOY and pod["automountServiceAccountToken"] is False
    assert envoy["securityContext"]["readOnlyRootFilesystem"] is True
    # Envoy stops at once on SIGTERM (no drain): without a preStop sleep, a rollout reset
    # the requests load balancers still sent while the endpoint removal propagated.
    command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and float(command[1]) > 0
    assert pod["terminationGracePeriodSeconds"] > float(command[1])


def test_network_policies_let_the_edge_reach_the_services_and_the_authorizer(enabled):
    objects, _ = enabled
    policies = by_kind(objects, "NetworkPolicy")
    for component in ("clustering", "attribution", "privacy", "feedback"):
        first = policies[component_name(component)]["spec"]["ingress"][0]
        callers = {f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                   for f in first["from"]}
        assert "envoy" in callers, component
    # The gateway: its authorizer port admits the Envoy pods and nothing else; Envoy needs
    # (and gets) nothing of the public port.
    authorizer_port = CHART_VALUES["edge"]["authorizerPort"]
    rules = policies[component_name("gateway")]["spec"]["ingress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in rules}
    authz = by_port[authorizer_port]
    assert [p["port"] for p in authz["ports"]] == [authorizer_port]
    (only,) = authz["from"]
    assert list(only) == ["podSelector"]
    assert only["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "envoy"
    public = by_port[CHART_VALUES["gateway"]["port"]]
    callers = {f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
               for f in public.get("from", [])}
    assert "envoy" not in callers
    assert all(authorizer_port not in [p["port"] for p in r["ports"]] for r in rules if r is not authz)
    (rule,) = policies[ENVOY]["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "lb"}}}]
