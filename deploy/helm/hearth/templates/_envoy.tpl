{{/*
The Envoy edge's bootstrap (envoy.config.bootstrap.v3.Bootstrap, YAML). Parsed strictly
into Envoy's own API types by tests/deploy/test_envoy_edge.py (no Envoy binary offline).

Request path: TLS termination (edge.tls.secretName) -> gRPC-JSON transcoder (HTTP/JSON
requests on the protos' google.api.http paths become gRPC calls; native gRPC passes
through) -> ext_authz to the gateway's /v1/edge/authorize on its own port,
edge.authorizerPort, which only Envoy reaches (API key or JWT, permission
matrix; answers the signed mesh metadata the services require) -> router: one cluster
per service, by the gRPC path /<package.Service>/<Method>.
*/}}
{{- define "hearth.envoy.services" -}}
clustering: [hearth.clustering.v1.ClusteringService]
attribution: [hearth.attribution.v1.AttributionService]
privacy: [hearth.privacy.v1.Deletion, hearth.privacy.v1.Consent, hearth.privacy.v1.AuditLog]
feedback: [hearth.feedback.v1.FeedbackService]
{{- end }}

{{- define "hearth.envoy.bootstrap" -}}
{{- $root := . }}
{{- $edge := .Values.edge }}
{{- $services := include "hearth.envoy.services" . | fromYaml }}
{{- $meshTls := .Values.tls.mesh.secretPrefix }}
{{- $gwHttps := .Values.tls.https.secretName }}
{{- $gw := dict "root" . "name" "gateway" }}
admin:
  # Local only: stats and config dumps for `kubectl port-forward`, never the Service.
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ $edge.adminPort }}}
static_resources:
  listeners:
    - name: edge
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $edge.port }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: edge
                codec_type: AUTO
                use_remote_address: true
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: REJECT_REQUEST
                stream_idle_timeout: 300s
                request_timeout: {{ $edge.requestTimeout }}
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        # JSON lines like every Hearth process; the route, never the raw
                        # path with its account ids, and the trace id for correlation.
                        json_format:
                          ts: "%START_TIME%"
                          service: envoy-edge
                          logger: envoy.access
                          method: "%REQ(:METHOD)%"
                          grpc_method: "%REQ(:PATH)%"
                          route: "%ROUTE_NAME%"
                          status: "%RESPONSE_CODE%"
                          grpc_status: "%GRPC_STATUS%"
                          duration_ms: "%DURATION%"
                          trace_id: "%REQ(TRACEPARENT)%"
                route_config:
                  name: hearth
                  virtual_hosts:
                    - name: hearth
                      domains: ["*"]
                      routes:
                        {{- range $component, $names := $services }}
                        {{- range $name := $names }}
                        - name: {{ $name }}
                          match: {prefix: "/{{ $name }}/"}
                          route:
                            cluster: {{ $component }}
                            timeout: {{ $edge.upstreamTimeout }}
                        {{- end }}
                        {{- end }}
                http_filters:
                  - name: envoy.filters.http.grpc_json_transcoder
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
                      proto_descriptor: /etc/envoy/descriptors/descriptors.pb
                      services:
                        {{- range $component, $names := $services }}
                        {{- range $name := $names }}
                        - {{ $name }}
                        {{- end }}
                        {{- end }}
                      print_options:
                        always_print_primitive_fields: true
                        preserve_proto_field_names: true
                      convert_grpc_status: true
                      request_validation_options:
                        reject_unknown_method: true
                        reject_unknown_query_parameters: true
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      # The gateway unreachable: refuse (never let a call through unchecked).
                      failure_mode_allow: false
                      status_on_error: {code: ServiceUnavailable}
                      http_service:
                        server_uri:
                          uri: {{ printf "%s://%s-edge-authz.%s.svc:%v" (ternary "https" "http" (not (empty $gwHttps))) (include "hearth.componentName" $gw) .Release.Namespace $edge.authorizerPort }}
                          cluster: gateway-authorizer
                          timeout: {{ $edge.authorizerTimeout }}
                        path_prefix: /v1/edge/authorize
                        authorization_request:
                          allowed_headers:
                            patterns:
                              - {exact: x-api-key, ignore_case: true}
                              - {exact: authorization, ignore_case: true}
                              - {exact: traceparent, ignore_case: true}
                        authorization_response:
                          allowed_upstream_headers:
                            patterns:
                              - {exact: x-hearth-principal, ignore_case: true}
                              - {exact: x-hearth-role, ignore_case: true}
                              - {exact: x-hearth-token, ignore_case: true}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          {{- if $edge.tls.secretName }}
          transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              common_tls_context:
                alpn_protocols: [h2, http/1.1]
                tls_params: {tls_minimum_protocol_version: TLSv1_2}
                tls_certificates:
                  - certificate_chain: {filename: /etc/envoy/tls/tls.crt}
                    private_key: {filename: /etc/envoy/tls/tls.key}
          {{- end }}
  clusters:
    {{- range $component, $names := $services }}
    {{- $svc := index $root.Values.services $component }}
    {{- $ctx := dict "root" $root "name" $component }}
    # Every pod of the service (headless Service): Envoy balances per request.
    - name: {{ $component }}
      type: STRICT_DNS
      connect_timeout: 2s
      lb_policy: ROUND_ROBIN
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      health_checks:
        - timeout: 2s
          interval: 10s
          unhealthy_threshold: 2
          healthy_threshold: 1
          grpc_health_check: {}
      load_assignment:
        cluster_name: {{ $component }}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {{ printf "%s-headless.%s.svc.%s" (include "hearth.componentName" $ctx) $root.Release.Namespace $root.Values.mesh.clusterDomain }}
                      port_value: {{ $svc.grpcPort }}
      {{- if $meshTls }}
      # Mutual TLS to the services with the gateway's mesh certificate: Envoy forwards the
      # tokens the gateway's authorizer signs, and a service accepts a token only from the
      # component the peer's certificate names. The upstream must be the component the
      # cluster routes to: its certificate names hearth-<component> (the name the services
      # read as the peer's component, services/common/tls.py), so another pod of the mesh
      # CA on a hijacked address is refused before any token reaches it.
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {{ printf "hearth-%s" $component }}
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {filename: /etc/hearth/tls/mesh/tls.crt}
                private_key: {filename: /etc/hearth/tls/mesh/tls.key}
            validation_context:
              trusted_ca: {filename: /etc/hearth/tls/mesh/ca.crt}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {exact: {{ printf "hearth-%s" $component }}}
      {{- end }}
    {{- end }}
    - name: gateway-authorizer
      type: STRICT_DNS
      connect_timeout: 2s
      lb_policy: ROUND_ROBIN
      load_assignment:
        cluster_name: gateway-authorizer
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      # The gateway's authorizer listener (edge.authorizerPort), never its public port.
                      address: {{ printf "%s-edge-authz.%s.svc.%s" (include "hearth.componentName" $gw) .Release.Namespace .Values.mesh.clusterDomain }}
                      port_value: {{ $edge.authorizerPort }}
      {{- if $gwHttps }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {{ printf "%s.%s.svc" (include "hearth.componentName" $gw) .Release.Namespace }}
          common_tls_context:
            validation_context:
              trusted_ca: {filename: /etc/envoy/gateway-ca/ca.crt}
      {{- end }}
{{- end }}
