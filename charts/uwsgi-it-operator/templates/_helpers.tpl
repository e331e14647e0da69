{{/*
Base of every object name: the release name (or fullnameOverride), short enough that
"<base>-controller-metrics" still fits the 63-character limit of Service names.
*/}}
{{- define "uwsgi-it.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 44 | trimSuffix "-" -}}
{{- end -}}

{{- define "uwsgi-it.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "uwsgi-it.labels" -}}
helm.sh/chart: {{ include "uwsgi-it.chart" . }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: uwsgi-it
{{- end -}}

{{/* Selector labels of one program; call with (dict "root" $ "component" "controller"). */}}
{{- define "uwsgi-it.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "uwsgi-it.componentLabels" -}}
{{ include "uwsgi-it.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "uwsgi-it.configMapName" -}}
{{ include "uwsgi-it.fullname" . }}-config
{{- end -}}

{{- define "uwsgi-it.controllerServiceAccount" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{ default (printf "%s-controller" (include "uwsgi-it.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.controller.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "uwsgi-it.agentServiceAccount" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{ default (printf "%s-agent" (include "uwsgi-it.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.agent.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{/* The image reference: by digest when one is given, else by tag (default: appVersion). */}}
{{- define "uwsgi-it.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/*
The operator configuration file. Every value is written as a JSON string (JSON is YAML), so a
port typed as a number in the values still reaches the programs as the string they expect, and
no value can change the file's structure. The agent's own host-network port is always reserved:
a PortMapping on it would hijack the agent's health and metrics endpoint.
*/}}
{{- define "uwsgi-it.config" -}}
{{- $c := .Values.config -}}
homeRoot: {{ $c.homeRoot | toString | toJson }}
homeRetention: {{ $c.homeRetention | toString | toJson }}
{{- if $c.distros }}
distros:
{{- range $name, $image := $c.distros }}
  {{ $name | toString | toJson }}: {{ $image | toString | toJson }}
{{- end }}
{{- else }}
distros: {}
{{- end }}
{{- if $c.customDistroImage }}
customDistroImage: {{ $c.customDistroImage | toString | toJson }}
{{- end }}
podNetworks:
{{- range $c.podNetworks }}
  - {{ . | toString | toJson }}
{{- end }}
publicPorts: {{ $c.publicPorts | toString | toJson }}
reservedPorts:
{{- range $c.reservedPorts }}
  - {{ . | toString | toJson }}
{{- end }}
  - {{ .Values.agent.port | int | toString | toJson }}
portForward:
  backend: {{ $c.portForward.backend | toString | toJson }}
  iptablesMode: {{ $c.portForward.iptablesMode | toString | toJson }}
  resyncPeriod: {{ $c.portForward.resyncPeriod | toString | toJson }}
  commandTimeout: {{ $c.portForward.commandTimeout | toString | toJson }}
{{- with $c.portForward.maxSyncAge }}
  maxSyncAge: {{ . | toString | toJson }}
{{- end }}
logLevel: {{ $c.logLevel | toString | toJson }}
customerClusterRole: {{ $c.customerClusterRole | toString | toJson }}
uidStore: {{ $c.uidStore | toString | toJson }}
releaseTimeout: {{ $c.releaseTimeout | toString | toJson }}
{{- end -}}

{{/* Restricted-profile container security context shared by the controller. */}}
{{- define "uwsgi-it.restrictedContainerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The host the kubelet probes the agent at: where --listen put it (the Pod IP, which the
kubelet uses by default, is the node's address and answers only for "internal"). */}}
{{- define "uwsgi-it.agentProbeHost" -}}
{{- if eq .Values.agent.listen "loopback" -}}
host: 127.0.0.1
{{- else if ne .Values.agent.listen "internal" -}}
host: {{ .Values.agent.listen }}
{{- end -}}
{{- end -}}
