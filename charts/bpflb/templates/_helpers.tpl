{{/* Names, labels and the image reference shared by the bpflb chart's templates. */}}

{{/* Every name is fixed, as in Cilium's chart: the operator and the agents find each other by them. */}}
{{- define "bpflb.operatorName" -}}bpflb-operator{{- end }}
{{- define "bpflb.webhookName" -}}bpflb-webhook{{- end }}
{{- define "bpflb.reportPolicyName" -}}bpflb-agent-node-report{{- end }}

{{- define "bpflb.labels" -}}
app.kubernetes.io/name: bpflb
app.kubernetes.io/part-of: bpflb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "bpflb.operatorSelector" -}}
app.kubernetes.io/name: bpflb
app.kubernetes.io/component: operator
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "bpflb.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Checks the schema cannot express, each failing with what to do. */}}
{{- define "bpflb.checks" -}}
{{- if and .Values.webhook.enabled (gt (int .Values.operator.replicas) 1) (not .Values.webhook.tls.existingSecret) }}
{{- fail "operator.replicas > 1 with the webhook needs a certificate all replicas share: set webhook.tls.existingSecret (cert-manager's, for example); each replica would otherwise make and publish its own" }}
{{- end }}
{{- if and .Values.webhook.enabled .Values.webhook.tls.existingSecret (not .Values.webhook.tls.caBundle) (not .Values.webhook.annotations) }}
{{- fail (printf "webhook.tls.existingSecret needs the CA that verifies it: set webhook.tls.caBundle, or let a CA injector fill it in (webhook.annotations, e.g. cert-manager.io/inject-ca-from: %s/<certificate>)" .Release.Namespace) }}
{{- end }}
{{- if and .Values.webhook.tls.caBundle (not .Values.webhook.tls.existingSecret) }}
{{- fail "webhook.tls.caBundle is only used with webhook.tls.existingSecret: without it the operator makes its own certificate and publishes its CA bundle itself" }}
{{- end }}
{{- end }}
