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
The broker's config.yaml: `config` as it is (the broker's own keys, docs/configuration.md), and for
every secret the path of its file in the mounted Secret (the `*_file` twins of
docs/configuration.md), so no secret is in the ConfigMap. service/helm_values.py makes the same
mapping for `monogoto-broker check-config --helm-values`.
*/}}
{{- define "monogoto-broker.config" -}}
{{- $dir := include "monogoto-broker.secretsDir" . -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "redis_url_file" (printf "%s/redis-url" $dir) }}
{{- $_ := set $config "encryption_keys_file" (printf "%s/encryption-keys" $dir) }}
{{- range $name, $account := $config.accounts }}
{{- $_ := set $account "password_file" (printf "%s/account-%s-password" $dir $name) }}
{{- end }}
{{- range $name, $caller := $config.callers }}
{{- $_ := set $caller "api_key_sha256_file" (printf "%s/caller-%s-api-key-sha256" $dir $name) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
What the chart-made Secret lacks, one "- <value>: required ..." line each (nothing with
secrets.existingSecret).
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
- {{ . }}: required (or name a Secret of your own in secrets.existingSecret)
{{- end }}
{{- end }}

{{/*
Refuse values that give no working broker, all problems at once, one line each in the words of
`monogoto-broker check-config --helm-values` (service/helm_values.py): no account, a caller
naming an unknown account, a secret the chart-made Secret lacks, the in-process store with
several replicas, a NetworkPolicy that no caller may pass.
*/}}
{{- define "monogoto-broker.validate" -}}
{{- $problems := list }}
{{- $accounts := .Values.config.accounts | default dict }}
{{- if not $accounts }}
{{- $problems = append $problems "- config.accounts: at least one account is required" }}
{{- else }}
{{- range $name, $caller := .Values.config.callers }}
{{- range $index, $account := $caller.accounts }}
{{- if and (ne $account "*") (not (hasKey $accounts $account)) }}
{{- $problems = append $problems (printf "- config.callers.%s.accounts[%d]: unknown account '%s'" $name $index $account) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "memory:" .Values.secrets.redisUrl) (or .Values.autoscaling.enabled (ne (int .Values.replicaCount) 1)) }}
{{- $problems = append $problems "- secrets.redisUrl: memory:// is an in-process store: it needs replicaCount 1 and no autoscaling" }}
{{- end }}
{{- with include "monogoto-broker.missingSecrets" . | trim }}
{{- $problems = append $problems . }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.callers) }}
{{- $problems = append $problems "- networkPolicy.callers: required with networkPolicy.enabled (the peers that may call the broker; [{podSelector: {}}] for every pod of the release's namespace)" }}
{{- end }}
{{- with $problems }}
{{- fail (printf "these values give no working broker (docs/operations.md, \"Check a config before rolling it out\"):\n%s" (join "\n" .)) }}
{{- end }}
{{- end }}
