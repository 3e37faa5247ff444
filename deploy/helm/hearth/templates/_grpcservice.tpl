{{/*
One gRPC service: Deployment, Service (ClusterIP, scraped), headless Service (every pod
IP, for client-side balancing), HorizontalPodAutoscaler and PodDisruptionBudget.
Called from <service>.yaml as: include "hearth.grpcService" (dict "root" $ "name" "clustering")
*/}}
{{- define "hearth.grpcService" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $svc := index $root.Values.services $name }}
{{- $ctx := dict "root" $root "name" $name "component" $svc "metricsPort" $svc.metricsPort }}
{{- $probes := $root.Values.grpcProbes }}
{{- /* With mesh TLS the service port wants a client certificate, which the kubelet's
     gRPC probes cannot give: they go to the plaintext health-only port. */}}
{{- $probePort := ternary $probes.healthPort $svc.grpcPort (not (empty $root.Values.tls.mesh.secretPrefix)) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "hearth.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not $svc.autoscaling.enabled }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Start the new pod before stopping an old one: capacity never drops in a rollout.
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "hearth.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      {{- include "hearth.podMetadata" $ctx | trim | nindent 6 }}
    spec:
      {{- include "hearth.podCommon" $ctx | trim | nindent 6 }}
      containers:
        - name: {{ $name }}
          image: {{ include "hearth.image" $ctx | quote }}
          imagePullPolicy: {{ ($svc.image | default dict).pullPolicy | default $root.Values.image.pullPolicy }}
          command: ["python", "-m", "services.{{ $name }}"]
          ports:
            - name: grpc
              containerPort: {{ $svc.grpcPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $svc.metricsPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "hearth.fullname" $root }}-config
          env:
            - name: HEARTH_GRPC_PORT
              value: {{ $svc.grpcPort | quote }}
            - name: HEARTH_METRICS_PORT
              value: {{ $svc.metricsPort | quote }}
            {{- if $root.Values.tls.mesh.secretPrefix }}
            - name: HEARTH_HEALTH_PORT
              value: {{ $probes.healthPort | quote }}
            {{- end }}
            {{- include "hearth.commonEnv" $ctx | trim | nindent 12 }}
            {{- include "hearth.tlsEnv" $ctx | nindent 12 }}
            {{- include "hearth.signingEnv" $ctx | nindent 12 }}
            {{- if and (eq $name "privacy") $svc.keys $svc.keys.secretName }}
            - name: HEARTH_RECEIPT_SIGNING_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $svc.keys.secretName }}
                  key: {{ $svc.keys.receiptSigningKeyKey }}
            - name: HEARTH_AUDIT_SIGNING_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $svc.keys.secretName }}
                  key: {{ $svc.keys.auditSigningKeyKey }}
            - name: HEARTH_KEKS
              valueFrom:
                secretKeyRef:
                  name: {{ $svc.keys.secretName }}
                  key: {{ $svc.keys.keksKey }}
            {{- with $svc.keys.activeKek }}
            - name: HEARTH_ACTIVE_KEK
              value: {{ . | quote }}
            {{- end }}
            {{- end }}
            {{- if and (eq $name "privacy") $svc.bulkReaders }}
            - name: HEARTH_AUDIT_BULK_READERS
              value: {{ $svc.bulkReaders | toJson | quote }}
            {{- end }}
          startupProbe:
            grpc:
              port: {{ $probePort }}
              service: liveness
            {{- toYaml $probes.startup | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            {{- toYaml $probes.readiness | nindent 12 }}
          livenessProbe:
            grpc:
              port: {{ $probePort }}
              service: liveness
            {{- toYaml $probes.liveness | nindent 12 }}
          {{- include "hearth.lifecycle" $root | trim | nindent 10 }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: data
              mountPath: /var/lib/hearth
            {{- include "hearth.tlsVolumeMounts" $ctx | nindent 12 }}
            {{- include "hearth.signingVolumeMounts" $ctx | nindent 12 }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.tmpSizeLimit }}
        - name: data
          emptyDir:
            sizeLimit: {{ $root.Values.storage.dataDir.sizeLimit }}
        {{- include "hearth.tlsVolumes" $ctx | nindent 8 }}
        {{- include "hearth.signingVolumes" $ctx | nindent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "hearth.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" $ctx | nindent 4 }}
    hearth.io/scrape: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "hearth.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $svc.grpcPort }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $svc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "hearth.componentName" $ctx }}-headless
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "hearth.componentLabels" $ctx | nindent 4 }}
spec:
  # Headless: DNS returns every ready pod IP, so a gRPC client with the round_robin
  # policy spreads calls over pods (a ClusterIP pins one channel to one pod).
  clusterIP: None
  selector:
    {{- include "hearth.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $svc.grpcPort }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{ include "hearth.hpa" $ctx }}
{{ include "hearth.pdb" $ctx }}
{{- end }}
