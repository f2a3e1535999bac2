{{/* Names and shared fragments of the tasklease chart. */}}

{{- define "tasklease.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; every object of the chart is named from it. */}}
{{- define "tasklease.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tasklease.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tasklease.labels" -}}
helm.sh/chart: {{ include "tasklease.chart" . }}
app.kubernetes.io/name: {{ include "tasklease.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tasklease
{{- end }}

{{- define "tasklease.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tasklease.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "tasklease.operatorServiceAccount" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "tasklease.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The username the API server gives the operator's ServiceAccount. */}}
{{- define "tasklease.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "tasklease.operatorServiceAccount" .) }}
{{- end }}

{{/* The runners' ServiceAccount name (the same in every runner namespace). */}}
{{- define "tasklease.runnerServiceAccount" -}}
{{- .Values.runner.serviceAccount.name }}
{{- end }}

{{/* true when the operator watches every namespace. */}}
{{- define "tasklease.clusterwide" -}}
{{- if .Values.watchNamespaces }}false{{ else }}true{{ end }}
{{- end }}

{{/*
The namespaces runner pods run in, as a JSON list: runner.namespaces; else the watched
namespaces (runner pods run in their Task's namespace); else the release namespace.
*/}}
{{- define "tasklease.runnerNamespaces" -}}
{{- if .Values.runner.namespaces }}
{{- .Values.runner.namespaces | uniq | toJson }}
{{- else if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* The kopf peering name. */}}
{{- define "tasklease.peeringName" -}}
{{- default (include "tasklease.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "tasklease.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The operator's rules on the namespaced resources it works with (see values.yaml). */}}
{{- define "tasklease.operatorNamespacedRules" -}}
# Tasks: kopf lists and watches them; the reconciler reads one (GET) before deciding again
# after a conflict and writes the lease annotations with a compare-and-swap merge PATCH.
- apiGroups: ["tasklease.io"]
  resources: ["tasks"]
  verbs: ["get", "list", "watch", "patch"]
# The status the operator owns (phase, attempts, conditions), also a compare-and-swap PATCH.
- apiGroups: ["tasklease.io"]
  resources: ["tasks/status"]
  verbs: ["patch"]
# Runner pods: kopf lists and watches those labelled tasklease.io/role; the reconciler
# creates one per hand-out and deletes stale or hung ones (it never reads one by name).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# Events on Tasks (AckTimeout, ProgressTimeout, ...), core/v1.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Worker pools: kopf lists and watches the pool runners' Leases (label
# tasklease.io/role=pool-runner) to hand back the tasks of a runner whose Lease expired.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["list", "watch"]
{{- end }}

{{/* kopf's peering objects: it watches them and PATCHes its keep-alive into their status. */}}
{{- define "tasklease.peeringRule" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{/* Where the admission policies apply: admissionPolicy.namespaceSelector, else the runner
namespaces (set the selector to `{}` for every namespace). */}}
{{- define "tasklease.admissionNamespaceSelector" -}}
{{- if kindIs "map" .Values.admissionPolicy.namespaceSelector }}
namespaceSelector:
  {{- toYaml .Values.admissionPolicy.namespaceSelector | nindent 2 }}
{{- else }}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values:
        {{- include "tasklease.runnerNamespaces" . | fromJsonArray | toYaml | nindent 8 }}
{{- end }}
{{- end }}
