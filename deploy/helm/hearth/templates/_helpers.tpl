{{/*
Common names, labels and pod parts. Components: clustering, attribution, privacy,
feedback (gRPC services, under .Values.services) and gateway (.Values.gateway).
Helpers that need a component take a dict: (dict "root" $ "name" "clustering").
*/}}

{{- define "hearth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-wide prefix (<= 42 chars, so that the longest object name,
"<fullname>-attribution-headless", stays within the 63 of a DNS label). */}}
{{- define "hearth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hearth.componentName" -}}
{{- printf "%s-%s" (include "hearth.fullname" .root) .name }}
{{- end }}

{{- define "hearth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "hearth.labels" -}}
helm.sh/chart: {{ include "hearth.chart" . }}
app.kubernetes.io/name: {{ include "hearth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hearth
{{- end }}

{{/* Selector labels of one component (immutable on a Deployment: keep them minimal). */}}
{{- define "hearth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hearth.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "hearth.componentLabels" -}}
{{ include "hearth.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The values block of a component. */}}
{{- define "hearth.componentValues" -}}
{{- if eq .name "gateway" }}{{ toYaml .root.Values.gateway }}{{ else }}{{ toYaml (index .root.Values.services .name) }}{{ end }}
{{- end }}

{{/* One ServiceAccount per component (ctx: root, name): a workload identity of its own
     for cloud IAM bindings and audit; none of them may call the Kubernetes API. */}}
{{- define "hearth.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- include "hearth.componentName" . }}
{{- else }}
{{- default "default" .root.Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Components that get a ServiceAccount (and a NetworkPolicy). */}}
{{- define "hearth.components" -}}
clustering attribution privacy feedback gateway
{{- end }}

{{/* Mesh TLS (HEARTH_TLS_*) and gateway HTTPS (HEARTH_HTTPS_*) from mounted Secrets. The
mesh certificate is the component's own, Secret <tls.mesh.secretPrefix>-<component>, mounted
in its pods only: a service accepts a token only from the component the certificate names
(services/common/identity.py), so one certificate in every pod would let any pod pass for
any component. */}}
{{- define "hearth.tlsEnv" -}}
{{- if .root.Values.tls.mesh.secretPrefix }}
- name: HEARTH_TLS_CERT
  value: /etc/hearth/tls/mesh/tls.crt
- name: HEARTH_TLS_KEY
  value: /etc/hearth/tls/mesh/tls.key
- name: HEARTH_TLS_CA
  value: /etc/hearth/tls/mesh/ca.crt
{{- end }}
{{- if and (eq .name "gateway") .root.Values.tls.https.secretName }}
- name: HEARTH_HTTPS_CERT
  value: /etc/hearth/tls/https/tls.crt
- name: HEARTH_HTTPS_KEY
  value: /etc/hearth/tls/https/tls.key
{{- end }}
{{- end }}

{{- define "hearth.tlsVolumeMounts" -}}
{{- if .root.Values.tls.mesh.secretPrefix }}
- name: mesh-tls
  mountPath: /etc/hearth/tls/mesh
  readOnly: true
{{- end }}
{{- if and (eq .name "gateway") .root.Values.tls.https.secretName }}
- name: https-tls
  mountPath: /etc/hearth/tls/https
  readOnly: true
{{- end }}
{{- end }}

{{- define "hearth.tlsVolumes" -}}
{{- if .root.Values.tls.mesh.secretPrefix }}
- name: mesh-tls
  secret:
    secretName: {{ printf "%s-%s" .root.Values.tls.mesh.secretPrefix .name }}
    defaultMode: 0440
{{- end }}
{{- if and (eq .name "gateway") .root.Values.tls.https.secretName }}
- name: https-tls
  secret:
    secretName: {{ .root.Values.tls.https.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* A signing key per component (services/common/service_keys.py): the component's own
Ed25519 private key from Secret <serviceKeys.secretPrefix>-<component>, mounted in its
own pods only, and every component's public key from one ConfigMap, mounted in all. */}}
{{- define "hearth.signingEnv" -}}
- name: HEARTH_SERVICE_SIGNING_KEY_FILE
  value: /etc/hearth/signing/{{ .root.Values.serviceKeys.secretKey }}
- name: HEARTH_SERVICE_PUBLIC_KEYS_FILE
  value: /etc/hearth/public-keys/{{ .root.Values.serviceKeys.publicKeysKey }}
{{- end }}

{{- define "hearth.signingVolumeMounts" -}}
- name: signing-key
  mountPath: /etc/hearth/signing
  readOnly: true
- name: public-keys
  mountPath: /etc/hearth/public-keys
  readOnly: true
{{- end }}

{{- define "hearth.signingVolumes" -}}
- name: signing-key
  secret:
    secretName: {{ printf "%s-%s" .root.Values.serviceKeys.secretPrefix .name }}
    defaultMode: 0440
    items:
      - key: {{ .root.Values.serviceKeys.secretKey }}
        path: {{ .root.Values.serviceKeys.secretKey }}
- name: public-keys
  configMap:
    name: {{ .root.Values.serviceKeys.publicKeysConfigMap }}
    items:
      - key: {{ .root.Values.serviceKeys.publicKeysKey }}
        path: {{ .root.Values.serviceKeys.publicKeysKey }}
{{- end }}

{{/* repository[:tag][@digest]; a component's image block overrides the shared one. */}}
{{- define "hearth.image" -}}
{{- $img := merge (dict) (.component.image | default dict) .root.Values.image }}
{{- $tag := $img.tag | default .root.Chart.AppVersion | toString }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/* Where the gateway and peers reach a gRPC service. */}}
{{- define "hearth.peerAddress" -}}
{{- $svc := index .root.Values.services .name }}
{{- if .root.Values.mesh.clientSideBalancing }}
{{- printf "dns:///%s-headless.%s.svc.%s:%v" (include "hearth.componentName" .) .root.Release.Namespace .root.Values.mesh.clusterDomain $svc.grpcPort }}
{{- else }}
{{- printf "%s:%v" (include "hearth.componentName" .) $svc.grpcPort }}
{{- end }}
{{- end }}

{{- define "hearth.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add (int $s.preStopSleepSeconds) (int (ceil $s.graceSeconds)) (int $s.marginSeconds) }}
{{- end }}

{{/*
Chart-wide checks, run once (from configmap.yaml). Refusing a bad combination at
render time is cheaper than discovering it in a running cluster.
*/}}
{{- define "hearth.validate" -}}
{{- $backend := .Values.storage.backend }}
{{- if not (has $backend (list "postgres" "sqlite")) }}
{{- fail (printf "storage.backend must be postgres or sqlite, got %q" $backend) }}
{{- end }}
{{- if eq $backend "postgres" }}
{{- $own := include "hearth.postgresOwnLogins" . | int }}
{{- if and (gt $own 0) (lt $own 4) }}
{{- fail "storage.postgres.services: set existingSecret for all four services (clustering, attribution, privacy, feedback) or for none: a service left on the shared login reaches every schema" }}
{{- end }}
{{- if and (eq $own 0) (not (and .Values.storage.postgres.secretName .Values.storage.postgres.secretKey)) }}
{{- fail "storage.postgres.secretName and storage.postgres.secretKey are required with storage.backend=postgres (or storage.postgres.services.<service>.existingSecret for each service)" }}
{{- end }}
{{- with .Values.storage.postgres.provisionRoles }}
{{- if and .enabled (or (ne $own 4) (not .adminSecretName) (not .adminSecretKey)) }}
{{- fail "storage.postgres.provisionRoles: needs storage.postgres.services.<service>.existingSecret for every service and adminSecretName/adminSecretKey (a superuser's DSN, or a managed server's CREATEROLE admin's)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $backend "postgres" }}
{{- $keys := .Values.services.privacy.keys | default dict }}
{{- if not (and $keys.secretName $keys.receiptSigningKeyKey $keys.auditSigningKeyKey $keys.keksKey) }}
{{- fail "services.privacy.keys.secretName, .receiptSigningKeyKey, .auditSigningKeyKey and .keksKey are required with storage.backend=postgres: otherwise every privacy pod generates keys of its own" }}
{{- end }}
{{- end }}
{{- if eq $backend "sqlite" }}
{{- range $name, $svc := .Values.services }}
{{- if or (gt (int $svc.replicas) 1) $svc.autoscaling.enabled }}
{{- fail (printf "services.%s: storage.backend=sqlite allows one replica and no autoscaling (each pod would hold its own copy of the data); use postgres to scale" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (and .Values.serviceToken.secretName .Values.serviceToken.secretKey) }}
{{- fail "serviceToken.secretName and serviceToken.secretKey are required: the key of the log pseudonyms, one for every pod" }}
{{- end }}
{{- with .Values.serviceKeys }}
{{- if not (and .secretPrefix .secretKey .publicKeysConfigMap .publicKeysKey) }}
{{- fail "serviceKeys.secretPrefix, .secretKey, .publicKeysConfigMap and .publicKeysKey are required: each component signs the principal with its own key" }}
{{- end }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- if not (and .Values.redis.secretName .Values.redis.secretKey) }}
{{- fail "redis.secretName and redis.secretKey are required with redis.enabled=true" }}
{{- end }}
{{- end }}
{{- $s := .Values.shutdown }}
{{- if or (lt (float64 $s.preStopSleepSeconds) 0.0) (le (float64 $s.graceSeconds) 0.0) (lt (float64 $s.marginSeconds) 0.0) }}
{{- fail "shutdown: preStopSleepSeconds and marginSeconds must be >= 0, graceSeconds > 0" }}
{{- end }}
{{- $ports := dict }}
{{- range $name, $svc := .Values.services }}
{{- if not (has $name (list "clustering" "attribution" "privacy" "feedback")) }}
{{- fail (printf "services.%s: unknown service (expected clustering, attribution, privacy, feedback)" $name) }}
{{- end }}
{{- range $kind := list "grpcPort" "metricsPort" }}
{{- $port := int (index $svc $kind) }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "services.%s.%s must be a port in 1..65535" $name $kind) }}
{{- end }}
{{- end }}
{{- if eq (int $svc.grpcPort) (int $svc.metricsPort) }}
{{- fail (printf "services.%s: grpcPort and metricsPort must differ" $name) }}
{{- end }}
{{- end }}
{{- range $name := list "clustering" "attribution" "privacy" "feedback" "gateway" }}
{{- $c := include "hearth.componentValues" (dict "root" $ "name" $name) | fromYaml }}
{{- if $c.autoscaling.enabled }}
{{- if gt (int $c.autoscaling.minReplicas) (int $c.autoscaling.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas must be <= maxReplicas" $name) }}
{{- end }}
{{- if not (and $c.resources $c.resources.requests $c.resources.requests.cpu) }}
{{- fail (printf "%s: autoscaling on CPU utilisation needs resources.requests.cpu" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* How many services have a login of their own (storage.postgres.services.<service>.existingSecret). */}}
{{- define "hearth.postgresOwnLogins" -}}
{{- $n := 0 }}
{{- range $name := list "clustering" "attribution" "privacy" "feedback" }}
{{- if (index ($.Values.storage.postgres.services | default dict) $name | default dict).existingSecret }}{{ $n = add1 $n }}{{ end }}
{{- end }}
{{- $n }}
{{- end }}

{{/* The secretKeyRef (name, key) of service .name's DSN: its own Secret when set (a login
per service, docs/operations.md "Database roles"), else the shared storage.postgres one. */}}
{{- define "hearth.postgresDsnRef" -}}
{{- $pg := .root.Values.storage.postgres }}
{{- $own := index ($pg.services | default dict) .name | default dict }}
{{- if $own.existingSecret }}
name: {{ $own.existingSecret }}
key: {{ $own.secretKey | default "dsn" }}
{{- else }}
name: {{ $pg.secretName }}
key: {{ $pg.secretKey }}
{{- end }}
{{- end }}

{{/* Env of every Hearth container: storage, secrets, shutdown, extra values. The
gateway opens no database: it gets neither the backend nor the DSN, whose credentials
read and write every service's schema (attack27: the internet-facing pod held them). */}}
{{- define "hearth.commonEnv" -}}
{{- $root := .root }}
{{- if ne .name "gateway" }}
- name: HEARTH_STORAGE
  value: {{ $root.Values.storage.backend | quote }}
{{- end }}
{{- if and (eq $root.Values.storage.backend "postgres") (ne .name "gateway") }}
- name: HEARTH_POSTGRES_DSN
  valueFrom:
    secretKeyRef:
      {{- include "hearth.postgresDsnRef" (dict "root" $root "name" .name) | trim | nindent 6 }}
{{- end }}
{{- if $root.Values.redis.enabled }}
- name: HEARTH_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- /* The gateway only needs its rate-limit buckets: a login of its own (attack28). */}}
      name: {{ if and (eq .name "gateway") $root.Values.redis.gatewaySecretName }}{{ $root.Values.redis.gatewaySecretName }}{{ else }}{{ $root.Values.redis.secretName }}{{ end }}
      key: {{ $root.Values.redis.secretKey }}
{{- end }}
# The shared secret of sessions <= 18 no longer signs anything (each component has its
# own key, hearth.signingEnv); it keys the log pseudonyms, which stay what they were.
- name: HEARTH_LOG_PSEUDONYM_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.serviceToken.secretName }}
      key: {{ $root.Values.serviceToken.secretKey }}
- name: HEARTH_GRACE_SECONDS
  value: {{ $root.Values.shutdown.graceSeconds | quote }}
{{- range $name, $value := .component.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- range .component.secretEnv }}
- name: {{ required "secretEnv[].name is required" .name }}
  valueFrom:
    secretKeyRef:
      name: {{ required "secretEnv[].secretName is required" .secretName }}
      key: {{ required "secretEnv[].secretKey is required" .secretKey }}
{{- end }}
{{- end }}

{{/* Pod template metadata shared by every component. */}}
{{- define "hearth.podMetadata" -}}
labels:
  {{- include "hearth.selectorLabels" . | nindent 2 }}
  app.kubernetes.io/part-of: hearth
  app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  # Roll the pods when the shared ConfigMap changes.
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .metricsPort | quote }}
  prometheus.io/path: /metrics
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pod spec fields shared by every component (before containers). */}}
{{- define "hearth.podCommon" -}}
{{- $root := .root }}
serviceAccountName: {{ include "hearth.serviceAccountName" . }}
# The services never call the Kubernetes API.
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ include "hearth.terminationGracePeriodSeconds" $root }}
{{- with (.component.nodeSelector | default $root.Values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.component.tolerations | default $root.Values.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.component.affinity | default $root.Values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $root.Values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
    topologyKey: {{ $key }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "hearth.selectorLabels" (dict "root" $root "name" $.name) | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* preStop: keep serving while endpoints propagate, then SIGTERM starts the drain. */}}
{{- define "hearth.lifecycle" -}}
{{- if gt (float64 .Values.shutdown.preStopSleepSeconds) 0.0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.shutdown.preStopSleepSeconds | toString | quote }}]
{{- end }}
{{- end }}

{{- define "hearth.hpa" -}}
{{- $c := .component }}
{{- if $c.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "hearth.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "hearth.componentName" . }}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $c.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $c.autoscaling.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  behavior:
    # Scale up fast, scale down slowly: a retrain or a burst of events should not
    # flap replicas (each new pod warms its caches from SQL).
    scaleUp:
      stabilizationWindowSeconds: 0
      policies:
        - {type: Percent, value: 100, periodSeconds: 30}
    scaleDown:
      stabilizationWindowSeconds: 300
      policies:
        - {type: Pods, value: 1, periodSeconds: 60}
{{- end }}
{{- end }}

{{- define "hearth.pdb" -}}
{{- $c := .component }}
{{- if $c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "hearth.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" . | nindent 4 }}
spec:
  # maxUnavailable, not minAvailable: with one replica a minAvailable of 1 would block
  # every node drain; maxUnavailable 1 lets drains proceed one pod at a time.
  maxUnavailable: {{ $c.pdb.maxUnavailable | default 1 }}
  selector:
    matchLabels:
      {{- include "hearth.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Who may scrape the metrics ports: networkPolicy.metricsFrom, never empty. An empty `from`
in a NetworkPolicy rule admits every pod of every namespace, and until session 31 `[]` was
the default (production values included): erasure counts, authentication failures and
dependency health readable from any pod. Whoever truly wants that writes it out:
[{namespaceSelector: {}}].
*/}}
{{- define "hearth.metricsFrom" -}}
{{- if not .Values.networkPolicy.metricsFrom }}
{{- fail "networkPolicy.metricsFrom is empty, which would let every pod of every namespace read the metrics ports: list Prometheus's namespace and pods (the default is kube-prometheus-stack's: namespace monitoring, pods app.kubernetes.io/name=prometheus), or write [{namespaceSelector: {}}] to admit every pod on purpose" }}
{{- end }}
{{- toYaml .Values.networkPolicy.metricsFrom }}
{{- end }}

{{/*
The `from` of a public port's rule, given as `anyone` or a list of NetworkPolicy peers (ctx:
value, path, hint: who usually goes in the list): "" for anyone (a rule without `from`:
every pod and every address outside the cluster), else the list as YAML. `[]` is refused:
until session 32 it was the default and meant anyone, so an SRE emptying the list to
"close" the port opened it to every pod and every address.
*/}}
{{- define "hearth.fromOrAnyone" -}}
{{- if kindIs "string" .value }}
{{- if ne .value "anyone" }}
{{- fail (printf "%s must be `anyone` or a list of NetworkPolicy peers, got %q" .path .value) }}
{{- end }}
{{- else if not .value }}
{{- fail (printf "%s is empty: write `anyone` to admit every pod and every address outside the cluster, or list who may connect (%s); [] no longer means anyone" .path .hint) }}
{{- else }}
{{- toYaml .value }}
{{- end }}
{{- end }}

{{/*
Who may reach the gateway's HTTP port (networkPolicy.gatewayFrom, hearth.fromOrAnyone): ""
for anyone, else the operator's entries, then the chart's own callers of that port that
are on (the rollout webhook, the `helm test` pod).
*/}}
{{- define "hearth.gatewayFrom" -}}
{{- with include "hearth.fromOrAnyone" (dict "value" .Values.networkPolicy.gatewayFrom "path" "networkPolicy.gatewayFrom" "hint" "e.g. the ingress controller's namespace; the gateway authenticates each request, hence the default anyone") }}
{{- . }}
{{- if $.Values.rolloutWebhook.enabled }}
# The rollback webhook sets the kill switch through the gateway.
- podSelector:
    matchLabels:
      {{- include "hearth.selectorLabels" (dict "root" $ "name" "rollout-webhook") | nindent 6 }}
{{- end }}
{{- if $.Values.tests.enabled }}
# `helm test`: the pod asking /health.
- podSelector:
    matchLabels:
      {{- include "hearth.selectorLabels" (dict "root" $ "name" "test") | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The `to` of an egress rule to one external dependency (ctx: root, name: dns | postgres |
redis | otlp, why: who needs it), from networkPolicy.egress.<name>.to. Never empty: a rule
whose `to` is empty admits every address on its port, and the chart cannot guess the
address (it lives in a Secret or a host name), so it refuses to render naming the value
rather than render a policy that silently admits everything or, worse, nothing.
*/}}
{{- define "hearth.egressTo" -}}
{{- $dep := index .root.Values.networkPolicy.egress .name }}
{{- if not $dep.to }}
{{- fail (printf "networkPolicy.egress.%s.to is empty, but networkPolicy.egress.enabled and %s; list its address (an ipBlock, or namespace/pod selectors) and set networkPolicy.egress.%s.port, or turn networkPolicy.egress.enabled off" .name .why .name) }}
{{- end }}
{{- toYaml $dep.to }}
{{- end }}

{{/* An egress rule to an external dependency (ctx as hearth.egressTo). */}}
{{- define "hearth.egressDependencyRule" -}}
{{- $dep := index .root.Values.networkPolicy.egress .name }}
- to:
    {{- include "hearth.egressTo" . | nindent 4 }}
  ports:
    {{- if eq .name "dns" }}
    - port: {{ $dep.port }}
      protocol: UDP
    {{- end }}
    - port: {{ $dep.port }}
      protocol: TCP
{{- end }}

{{/*
One pod kind's egress NetworkPolicy (ctx: root, name: the pods' component label,
peers: list of dict(name, port) — the release's pods it calls, deps: the external
dependencies it uses, each dict(name, why)). DNS always: every address is a name.
*/}}
{{- define "hearth.egressPolicy" -}}
{{- $root := .root }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "hearth.componentName" . }}-egress
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "hearth.selectorLabels" . | nindent 6 }}
  policyTypes: [Egress]
  egress:
    {{- include "hearth.egressDependencyRule" (dict "root" $root "name" "dns" "why" "every pod resolves the names it connects to") | trim | nindent 4 }}
    {{- range $peer := .peers }}
    - to:
        - podSelector:
            matchLabels:
              {{- include "hearth.selectorLabels" (dict "root" $root "name" $peer.name) | nindent 14 }}
      ports:
        - port: {{ $peer.port }}
          protocol: TCP
    {{- end }}
    {{- range $dep := .deps }}
    {{- include "hearth.egressDependencyRule" (dict "root" $root "name" $dep.name "why" $dep.why) | trim | nindent 4 }}
    {{- end }}
{{- end }}
