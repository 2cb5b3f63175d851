{{/* Names and labels ------------------------------------------------------------------------------ */}}

{{- define "realtime-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "realtime-sidecar.fullname" -}}
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

{{- define "realtime-sidecar.consumerName" -}}
{{- printf "%s-consumer" (include "realtime-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of one component's objects: (dict "ctx" $ "component" "sidecar"|"consumer"|""). */}}
{{- define "realtime-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{ include "realtime-sidecar.selectorLabels" . }}
{{- end }}

{{/* Selector labels of one component (same argument). */}}
{{- define "realtime-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "realtime-sidecar.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "realtime-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "realtime-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "realtime-sidecar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The LiteLLM config ------------------------------------------------------------------------------ */}}

{{/* The inline config, when set, wins over existingConfigMap (so a default existingConfigMap never hides it). */}}
{{- define "realtime-sidecar.inlineConfig" -}}
{{- if not (empty .Values.litellmConfig.inline) }}true{{ end }}
{{- end }}

{{- define "realtime-sidecar.configMapName" -}}
{{- if include "realtime-sidecar.inlineConfig" . }}
{{- printf "%s-litellm-config" (include "realtime-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Values.litellmConfig.existingConfigMap }}
{{- end }}
{{- end }}

{{- define "realtime-sidecar.configKey" -}}
{{- if include "realtime-sidecar.inlineConfig" . }}config.yaml{{ else }}{{ .Values.litellmConfig.key }}{{ end }}
{{- end }}

{{- define "realtime-sidecar.configPath" -}}
{{- printf "%s/config.yaml" (.Values.litellmConfig.mountPath | trimSuffix "/") }}
{{- end }}

{{- define "realtime-sidecar.litellmUrl" -}}
{{- if .Values.litellm.url }}
{{- .Values.litellm.url }}
{{- else if .Values.litellm.service.name }}
{{- printf "http://%s:%v" .Values.litellm.service.name (int .Values.litellm.service.port) }}
{{- end }}
{{- end }}

{{/* Redis / database ------------------------------------------------------------------------------- */}}

{{- define "realtime-sidecar.hasRedis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.sentinel.nodes .Values.redis.cluster.nodes }}true{{ end }}
{{- end }}

{{/* A Sentinel-managed master or a Redis Cluster (docs/operations.md, "Redis high availability"): the node
     lists, names, the master's user and TLS as values, the passwords only as Secret references. */}}
{{- define "realtime-sidecar.redisHaEnv" -}}
{{- with .Values.redis }}
{{- if or .sentinel.nodes .cluster.nodes }}
{{- with .sentinel.nodes }}
- name: SIDECAR_REDIS_SENTINEL_NODES
  value: {{ . | quote }}
{{- end }}
{{- with .sentinel.serviceName }}
- name: SIDECAR_REDIS_SERVICE_NAME
  value: {{ . | quote }}
{{- end }}
{{- with .sentinel.username }}
- name: SIDECAR_REDIS_SENTINEL_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- with .sentinel.passwordSecret }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_REDIS_SENTINEL_PASSWORD" "secret" . "key" $.Values.redis.sentinel.passwordSecretKey) }}
{{- end }}
{{- with .cluster.nodes }}
- name: SIDECAR_REDIS_CLUSTER_NODES
  value: {{ . | quote }}
{{- end }}
{{- with .username }}
- name: SIDECAR_REDIS_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- with .passwordSecret }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_REDIS_PASSWORD" "secret" . "key" $.Values.redis.passwordSecretKey) }}
{{- end }}
- name: SIDECAR_REDIS_SSL
  value: {{ ternary "true" "false" (.ssl | default false) | quote }}
{{- with .sslCaCerts }}
- name: SIDECAR_REDIS_SSL_CA_CERTS
  value: {{ . | quote }}
{{- end }}
{{- if .sentinel.nodes }}
- name: SIDECAR_REDIS_DB
  value: {{ .db | default 0 | int | toString | quote }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" .waitReplicas) }}
- name: SIDECAR_REDIS_WAIT_REPLICAS
  value: {{ .waitReplicas | int | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "realtime-sidecar.hasDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* An env entry from a URL value or an existing Secret: (dict "name" NAME "spec" .Values.redis). */}}
{{- define "realtime-sidecar.urlEnv" -}}
{{- if .spec.existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .spec.existingSecret }}
      key: {{ .spec.existingSecretKey }}
{{- else if .spec.url }}
- name: {{ .name }}
  value: {{ .spec.url | quote }}
{{- end }}
{{- end }}

{{/* Environment ------------------------------------------------------------------------------------ */}}

{{/* config.<key> -> SIDECAR_<NAME>: the one table from values to the contract's variables. */}}
{{- define "realtime-sidecar.settingNames" -}}
host: SIDECAR_HOST
port: SIDECAR_PORT
drainGraceS: SIDECAR_DRAIN_GRACE_S
spoolDir: SIDECAR_SPOOL_DIR
checkpointS: SIDECAR_CHECKPOINT_S
lostAfterS: SIDECAR_LOST_AFTER_S
keyRecheckS: SIDECAR_KEY_RECHECK_S
keyCacheS: SIDECAR_KEY_CACHE_S
keyNegativeCacheS: SIDECAR_KEY_NEGATIVE_CACHE_S
keyLookups: SIDECAR_KEY_LOOKUPS
keyLookupBacklog: SIDECAR_KEY_LOOKUP_BACKLOG
keyRechecks: SIDECAR_KEY_RECHECKS
idleTimeoutS: SIDECAR_IDLE_TIMEOUT_S
maxSessionS: SIDECAR_MAX_SESSION_S
maxSessionsPerKey: SIDECAR_MAX_SESSIONS_PER_KEY
maxSessions: SIDECAR_MAX_SESSIONS
maxFrameBytes: SIDECAR_MAX_FRAME_BYTES
maxBodyBytes: SIDECAR_MAX_BODY_BYTES
connectTimeoutS: SIDECAR_CONNECT_TIMEOUT_S
dbTimeoutS: SIDECAR_DB_TIMEOUT_S
handshakeTimeoutS: SIDECAR_HANDSHAKE_TIMEOUT_S
walkoutWaitS: SIDECAR_WALKOUT_WAIT_S
sidebandReattachS: SIDECAR_SIDEBAND_REATTACH_S
maxConnections: SIDECAR_MAX_CONNECTIONS
defaultTranscriptionModel: SIDECAR_DEFAULT_TRANSCRIPTION_MODEL
rounding: SIDECAR_ROUNDING
roundingIncrement: SIDECAR_ROUNDING_INCREMENT
allowUnpriced: SIDECAR_ALLOW_UNPRICED
modelsRefreshS: SIDECAR_MODELS_REFRESH_S
workers: SIDECAR_WORKERS
consumeMetricsPort: SIDECAR_CONSUME_METRICS_PORT
{{- end }}

{{/* The environment both Deployments share: the config path, Redis, database, LiteLLM URL, settings. */}}
{{- define "realtime-sidecar.commonEnv" -}}
- name: SIDECAR_LITELLM_CONFIG
  value: {{ include "realtime-sidecar.configPath" . | quote }}
{{- with include "realtime-sidecar.litellmUrl" . }}
- name: SIDECAR_LITELLM_URL
  value: {{ . | quote }}
{{- end }}
{{- include "realtime-sidecar.urlEnv" (dict "name" "SIDECAR_REDIS_URL" "spec" .Values.redis) }}
{{- include "realtime-sidecar.redisHaEnv" . }}
{{- include "realtime-sidecar.urlEnv" (dict "name" "SIDECAR_DATABASE_URL" "spec" .Values.database) }}
{{- range $key, $name := include "realtime-sidecar.settingNames" . | fromYaml }}
{{- $value := index $.Values.config $key }}
{{- if not (kindIs "invalid" $value) }}
{{- /* YAML numbers arrive as float64, printed as 4.194304e+06: print whole ones as integers. */}}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $value = $value | int64 }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "realtime-sidecar.secretEnv" -}}
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/* One env entry from an existing Secret: (dict "name" NAME "secret" SECRET "key" KEY). */}}
{{- define "realtime-sidecar.secretRefEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end }}

{{/* The browser settings, sidecar only (the consumer serves no HTTP): the client-secret signing key, the
     captions page switch (always rendered) and, with the page on, its LiteLLM key. Keys only as references. */}}
{{- define "realtime-sidecar.browserEnv" -}}
{{- with .Values.clientSecrets.existingSecret }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_CLIENT_SECRET_KEY" "secret" . "key" $.Values.clientSecrets.existingSecretKey) }}
{{- end }}
- name: SIDECAR_CAPTIONS_PAGE
  value: {{ ternary "true" "false" .Values.captions.enabled | quote }}
{{- if .Values.captions.enabled }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_CAPTIONS_KEY" "secret" .Values.captions.existingSecret "key" .Values.captions.existingSecretKey) }}
{{- end }}
{{- end }}

{{/* The LiteLLM ledger sink's settings, consumer only: LiteLLM's database URL from its Secret, the proxy's
     Redis (URL or Secret) and cache namespace. */}}
{{- define "realtime-sidecar.litellmLedgerEnv" -}}
{{- with .Values.litellmLedger }}
{{- if .enabled }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_LITELLM_DATABASE_URL" "secret" .existingSecret "key" .existingSecretKey) }}
{{- include "realtime-sidecar.urlEnv" (dict "name" "SIDECAR_LITELLM_REDIS_URL" "spec" .redis) }}
{{- with .redisNamespace }}
- name: SIDECAR_LITELLM_REDIS_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* LiteLLM's DB-stored models, sidecar only: LiteLLM's database URL and the proxy's salt key from Secrets. */}}
{{- define "realtime-sidecar.proxyModelsEnv" -}}
{{- with .Values.proxyModels }}
{{- if .enabled }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "SIDECAR_LITELLM_DATABASE_URL" "secret" .existingSecret "key" .existingSecretKey) }}
{{- with .saltKey.existingSecret }}
{{ include "realtime-sidecar.secretRefEnv" (dict "name" "LITELLM_SALT_KEY" "secret" . "key" $.Values.proxyModels.saltKey.existingSecretKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod annotations: the inline config's checksum (a change rolls the pods), the Prometheus scrape
     annotations, then the user's: (dict "ctx" $ "extra" MAP "scrape" BOOL). */}}
{{- define "realtime-sidecar.podAnnotations" -}}
{{- $annotations := dict }}
{{- if include "realtime-sidecar.inlineConfig" .ctx }}
{{- $_ := set $annotations "checksum/litellm-config" (include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum) }}
{{- end }}
{{- if .scrape }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (.port | default .ctx.Values.config.port | int | toString) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $annotations = merge (deepCopy (.extra | default dict)) $annotations }}
{{- with $annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes both Deployments mount: the config (read-only) and /tmp. */}}
{{- define "realtime-sidecar.configVolume" -}}
- name: litellm-config
  configMap:
    name: {{ include "realtime-sidecar.configMapName" . }}
    items:
      - key: {{ include "realtime-sidecar.configKey" . }}
        path: config.yaml
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
{{- end }}

{{- define "realtime-sidecar.configMounts" -}}
- name: litellm-config
  mountPath: {{ .Values.litellmConfig.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Time from the start of termination to SIGKILL: preStop sleep + drain + a margin for the last
     usage flush (uvicorn's own graceful timeout is drain + 5 s). */}}
{{- define "realtime-sidecar.terminationGracePeriodSeconds" -}}
{{- $floor := add (int .Values.preStopSleepSeconds) (int (ceil .Values.config.drainGraceS)) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $floor 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $floor }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + config.drainGraceS (%v): Kubernetes counts the preStop hook in the grace period" .Values.terminationGracePeriodSeconds $floor) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* "true" when an annotation map sets ingress-nginx authentication (auth-url, auth-type, auth-tls-secret). */}}
{{- define "realtime-sidecar.hasAuthAnnotation" -}}
{{- range $key, $value := . }}
{{- if and $value (regexMatch "/auth-(url|type|tls-secret)$" $key) }}true{{ end }}
{{- end }}
{{- end }}

{{/* Checks the schema cannot express. Included once, from the sidecar Deployment. */}}
{{- define "realtime-sidecar.validate" -}}
{{- if and (not .Values.litellmConfig.existingConfigMap) (empty .Values.litellmConfig.inline) }}
{{- fail "litellmConfig: set existingConfigMap (the LiteLLM proxy's ConfigMap) or inline (its config.yaml)" }}
{{- end }}
{{- with .Values.redis }}
{{- if and .sentinel.nodes .cluster.nodes }}
{{- fail "redis: set sentinel.nodes or cluster.nodes, not both (SIDECAR_REDIS_SENTINEL_NODES and SIDECAR_REDIS_CLUSTER_NODES name different kinds of Redis)" }}
{{- end }}
{{- if and (or .sentinel.nodes .cluster.nodes) (or .url .existingSecret) }}
{{- fail "redis: with sentinel.nodes or cluster.nodes set redis.url and redis.existingSecret to \"\" (SIDECAR_REDIS_URL names a single Redis)" }}
{{- end }}
{{- if and .sentinel.nodes (not .sentinel.serviceName) }}
{{- fail "redis.sentinel.nodes needs redis.sentinel.serviceName (SIDECAR_REDIS_SERVICE_NAME, the master's name, e.g. mymaster)" }}
{{- end }}
{{- end }}
{{- if and .Values.consumer.enabled (not (include "realtime-sidecar.hasRedis" .)) }}
{{- fail "consumer.enabled needs Redis (redis.url, redis.existingSecret, redis.sentinel or redis.cluster); without Redis the sidecar bills in-process (embedded mode): set consumer.enabled=false" }}
{{- end }}
{{- if and (or .Values.consumer.enabled (not (include "realtime-sidecar.hasRedis" .))) (not (include "realtime-sidecar.hasDatabase" .)) }}
{{- fail "the billing database is not set: database.existingSecret (preferred) or database.url" }}
{{- end }}
{{- if and .Values.litellmLedger.enabled (not .Values.consumer.enabled) }}
{{- fail "litellmLedger.enabled needs consumer.enabled: the LiteLLM sink is a consumer group of `sidecar consume`" }}
{{- end }}
{{- if and .Values.litellmLedger.enabled (not .Values.litellmLedger.existingSecret) }}
{{- fail "litellmLedger.enabled needs litellmLedger.existingSecret (and existingSecretKey): a Secret holding LiteLLM's DATABASE_URL (SIDECAR_LITELLM_DATABASE_URL)" }}
{{- end }}
{{- if and .Values.proxyModels.enabled (not .Values.proxyModels.existingSecret) }}
{{- fail "proxyModels.enabled needs proxyModels.existingSecret (and existingSecretKey): a Secret holding LiteLLM's DATABASE_URL (SIDECAR_LITELLM_DATABASE_URL)" }}
{{- end }}
{{- if and (eq .Values.consumer.sink "litellm") (not .Values.litellmLedger.enabled) }}
{{- fail "consumer.sink=litellm needs litellmLedger.enabled (and its existingSecret)" }}
{{- end }}
{{- range $name, $spec := dict "redis" .Values.redis "database" .Values.database "litellmLedger.redis" .Values.litellmLedger.redis }}
{{- if and $spec.url (regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@" $spec.url) }}
{{- fail (printf "%s.url carries a password: put the URL in a Secret and set %s.existingSecret" $name $name) }}
{{- end }}
{{- end }}
{{- if and .Values.captions.enabled (not .Values.captions.existingSecret) }}
{{- fail "captions.enabled needs captions.existingSecret (and existingSecretKey): a Secret holding the LiteLLM key the captions page mints client secrets with (SIDECAR_CAPTIONS_KEY); the sidecar refuses to start without it" }}
{{- end }}
{{- with .Values.captions.ingress }}
{{- if and $.Values.captions.enabled $.Values.ingress.enabled .enabled (not .allowWithoutAuth) (not (include "realtime-sidecar.hasAuthAnnotation" .annotations)) }}
{{- fail "captions.ingress: the sidecar does not check who calls /captions/token (it mints secrets billed to the captions key): set your ingress auth in captions.ingress.annotations (e.g. nginx.ingress.kubernetes.io/auth-url), or captions.ingress.allowWithoutAuth=true if auth is enforced in front of the ingress" }}
{{- end }}
{{- end }}
{{- with .Values.litellmConfig.inline }}
{{- $master := dig "general_settings" "master_key" "" . }}
{{- if and $master (not (hasPrefix "os.environ/" (toString $master))) }}
{{- fail "litellmConfig.inline: general_settings.master_key must be an os.environ/NAME reference (resolved from secretEnv), not the key itself" }}
{{- end }}
{{- range .model_list }}
{{- $key := dig "litellm_params" "api_key" "" . }}
{{- if and $key (not (hasPrefix "os.environ/" (toString $key))) }}
{{- fail (printf "litellmConfig.inline: the api_key of model %q must be an os.environ/NAME reference (resolved from secretEnv), not the key itself" (toString .model_name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
