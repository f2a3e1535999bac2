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

{{/* The name of the leader election's Lease (in the release namespace). */}}
{{- define "tasklease.leaderElectionLease" -}}
{{- default (printf "%s-operator" (include "tasklease.fullname" .)) .Values.leaderElection.leaseName }}
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
# after a conflict, writes the lease annotations with a compare-and-swap merge PATCH, and
# deletes a finished one whose ttlAfterFinished passed (preconditioned on its version).
- apiGroups: ["tasklease.io"]
  resources: ["tasks"]
  verbs: ["get", "list", "watch", "patch", "delete"]
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

{{/* The pool runners' ServiceAccount name (the same in every runner namespace). */}}
{{- define "tasklease.poolServiceAccount" -}}
{{- .Values.pools.serviceAccount.name }}
{{- end }}

{{/* CEL: true when the writer is a pool runner ServiceAccount (of any namespace; the
policy bindings pick the namespaces) and not the operator. */}}
{{- define "tasklease.poolRunnerMatchConditions" -}}
- name: writer-is-a-pool-runner
  expression: {{ printf "request.userInfo.username.startsWith('system:serviceaccount:') && request.userInfo.username.endsWith(':%s')" (include "tasklease.poolServiceAccount" .) | quote }}
- name: writer-is-not-the-operator
  expression: {{ printf "request.userInfo.username != '%s'" (include "tasklease.operatorUsername" .) | quote }}
{{- end }}

{{/* CEL variables `pod` (the pod-name claim of the writer's bound token, or '') and
`writer` (how refusals name the writer). */}}
{{- define "tasklease.writerPodVariables" -}}
- name: pod
  expression: >-
    has(request.userInfo.extra) && 'authentication.kubernetes.io/pod-name' in request.userInfo.extra
      && size(request.userInfo.extra['authentication.kubernetes.io/pod-name']) > 0
      ? request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] : ''
- name: writer
  expression: >-
    variables.pod != '' ? 'pool runner pod ' + variables.pod
      : request.userInfo.username + ' (its token is not bound to a pod)'
{{- end }}

{{/* The namespace of pool group `.group`: its `namespace`, else the release namespace. */}}
{{- define "tasklease.poolNamespace" -}}
{{- default .root.Release.Namespace .group.namespace }}
{{- end }}

{{/* Fail early on pool values that would render something that cannot work. */}}
{{- define "tasklease.validatePools" -}}
{{- $pools := .Values.pools }}
{{- if and $pools.groups (not $pools.enabled) }}
{{- fail "pools.groups needs pools.enabled: true (the pool runners' ServiceAccount, Role and admission policies)" }}
{{- end }}
{{- if $pools.enabled }}
{{- if eq $pools.serviceAccount.name .Values.runner.serviceAccount.name }}
{{- fail "pools.serviceAccount.name must differ from runner.serviceAccount.name: pool runners may patch Tasks (claims and releases), runners of a pod per attempt must not" }}
{{- end }}
{{- $runnerNamespaces := include "tasklease.runnerNamespaces" . | fromJsonArray }}
{{- if and (eq $pools.serviceAccount.name (include "tasklease.operatorServiceAccount" .)) (has .Release.Namespace $runnerNamespaces) }}
{{- fail "pools.serviceAccount.name must differ from the operator's ServiceAccount name" }}
{{- end }}
{{- $seen := dict }}
{{- range $index, $group := $pools.groups }}
{{- $namespace := include "tasklease.poolNamespace" (dict "root" $ "group" $group) }}
{{- if not (has $namespace $runnerNamespaces) }}
{{- fail (printf "pools.groups[%d] (%s) runs in namespace %s, which is not a runner namespace (%s): set its namespace to one of them, or add it to runner.namespaces (or watchNamespaces)" $index $group.name $namespace (join ", " $runnerNamespaces)) }}
{{- end }}
{{- $key := printf "%s/%s" $namespace $group.name }}
{{- if hasKey $seen $key }}
{{- fail (printf "pools.groups: worker group %s is listed twice for namespace %s" $group.name $namespace) }}
{{- end }}
{{- $_ := set $seen $key true }}
{{- if and (not $group.command) (not $group.args) }}
{{- fail (printf "pools.groups[%d] (%s): set args (the program `tasklease run --worker-group %s --` runs for each task) or command" $index $group.name $group.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The namespace label that says some tasklease release watches the namespace: no
release's unwatched-namespace policy warns there (admission-policy-unwatched.yaml). */}}
{{- define "tasklease.watchedLabel" -}}
tasklease.io/watched
{{- end }}
