{{- define "k5serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "k5serve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "k5serve.env" -}}
- name: K5_REDIS_URL
  value: {{ .Values.redis.url | quote }}
- name: K5_STORAGE_URL
  value: {{ .Values.storage.url | quote }}
{{- with .Values.storage.endpointUrl }}
- name: K5_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.storage.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.storage.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}
- name: K5_LOG_FORMAT
  value: json
{{- end -}}

{{/* The models of all worker pools: the gateway queues jobs for them even while a pool is scaled to zero. */}}
{{- define "k5serve.workerModels" -}}
{{- $models := list -}}
{{- range .Values.workers }}{{- $models = append $models .model -}}{{- end -}}
{{- $models | uniq | join "," -}}
{{- end -}}
