{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "k5serve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "k5serve.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector of one component's pods. Selectors are immutable, so these stay as chart 0.1 had them. */}}
{{- define "k5serve.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "k5serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "k5serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod spec fields shared by every k5serve pod. */}}
{{- define "k5serve.podCommon" -}}
serviceAccountName: {{ include "k5serve.serviceAccountName" . }}
automountServiceAccountToken: false
{{ include "k5serve.podCommonRest" . }}
{{- end -}}

{{/* podCommon without the service account: for worker pods, which may use their own. */}}
{{- define "k5serve.podCommonRest" -}}
enableServiceLinks: false
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The bundled Redis's in-cluster address, host:port. */}}
{{- define "k5serve.redisAddress" -}}
{{- printf "%s-redis.%s.svc:6379" (include "k5serve.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* K5_REDIS_URL: the bundled Redis, an existing Secret, or a plain URL (never one with a password in it). */}}
{{- define "k5serve.redisUrlEnv" -}}
- name: K5_REDIS_URL
{{- if .Values.redis.bundled }}
  value: {{ printf "redis://%s/0" (include "k5serve.redisAddress" .) | quote }}
{{- else if .Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.existingSecret.name }}, key: {{ .Values.redis.existingSecret.key }}}
{{- else if .Values.redis.url }}
{{- if contains "@" .Values.redis.url }}
{{- fail "redis.url must not carry credentials: put the URL in a Secret and set redis.existingSecret" }}
{{- end }}
  value: {{ .Values.redis.url | quote }}
{{- else }}
{{- fail "redis.bundled is false: set redis.existingSecret.name or redis.url" }}
{{- end }}
{{- end -}}

{{/* Environment shared by gateway, workers and webhook delivery: they must agree on Redis, storage and timing. */}}
{{- define "k5serve.commonEnv" -}}
{{ include "k5serve.redisUrlEnv" . }}
# The gateway's API and the workers' and webhook process's /metrics, /healthz, /readyz listen on the pod IP,
# where kubelet probes and Prometheus reach them.
- name: K5_HOST
  value: 0.0.0.0
- name: K5_STORAGE_URL
  value: {{ .Values.storage.url | quote }}
{{- with .Values.storage.endpointUrl }}
- name: K5_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: K5_S3_REGION
  value: {{ .Values.storage.region | quote }}
{{- with .Values.storage.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
- name: K5_ASSET_TTL_S
  value: {{ .Values.storage.assetTtlSeconds | quote }}
- name: K5_PRESIGN_TTL_S
  value: {{ .Values.storage.presignTtlSeconds | quote }}
- name: K5_STORAGE_RETRY_WINDOW_S
  value: {{ .Values.storage.retryWindowSeconds | quote }}
- name: K5_JOB_TIMEOUT_S
  value: {{ .Values.jobTimeoutSeconds | quote }}
- name: K5_HEARTBEAT_S
  value: {{ .Values.heartbeatSeconds | quote }}
- name: K5_MAX_ATTEMPTS
  value: {{ .Values.maxAttempts | quote }}
- name: K5_USAGE_RETENTION_DAYS
  value: {{ .Values.usage.retentionDays | quote }}
{{- with .Values.usage.labels }}
- name: K5_USAGE_LABELS
  value: {{ include "k5serve.usageLabels" . | quote }}
{{- end }}
{{- with .Values.webhooks.url }}
- name: K5_WEBHOOK_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.webhooks.allowedHosts }}
- name: K5_WEBHOOK_ALLOWED_HOSTS
  value: {{ . | quote }}
{{- end }}
- name: K5_LOG_FORMAT
  value: json
- name: K5_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The models of all worker pools, by the id their jobs are queued under: the gateway accepts jobs for them even
     while a pool is scaled to zero. */}}
{{- define "k5serve.workerModels" -}}
{{- $models := list -}}
{{- range .Values.workers }}{{- $models = append $models (default .model .modelId) -}}{{- end -}}
{{- $models | uniq | join "," -}}
{{- end -}}

{{/* A pool's settings: workerDefaults with the pool's own keys replacing them. Keys are set one by one rather
     than with merge/mergeOverwrite, which treat false and 0 as unset (autoscaling.enabled: false must win). Probes
     merge one level deeper, so a pool can change one threshold. */}}
{{- define "k5serve.pool" -}}
{{- $defaults := .root.Values.workerDefaults -}}
{{- $pool := deepCopy $defaults -}}
{{- range $k, $v := .pool }}{{- $_ := set $pool $k $v }}{{- end -}}
{{- if .pool.probes -}}
{{- $_ := set $pool "probes" (mergeOverwrite (deepCopy $defaults.probes) (deepCopy .pool.probes)) -}}
{{- end -}}
{{- if and (kindIs "invalid" $pool.terminationGracePeriodSeconds) $pool.checkpoints.enabled -}}
{{- /* A stopped job resumes from its checkpoint elsewhere: the pod needs seconds to stop, not the job's bound. */ -}}
{{- $_ := set $pool "terminationGracePeriodSeconds" $pool.checkpoints.terminationGracePeriodSeconds -}}
{{- end -}}
{{- if kindIs "invalid" $pool.terminationGracePeriodSeconds -}}
{{- $_ := set $pool "terminationGracePeriodSeconds" (add .root.Values.jobTimeoutSeconds $pool.shutdownMarginSeconds) -}}
{{- end -}}
{{- $keda := omit (deepCopy .root.Values.keda) "redis" -}}
{{- range $k, $v := (.pool.autoscaling | default dict) }}{{- $_ := set $keda $k $v }}{{- end -}}
{{- $_ := set $pool "keda" $keda -}}
{{- $_ := set $pool "modelId" (default $pool.model $pool.modelId) -}}
{{- /* Memory from hostMemory by model size, unless the pool's resources name it. */ -}}
{{- $size := ternary "pro" "lite" (contains "-pro-" (lower (printf "%s %s" $pool.model $pool.modelId))) -}}
{{- $mem := index $pool.hostMemory $size -}}
{{- $res := deepCopy ($pool.resources | default dict) -}}
{{- $requests := deepCopy ($res.requests | default dict) -}}
{{- $limits := deepCopy ($res.limits | default dict) -}}
{{- if not (hasKey $requests "memory") }}{{ $_ := set $requests "memory" $mem.request }}{{ end -}}
{{- if not (hasKey $limits "memory") }}{{ $_ := set $limits "memory" $mem.limit }}{{ end -}}
{{- $_ := set $res "requests" $requests -}}
{{- $_ := set $res "limits" $limits -}}
{{- $_ := set $pool "resources" $res -}}
{{- toJson $pool -}}
{{- end -}}

{{/* A cache volume source (modelCache or compileCache): a PVC, a node directory, or an emptyDir. */}}
{{- define "k5serve.cacheVolume" -}}
{{- $cache := index .root.Values .key -}}
{{- if eq $cache.type "pvc" -}}
persistentVolumeClaim:
  claimName: {{ default (printf "%s-%s" (include "k5serve.fullname" .root) (.key | kebabcase)) $cache.existingClaim }}
{{- else if eq $cache.type "hostPath" -}}
hostPath:
  path: {{ $cache.hostPath }}
  type: DirectoryOrCreate
{{- else -}}
emptyDir: {}
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rules shared by several components. */}}
{{- define "k5serve.egressDns" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- end -}}

{{- define "k5serve.egressRedis" -}}
{{- if .Values.redis.bundled -}}
- to:
    - podSelector:
        matchLabels: {{- include "k5serve.selectorLabels" (dict "root" . "component" "redis") | nindent 10 }}
  ports:
    - {port: 6379, protocol: TCP}
{{- else -}}
- ports:
    {{- range .Values.networkPolicy.redisEgress.ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with .Values.networkPolicy.redisEgress.to }}
  to: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "k5serve.egressS3" -}}
- ports:
    {{- range .Values.networkPolicy.s3Egress.ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with .Values.networkPolicy.s3Egress.to }}
  to: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* K5_USAGE_LABELS from the usage.labels map: "owner=label" pairs, comma-separated, in key order. */}}
{{- define "k5serve.usageLabels" -}}
{{- $pairs := list -}}
{{- range $owner, $label := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $owner $label) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
