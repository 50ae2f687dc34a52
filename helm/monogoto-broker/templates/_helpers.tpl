{{/*
Expand the name of the chart.
*/}}
{{- define "monogoto-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (63 characters at most: some Kubernetes name fields
are limited to this by the DNS naming spec). If the release name contains the chart name it is
used as the full name.
*/}}
{{- define "monogoto-broker.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "monogoto-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "monogoto-broker.labels" -}}
helm.sh/chart: {{ include "monogoto-broker.chart" . }}
{{ include "monogoto-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ include "monogoto-broker.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: monogoto-broker
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "monogoto-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "monogoto-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "monogoto-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "monogoto-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image tag: the chart's appVersion unless set.
*/}}
{{- define "monogoto-broker.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
The image reference; a digest wins over the tag.
*/}}
{{- define "monogoto-broker.image" -}}
{{- $repository := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repository = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (include "monogoto-broker.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the Redis URL, the encryption keys, account passwords and caller key digests.
*/}}
{{- define "monogoto-broker.secretName" -}}
{{- default (include "monogoto-broker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Where the Secret is mounted in the container.
*/}}
{{- define "monogoto-broker.secretsDir" -}}
/etc/monogoto-broker/secrets
{{- end }}

{{/*
The broker's config.yaml: the non-secret settings from values, and for every secret the path of
its file in the mounted Secret (the `*_file` twins of docs/configuration.md), so no secret is in the ConfigMap.
*/}}
{{- define "monogoto-broker.config" -}}
{{- $dir := include "monogoto-broker.secretsDir" . -}}
{{- $config := dict
  "redis_url_file" (printf "%s/redis-url" $dir)
  "encryption_keys_file" (printf "%s/encryption-keys" $dir)
  "key_prefix" .Values.config.keyPrefix
  "upstream" (dict
    "dialect" .Values.config.upstream.dialect
    "timeout_seconds" .Values.config.upstream.timeoutSeconds
    "auth_rate" (dict "limit" .Values.config.upstream.authRate.limit "period_seconds" .Values.config.upstream.authRate.periodSeconds)
    "retry" (dict "max_attempts" .Values.config.upstream.retry.maxAttempts "max_elapsed_seconds" .Values.config.upstream.retry.maxElapsedSeconds)
    "max_retry_after_seconds" .Values.config.upstream.maxRetryAfterSeconds)
  "api" (dict "max_wait_seconds" .Values.config.api.maxWaitSeconds)
  "refresh" (dict
    "fraction" .Values.config.refresh.fraction
    "min_remaining_seconds" .Values.config.refresh.minRemainingSeconds
    "default_lifetime_seconds" .Values.config.refresh.defaultLifetimeSeconds
    "rejected_backoff_seconds" .Values.config.refresh.rejectedBackoffSeconds)
-}}
{{- if .Values.config.upstream.baseUrl }}
{{- $_ := set $config.upstream "base_url" .Values.config.upstream.baseUrl }}
{{- end }}
{{- $accounts := dict }}
{{- range $name, $account := .Values.config.accounts }}
{{- $entry := dict "username" $account.username "password_file" (printf "%s/account-%s-password" $dir $name) }}
{{- with $account.dialect }}{{ $_ := set $entry "dialect" . }}{{ end }}
{{- with $account.baseUrl }}{{ $_ := set $entry "base_url" . }}{{ end }}
{{- with $account.timeoutSeconds }}{{ $_ := set $entry "timeout_seconds" . }}{{ end }}
{{- $_ := set $accounts $name $entry }}
{{- end }}
{{- $_ := set $config "accounts" $accounts }}
{{- $callers := dict }}
{{- range $name, $caller := .Values.config.callers }}
{{- $_ := set $callers $name (dict "api_key_sha256_file" (printf "%s/caller-%s-api-key-sha256" $dir $name) "accounts" $caller.accounts) }}
{{- end }}
{{- $_ := set $config "callers" $callers }}
{{- toYaml $config }}
{{- end }}

{{/*
What the chart-made Secret lacks, one "- value" line each (nothing with secrets.existingSecret).
*/}}
{{- define "monogoto-broker.missingSecrets" -}}
{{- $missing := list }}
{{- if not .Values.secrets.existingSecret }}
{{- if not .Values.secrets.redisUrl }}{{ $missing = append $missing "secrets.redisUrl" }}{{ end }}
{{- if not .Values.secrets.encryptionKeys }}{{ $missing = append $missing "secrets.encryptionKeys" }}{{ end }}
{{- range $name, $_ := .Values.config.accounts }}
{{- if not (get $.Values.secrets.accountPasswords $name) }}{{ $missing = append $missing (printf "secrets.accountPasswords.%s" $name) }}{{ end }}
{{- end }}
{{- range $name, $_ := .Values.config.callers }}
{{- if not (get $.Values.secrets.callerKeyDigests $name) }}{{ $missing = append $missing (printf "secrets.callerKeyDigests.%s" $name) }}{{ end }}
{{- end }}
{{- end }}
{{- range $missing }}
- {{ . }}
{{- end }}
{{- end }}
