{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "etha-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "etha-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "etha-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etha-operator.labels" -}}
helm.sh/chart: {{ include "etha-operator.chart" . }}
app.kubernetes.io/name: {{ include "etha-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: etha
{{- end }}

{{/* Selector labels of the operator pod (immutable once installed). */}}
{{- define "etha-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "etha-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the gateway pods. */}}
{{- define "etha-operator.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "etha-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Selector labels of the bundled etcd pod. */}}
{{- define "etha-operator.etcdSelectorLabels" -}}
app.kubernetes.io/name: {{ include "etha-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: etcd
{{- end }}

{{- define "etha-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "etha-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "etha-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "etha-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "etha-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etha-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "etha-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etha-operator.gatewayName" -}}
{{- printf "%s-gateway" (include "etha-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etha-operator.gatewayTLSSecretName" -}}
{{- printf "%s-tls" (include "etha-operator.gatewayName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etha-operator.gatewayTokenSecretName" -}}
{{- printf "%s-token-key" (include "etha-operator.gatewayName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret with the gateway's etcd user and password: the user's, or the chart's. */}}
{{- define "etha-operator.gatewayEtcdSecretName" -}}
{{- if .Values.gateway.etcdCredentials.secretName }}
{{- .Values.gateway.etcdCredentials.secretName }}
{{- else }}
{{- printf "%s-etcd" (include "etha-operator.gatewayName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Comma list of the gateway endpoints written into the workers' Secrets. */}}
{{- define "etha-operator.gatewayEndpoints" -}}
{{- if .Values.gateway.workerEndpoints }}
{{- join "," .Values.gateway.workerEndpoints }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.gateway.tls.enabled) (include "etha-operator.gatewayName" .) .Release.Namespace (int .Values.gateway.port) }}
{{- end }}
{{- end }}

{{/* "1Gi" -> bytes (binary and decimal suffixes, as Kubernetes quantities). */}}
{{- define "etha-operator.bytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $n := $q }}
{{- $mult := 1 }}
{{- range $suffix, $factor := $units }}
{{- if hasSuffix $suffix $q }}
{{- $n = trimSuffix $suffix $q }}
{{- $mult = $factor }}
{{- end }}
{{- end }}
{{- mulf (float64 $n) $mult | int64 }}
{{- end }}

{{- define "etha-operator.etcdName" -}}
{{- printf "%s-etcd" (include "etha-operator.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* Client URL of the bundled etcd, resolvable from every namespace. */}}
{{- define "etha-operator.bundledEtcdURL" -}}
{{- printf "http://%s.%s.svc:2379" (include "etha-operator.etcdName" .) .Release.Namespace }}
{{- end }}

{{/* Comma list of the endpoints the operator uses. */}}
{{- define "etha-operator.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled }}
{{- include "etha-operator.bundledEtcdURL" . }}
{{- else }}
{{- join "," .Values.etcd.endpoints }}
{{- end }}
{{- end }}

{{/* Comma list of the endpoints written into the workers' Secrets. */}}
{{- define "etha-operator.workerEndpoints" -}}
{{- if .Values.etcd.workerEndpoints }}
{{- join "," .Values.etcd.workerEndpoints }}
{{- else }}
{{- include "etha-operator.etcdEndpoints" . }}
{{- end }}
{{- end }}

{{/* The Secret with etcd's root credentials: the user's, or the one the chart generates for the bundled etcd. */}}
{{- define "etha-operator.rootSecretName" -}}
{{- if .Values.etcd.rootCredentials.secretName }}
{{- .Values.etcd.rootCredentials.secretName }}
{{- else }}
{{- printf "%s-root" (include "etha-operator.etcdName" .) }}
{{- end }}
{{- end }}

{{/* Pod-level security context of the restricted Pod Security Standard. */}}
{{- define "etha-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context of the restricted Pod Security Standard. */}}
{{- define "etha-operator.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Value combinations the schema cannot express in a readable way. */}}
{{- define "etha-operator.validate" -}}
{{- if not .Values.etcd.bundled.enabled }}
{{- if not .Values.etcd.endpoints }}
{{- fail "etcd.endpoints is required when etcd.bundled.enabled is false: list your etcd cluster's client URLs" }}
{{- end }}
{{- if not .Values.etcd.rootCredentials.secretName }}
{{- fail "etcd.rootCredentials.secretName is required when etcd.bundled.enabled is false: create a Secret with the etcd root user's password first" }}
{{- end }}
{{- else }}
{{- if .Values.etcd.endpoints }}
{{- fail "etcd.endpoints must stay empty while etcd.bundled.enabled is true (the chart points the operator at the bundled etcd)" }}
{{- end }}
{{- if .Values.etcd.tls.enabled }}
{{- fail "etcd.tls applies to an external etcd cluster; the bundled etcd serves plain HTTP inside the cluster" }}
{{- end }}
{{- end }}
{{- if and .Values.etcd.tls.enabled (not .Values.etcd.tls.secretName) }}
{{- fail "etcd.tls.secretName is required when etcd.tls.enabled is true" }}
{{- end }}
{{- if and .Values.etcd.tls.clientCert (not .Values.etcd.tls.enabled) }}
{{- fail "etcd.tls.clientCert needs etcd.tls.enabled" }}
{{- end }}
{{- if .Values.etcd.bundled.enabled }}
{{- $b := .Values.etcd.bundled }}
{{- $volume := include "etha-operator.bytes" $b.persistence.size | int64 }}
{{- if gt (mul (int64 $b.quotaBackendBytes) 4) (mul $volume 3) }}
{{- fail (printf "etcd.bundled.quotaBackendBytes (%d) must leave a quarter of etcd.bundled.persistence.size (%s = %d bytes) free for etcd's write-ahead log and snapshots: lower the quota or grow the volume" (int64 $b.quotaBackendBytes) $b.persistence.size $volume) }}
{{- end }}
{{- end }}
{{- if eq .Values.mode "gateway" }}
{{- if and (not .Values.etcd.bundled.enabled) (not .Values.gateway.etcdCredentials.secretName) }}
{{- fail "gateway.etcdCredentials.secretName is required with an external etcd: create the gateway's etcd user (docs/install.md) and a Secret with its username and password" }}
{{- end }}
{{- if .Values.operator.allowUnsafeDirect }}
{{- fail "operator.allowUnsafeDirect applies to mode: direct only" }}
{{- end }}
{{- if .Values.etcd.workerEndpoints }}
{{- fail "etcd.workerEndpoints applies to mode: direct only; in gateway mode workers get the gateway (gateway.workerEndpoints)" }}
{{- end }}
{{- else }}
{{- if .Values.gateway.workerEndpoints }}
{{- fail "gateway.workerEndpoints applies to mode: gateway only; in direct mode workers get etcd.workerEndpoints" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The shipped job kinds jobKinds.shipped enables, as a JSON list of table entries in
     the shipped order; a name that is no shipped kind's <plural>.<group> fails. */}}
{{- define "etha-operator.shippedJobKinds" -}}
{{- $all := .Files.Get "files/jobkinds.json" | fromJsonArray }}
{{- $known := list }}
{{- range $k := $all }}{{ $known = append $known (printf "%s.%s" $k.plural $k.group) }}{{ end }}
{{- range $n := .Values.jobKinds.shipped }}
{{- if not (has $n $known) }}
{{- fail (printf "jobKinds.shipped: %q is not a shipped job kind; shipped: %s (add other kinds through jobKinds.extra)" $n (join ", " $known)) }}
{{- end }}
{{- end }}
{{- $out := list }}
{{- range $k := $all }}
{{- if has (printf "%s.%s" $k.plural $k.group) $.Values.jobKinds.shipped }}{{ $out = append $out $k }}{{ end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The configured job kinds as a JSON list: the shipped kinds jobKinds.shipped enables
     (files/jobkinds.json) with jobKinds.extra added; an extra entry replaces a shipped
     one of the same apiVersion and kind (as the operator does). */}}
{{- define "etha-operator.jobKinds" -}}
{{- $byKey := dict }}
{{- $order := list }}
{{- range $k := concat (include "etha-operator.shippedJobKinds" . | fromJsonArray) (.Values.jobKinds.extra | default list) }}
{{- $key := printf "%s/%s/%s" $k.group $k.version $k.kind }}
{{- if not (hasKey $byKey $key) }}{{ $order = append $order $key }}{{ end }}
{{- $_ := set $byKey $key $k }}
{{- end }}
{{- $out := list }}
{{- range $key := $order }}{{ $out = append $out (get $byKey $key) }}{{ end }}
{{- if not $out }}
{{- fail "no job kinds: jobKinds.shipped is empty and jobKinds.extra adds none; enable a shipped kind or add one" }}
{{- end }}
{{- toJson $out }}
{{- end }}
