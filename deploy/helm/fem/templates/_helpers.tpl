{{/*
Names. The guide's object names (fem-broker, fem-coder) are kept so that
the broker URL, the Prometheus relabelling on the "app" label and the
documentation stay the same for the chart and the plain manifests.
*/}}
{{- define "fem.brokerName" -}}fem-broker{{- end -}}
{{- define "fem.coderName" -}}fem-coder{{- end -}}

{{- define "fem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels common to every object (app.kubernetes.io/instance comes with
the selector labels). */}}
{{- define "fem.commonLabels" -}}
helm.sh/chart: {{ include "fem.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "fem.broker.selectorLabels" -}}
app: {{ include "fem.brokerName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fem.broker.labels" -}}
{{ include "fem.broker.selectorLabels" . }}
app.kubernetes.io/name: {{ include "fem.brokerName" . }}
app.kubernetes.io/component: broker
{{ include "fem.commonLabels" . }}
{{- end -}}

{{- define "fem.coder.selectorLabels" -}}
app: {{ include "fem.coderName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fem.coder.labels" -}}
{{ include "fem.coder.selectorLabels" . }}
app.kubernetes.io/name: {{ include "fem.coderName" . }}
app.kubernetes.io/component: agent
{{ include "fem.commonLabels" . }}
{{- end -}}

{{- define "fem.broker.image" -}}
{{- printf "%s:%s" .Values.broker.image.repository (.Values.broker.image.tag | default (printf "v%s" .Chart.AppVersion)) -}}
{{- end -}}

{{- define "fem.coder.image" -}}
{{- printf "%s:%s" .Values.agents.coder.image.repository (.Values.agents.coder.image.tag | default (printf "v%s" .Chart.AppVersion)) -}}
{{- end -}}

{{/* The URL agents dial. */}}
{{- define "fem.brokerUrl" -}}
{{- if .Values.agents.coder.brokerUrl -}}
{{- .Values.agents.coder.brokerUrl -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%v" (include "fem.brokerName" .) .Release.Namespace .Values.broker.service.port -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context shared by both workloads; uid as argument. */}}
{{- define "fem.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fem.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "fem.peersName" -}}{{ include "fem.brokerName" . }}-peers{{- end -}}

{{/* The broker Service type: LoadBalancer with trust, ClusterIP without,
unless set; LoadBalancer without trust is refused. */}}
{{- define "fem.serviceType" -}}
{{- $t := .Values.broker.service.type | default (ternary "LoadBalancer" "ClusterIP" .Values.trust.enabled) -}}
{{- if and (eq $t "LoadBalancer") (not .Values.trust.enabled) -}}
{{- fail "broker.service.type=LoadBalancer needs trust.enabled=true: in development trust anyone who reaches the broker can run programs on every fem-coder" -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{/* FEM_TRUST_ANCHOR: the anchor files, comma-separated. */}}
{{- define "fem.trustAnchors" -}}
{{- $paths := list -}}
{{- range .Values.trust.anchor.keys -}}
{{- $paths = append $paths (printf "/etc/fem-trust/%s" .) -}}
{{- end -}}
{{- if not $paths -}}
{{- fail "trust.enabled needs at least one key in trust.anchor.keys" -}}
{{- end -}}
{{- join "," $paths -}}
{{- end -}}

{{/* The SRV name the brokers discover each other by. */}}
{{- define "fem.discoverSrv" -}}
{{- printf "_fem._udp.%s.%s.svc.%s" (include "fem.peersName" .) .Release.Namespace .Values.broker.federation.clusterDomain -}}
{{- end -}}
