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
Where the TLS Secret is mounted (tls.enabled), and the Secret's name.
*/}}
{{- define "monogoto-broker.tlsDir" -}}
/etc/monogoto-broker/tls
{{- end }}
{{- define "monogoto-broker.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "monogoto-broker.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
Where the broker's own ServiceAccount token and the cluster's CA are mounted
(kubernetesAuth.enabled), for reading the cluster's JWKS.
*/}}
{{- define "monogoto-broker.kubernetesDir" -}}
/etc/monogoto-broker/kubernetes
{{- end }}

{{/*
The `helm test` caller (tests.enabled): its name in the broker's config, where the broker finds
its key digest, the Secret holding key and digest, and the account it fetches a token of.
*/}}
{{- define "monogoto-broker.testCallerName" -}}
helm-test
{{- end }}
{{- define "monogoto-broker.testCallerDir" -}}
/etc/monogoto-broker/test-caller
{{- end }}
{{- define "monogoto-broker.testCallerSecretName" -}}
{{- printf "%s-test-caller" (include "monogoto-broker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "monogoto-broker.testAccount" -}}
{{- $accounts := keys (.Values.config.accounts | default dict) | sortAlpha }}
{{- .Values.tests.account | default (first $accounts) }}
{{- end }}

{{/*
The API port's scheme for probes and the test pod.
*/}}
{{- define "monogoto-broker.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
Whether the caller `name` (with its config `caller`) has a key digest in the Secret: one given in
secrets.callerKeyDigests, or, with an existing Secret, a caller that has no other way to
authenticate (no service_accounts, no client_subjects). Prints "true" or nothing.
*/}}
{{- define "monogoto-broker.callerHasKey" -}}
{{- $values := index . 0 }}{{ $name := index . 1 }}{{ $caller := index . 2 }}
{{- if $values.secrets.existingSecret }}
{{- if not (or $caller.service_accounts $caller.client_subjects) }}true{{ end }}
{{- else if get $values.secrets.callerKeyDigests $name }}true
{{- end }}
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
{{- if include "monogoto-broker.callerHasKey" (list $.Values $name $caller) }}
{{- $_ := set $caller "api_key_sha256_file" (printf "%s/caller-%s-api-key-sha256" $dir $name) }}
{{- end }}
{{- end }}
{{- if and .Values.tests.enabled $config.accounts }}
{{- $callers := get $config "callers" | default dict }}
{{- $test := dict "accounts" (list (include "monogoto-broker.testAccount" .)) "api_key_sha256_file" (printf "%s/api-key-sha256" (include "monogoto-broker.testCallerDir" .)) }}
{{- $_ := set $callers (include "monogoto-broker.testCallerName" .) $test }}
{{- $_ := set $config "callers" $callers }}
{{- end }}
{{- if .Values.secrets.auditHmacKey }}
{{- $audit := get $config "audit" | default dict }}
{{- $_ := set $audit "hmac_key_file" (printf "%s/audit-hmac-key" $dir) }}
{{- $_ := set $config "audit" $audit }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $tlsDir := include "monogoto-broker.tlsDir" . }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir) }}
{{- if .Values.tls.clientCertificates }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $tlsDir) }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- if .Values.metrics.port }}
{{- $_ := set $config "metrics_port" (int .Values.metrics.port) }}
{{- end }}
{{- if .Values.kubernetesAuth.enabled }}
{{- $kubeDir := include "monogoto-broker.kubernetesDir" . }}
{{- $auth := get $config "caller_auth" | default dict }}
{{- $kubernetes := get $auth "kubernetes" | default dict }}
{{- if not $kubernetes.jwks_url }}
{{- $_ := set $kubernetes "jwks_url" "https://kubernetes.default.svc/openid/v1/jwks" }}
{{- end }}
{{- $_ := set $kubernetes "jwks_ca_file" (printf "%s/ca.crt" $kubeDir) }}
{{- $_ := set $kubernetes "jwks_token_file" (printf "%s/token" $kubeDir) }}
{{- $_ := set $auth "kubernetes" $kubernetes }}
{{- $_ := set $config "caller_auth" $auth }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
The settings a running broker cannot reload (service/config/changes.py): what the pods' restart
checksum covers. Accounts' usernames are among them too, but adding or removing an account is
live, so they are left out: the broker refuses such a change and says so (a rollout applies it).
*/}}
{{- define "monogoto-broker.restartSettings" -}}
{{- $config := include "monogoto-broker.config" . | fromYaml }}
{{- $restart := pick $config "key_prefix" "metrics_port" "tls" "caller_auth" "audit" }}
{{- $_ := set $restart "upstream" (pick ($config.upstream | default dict) "dialect" "base_url") }}
{{- $_ := set $restart "redisUrl" (.Values.secrets.redisUrl | sha256sum) }}
{{- $_ := set $restart "auditHmacKey" (.Values.secrets.auditHmacKey | sha256sum) }}
{{- toYaml $restart }}
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
{{- range $name, $caller := .Values.config.callers }}
{{- if not (or (get $.Values.secrets.callerKeyDigests $name) $caller.service_accounts $caller.client_subjects) }}{{ $missing = append $missing (printf "secrets.callerKeyDigests.%s" $name) }}{{ end }}
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
{{- if .Values.tests.enabled }}
{{- $testCaller := include "monogoto-broker.testCallerName" . }}
{{- if hasKey (.Values.config.callers | default dict) $testCaller }}
{{- $problems = append $problems (printf "- config.callers.%s: the name of the chart's helm test caller (tests.enabled): choose another" $testCaller) }}
{{- end }}
{{- if and .Values.tests.account $accounts (not (hasKey $accounts .Values.tests.account)) }}
{{- $problems = append $problems (printf "- tests.account: unknown account '%s'" .Values.tests.account) }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not (or .Values.tls.existingSecret .Values.tls.certManager.enabled)) }}
{{- $problems = append $problems "- tls.existingSecret: required with tls.enabled (a kubernetes.io/tls Secret), or set tls.certManager.enabled" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- $problems = append $problems "- tls.certManager.issuerRef.name: required with tls.certManager.enabled" }}
{{- end }}
{{- if and .Values.kubernetesAuth.enabled (not (and .Values.config.caller_auth .Values.config.caller_auth.kubernetes)) }}
{{- $problems = append $problems "- config.caller_auth.kubernetes: required with kubernetesAuth.enabled (the cluster's issuer and the audiences callers' tokens carry)" }}
{{- end }}
{{- if and .Values.metrics.port (eq (int .Values.metrics.port) (int .Values.containerPort)) }}
{{- $problems = append $problems "- metrics.port: must differ from containerPort" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.callers) }}
{{- $problems = append $problems "- networkPolicy.callers: required with networkPolicy.enabled (the peers that may call the broker; [{podSelector: {}}] for every pod of the release's namespace)" }}
{{- end }}
{{- with $problems }}
{{- fail (printf "these values give no working broker (docs/operations.md, \"Check a config before rolling it out\"):\n%s" (join "\n" .)) }}
{{- end }}
{{- end }}
