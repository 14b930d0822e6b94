{{/*
Names, labels, images and the pieces of pod specs that several components share.
Every helper is namespaced "assayer.".
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "assayer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or just the release when it already contains the chart name), max 63 chars. */}}
{{- define "assayer.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "assayer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select a component's pods. Call with (dict "ctx" $ "component" "eval"). */}}
{{- define "assayer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "assayer.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* Every label of a component's objects. Call with (dict "ctx" $ "component" "eval"). */}}
{{- define "assayer.labels" -}}
helm.sh/chart: {{ include "assayer.chart" .ctx }}
{{ include "assayer.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: assayer
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the ServiceAccount of every Assayer pod. */}}
{{- define "assayer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "assayer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* storageClassName line for a PVC spec: "" = cluster default (omitted), "-" = no dynamic provisioning. */}}
{{- define "assayer.storageClass" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The Assayer image reference. Call with (dict "ctx" $ "override" .Values.eval.image) or (dict "ctx" $).
A digest pins the image and wins over the tag.
*/}}
{{- define "assayer.image" -}}
{{- $image := .ctx.Values.image }}
{{- $override := default dict .override }}
{{- $repository := default $image.repository $override.repository }}
{{- $tag := default (default .ctx.Chart.AppVersion $image.tag) $override.tag }}
{{- if and $image.digest (not $override.repository) (not $override.tag) }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis */}}

{{/* Name of the in-chart Redis StatefulSet and Service. */}}
{{- define "assayer.redis.fullname" -}}
{{- printf "%s-redis" (include "assayer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret holding the Redis password (in-chart Redis) or the URL and password (external Redis). */}}
{{- define "assayer.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "assayer.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- default (printf "%s-external-redis" (include "assayer.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{/* Key of the Redis password in assayer.redis.secretName; empty when there is no password key. */}}
{{- define "assayer.redis.passwordKey" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else -}}
redis-password
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- else if .Values.externalRedis.password -}}
redis-password
{{- end }}
{{- end }}

{{/* Key of the Redis URL in the external Redis Secret. */}}
{{- define "assayer.redis.urlKey" -}}
{{- if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecretUrlKey }}
{{- else -}}
redis-url
{{- end }}
{{- end }}

{{/* URL of the in-chart Redis (no credentials: the password comes separately). */}}
{{- define "assayer.redis.url" -}}
{{- printf "redis://%s:6379/0" (include "assayer.redis.fullname" .) }}
{{- end }}

{{/* The Redis list of an rq queue: rq keeps queue <name> in the list rq:queue:<name>. */}}
{{- define "assayer.queueKey" -}}
{{- printf "rq:queue:%s" . }}
{{- end }}

{{/*
ASSAYER_REDIS_URL and ASSAYER_REDIS_PASSWORD as container env entries. Credentials always come
from a secretKeyRef, never as a literal value.
*/}}
{{- define "assayer.redis.env" -}}
{{- $secret := include "assayer.redis.secretName" . }}
{{- if .Values.redis.enabled }}
- name: ASSAYER_REDIS_URL
  value: {{ include "assayer.redis.url" . | quote }}
{{- else }}
- name: ASSAYER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "assayer.redis.urlKey" . }}
{{- end }}
{{- with include "assayer.redis.passwordKey" . }}
- name: ASSAYER_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- eval pools */}}

{{/*
Every eval pool with its settings, in .out (a dict: templates cannot return objects, so the helper
fills the one it is given). Call with (dict "ctx" $ "out" $pools); then range over $pools.
"default" is the eval block (evalPools.default is refused); any other pool is the eval block overridden
by evalPools.<pool>: a key
of the pool replaces eval's, except in the groups assayer.eval.mergedGroups, whose keys replace
eval's one by one (gpu: {enabled: true} keeps eval's gpu.count and gpu.nodeSelector).
*/}}
{{- define "assayer.eval.pools" -}}
{{- $eval := .ctx.Values.eval }}
{{- $_ := set .out "default" $eval }}
{{- $groups := include "assayer.eval.mergedGroups" . | splitList " " }}
{{- range $pool, $overrides := omit .ctx.Values.evalPools "default" }}
{{- $e := deepCopy $eval }}
{{- range $key, $value := $overrides }}
{{- if and (has $key $groups) (kindIs "map" $value) }}
{{- $group := deepCopy (index $eval $key) }}
{{- range $k, $v := $value }}
{{- $_ := set $group $k $v }}
{{- end }}
{{- $_ := set $e $key $group }}
{{- else }}
{{- $_ := set $e $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $.out $pool $e }}
{{- end }}
{{- end }}

{{/* The groups of eval settings that a pool overrides key by key rather than as a whole. */}}
{{- define "assayer.eval.mergedGroups" -}}
image resources gpu keda hpa startupProbe livenessProbe readinessProbe
{{- end }}

{{/*
Name of a pool's Deployment, and of its ScaledObject or HPA: <fullname>-eval for the default pool
(the name from before pools), <fullname>-eval-<pool> for the others. Call with (dict "ctx" $ "pool" "gpu").
*/}}
{{- define "assayer.eval.fullname" -}}
{{- if eq .pool "default" }}
{{- printf "%s-eval" (include "assayer.fullname" .ctx) }}
{{- else }}
{{- printf "%s-eval-%s" (include "assayer.fullname" .ctx) .pool }}
{{- end }}
{{- end }}

{{/*
app.kubernetes.io/component of a pool's objects: eval for the default pool, eval-<pool> for the
others. Each Deployment's selector thus matches its own pods only (a Deployment's selector cannot
change, so the default pool keeps the one from before pools). Call with the pool's name.
*/}}
{{- define "assayer.eval.component" -}}
{{- if eq . "default" }}eval{{ else }}{{ printf "eval-%s" . }}{{ end }}
{{- end }}

{{/*
The rq queue of a pool's new work, as Assayer names it: ASSAYER_EVAL_QUEUE for the default pool,
<ASSAYER_EVAL_QUEUE>-<pool> for the others; its backfill (re-evaluations of older checkpoints) is
the same name with -backfill. Call with (dict "ctx" $ "pool" "gpu").
*/}}
{{- define "assayer.eval.queue" -}}
{{- if eq .pool "default" }}
{{- .ctx.Values.config.evalQueue }}
{{- else }}
{{- printf "%s-%s" .ctx.Values.config.evalQueue .pool }}
{{- end }}
{{- end }}

{{/* The suffix of a pool's backfill queue. */}}
{{- define "assayer.eval.backfillSuffix" -}}
-backfill
{{- end }}

{{/* "true" when some pool (the default one or an evalPools entry) is scaled by KEDA. */}}
{{- define "assayer.eval.kedaEnabled" -}}
{{- $pools := dict }}
{{- include "assayer.eval.pools" (dict "ctx" . "out" $pools) }}
{{- $on := false }}
{{- range $pools }}{{ if .keda.enabled }}{{ $on = true }}{{ end }}{{ end }}
{{- if $on }}true{{ end }}
{{- end }}

{{/* Pool names of the evalPools keys: a DNS label of at most 30 characters, as Assayer checks them. */}}
{{- define "assayer.eval.poolPattern" -}}
^[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?$
{{- end }}

{{/* ---------------------------------------------------------------- KEDA */}}

{{/* host:port of Redis for KEDA's redis scaler, which runs in the operator's namespace. */}}
{{- define "assayer.keda.redisAddress" -}}
{{- $keda := .Values.eval.keda }}
{{- if $keda.redisAddress }}
{{- $keda.redisAddress }}
{{- else if .Values.redis.enabled }}
{{- printf "%s.%s.svc.%s:6379" (include "assayer.redis.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- else if .Values.externalRedis.url }}
{{- $url := urlParse .Values.externalRedis.url }}
{{- $host := regexReplaceAll "^.*@" $url.host "" }}
{{- if contains ":" $host }}{{ $host }}{{ else }}{{ printf "%s:6379" $host }}{{ end }}
{{- end }}
{{- end }}

{{/* Redis database index for KEDA: from externalRedis.url's path, 0 for the in-chart Redis. */}}
{{- define "assayer.keda.redisDatabase" -}}
{{- $keda := .Values.eval.keda }}
{{- if $keda.redisAddress }}
{{- $keda.redisDatabaseIndex }}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.url }}
{{- $db := trimPrefix "/" (urlParse .Values.externalRedis.url).path }}
{{- default "0" $db }}
{{- else -}}
0
{{- end }}
{{- end }}

{{/* "true" when KEDA must talk TLS to Redis (rediss:// URL, or redisEnableTLS with redisAddress). */}}
{{- define "assayer.keda.redisTLS" -}}
{{- $keda := .Values.eval.keda }}
{{- if $keda.redisAddress }}
{{- $keda.redisEnableTLS | toString }}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.url }}
{{- eq (urlParse .Values.externalRedis.url).scheme "rediss" | toString }}
{{- else -}}
false
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- pods */}}

{{/* Name of the ConfigMap of ASSAYER_* settings. */}}
{{- define "assayer.configMapName" -}}
{{- printf "%s-config" (include "assayer.fullname" .) }}
{{- end }}

{{/* Name of the ConfigMap holding watches.yaml. */}}
{{- define "assayer.watchesConfigMapName" -}}
{{- printf "%s-watches" (include "assayer.fullname" .) }}
{{- end }}

{{/* Where watches.yaml is mounted. */}}
{{- define "assayer.watchesDir" -}}
/etc/assayer
{{- end }}

{{/* Name of the checkpoint claim (existing or chart-made); empty for hostPath. */}}
{{- define "assayer.checkpoints.claimName" -}}
{{- if .Values.checkpoints.existingClaim }}
{{- .Values.checkpoints.existingClaim }}
{{- else if .Values.checkpoints.persistence.enabled }}
{{- printf "%s-checkpoints" (include "assayer.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the results claim (existing or chart-made); empty means an emptyDir. */}}
{{- define "assayer.results.claimName" -}}
{{- if .Values.results.existingClaim }}
{{- .Values.results.existingClaim }}
{{- else if .Values.results.persistence.enabled }}
{{- printf "%s-results" (include "assayer.fullname" .) }}
{{- end }}
{{- end }}

{{/* true when evaluator code is mounted (otherwise it comes from the image). */}}
{{- define "assayer.evaluators.mounted" -}}
{{- $e := .Values.evaluators }}
{{- if or $e.files $e.existingConfigMap $e.volume }}true{{ end }}
{{- end }}

{{/* A watch's directory: a relative one is taken under checkpoints.mountPath. */}}
{{- define "assayer.watchDirectory" -}}
{{- if hasPrefix "/" .directory }}
{{- .directory }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .mountPath) .directory }}
{{- end }}
{{- end }}

{{/* watches.yaml in the format of the CLI's watches file. */}}
{{- define "assayer.watchesFile" -}}
{{- $watches := list }}
{{- range .Values.watches }}
{{- $w := deepCopy . }}
{{- $_ := set $w "directory" (include "assayer.watchDirectory" (dict "directory" .directory "mountPath" $.Values.checkpoints.mountPath)) }}
{{- $watches = append $watches $w }}
{{- end }}
{{- toYaml (dict "watches" $watches) }}
{{- end }}

{{/* Pod annotations that roll pods when their configuration changes. */}}
{{- define "assayer.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/config/config-configmap.yaml") . | sha256sum }}
checksum/watches: {{ include (print .Template.BasePath "/config/watches-configmap.yaml") . | sha256sum }}
{{- if .Values.evaluators.files }}
checksum/evaluators: {{ include (print .Template.BasePath "/config/evaluators-configmap.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* Health probes that ask the worker itself. Call with (dict "role" "eval" "probe" .Values.eval.livenessProbe). */}}
{{- define "assayer.healthProbe" -}}
exec:
  command: ["assayer", "health", {{ .role | quote }}]
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* Volumes every Assayer worker pod has: its home, /tmp, and the watches file. */}}
{{- define "assayer.baseVolumes" -}}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.home.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.home.sizeLimit }}
{{- end }}

{{/* Mounts matching assayer.baseVolumes. */}}
{{- define "assayer.baseVolumeMounts" -}}
- name: home
  mountPath: {{ .Values.home.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The checkpoint, watches and evaluator volumes of watch and eval pods. */}}
{{- define "assayer.workerVolumes" -}}
{{ include "assayer.baseVolumes" . }}
- name: checkpoints
{{- if .Values.checkpoints.hostPath.path }}
  hostPath:
    path: {{ .Values.checkpoints.hostPath.path }}
    type: {{ .Values.checkpoints.hostPath.type }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "assayer.checkpoints.claimName" . }}
    readOnly: true
{{- end }}
- name: watches
  configMap:
    name: {{ include "assayer.watchesConfigMapName" . }}
{{- if .Values.evaluators.files }}
- name: evaluators
  configMap:
    name: {{ printf "%s-evaluators" (include "assayer.fullname" .) }}
{{- else if .Values.evaluators.existingConfigMap }}
- name: evaluators
  configMap:
    name: {{ .Values.evaluators.existingConfigMap }}
{{- else if .Values.evaluators.volume }}
- name: evaluators
{{ toYaml .Values.evaluators.volume | indent 2 }}
{{- end }}
{{- end }}

{{/* Mounts matching assayer.workerVolumes; checkpoints, watches and evaluators are read-only. */}}
{{- define "assayer.workerVolumeMounts" -}}
{{ include "assayer.baseVolumeMounts" . }}
- name: checkpoints
  mountPath: {{ .Values.checkpoints.mountPath }}
  readOnly: true
{{- with .Values.checkpoints.subPath }}
  subPath: {{ . }}
{{- end }}
- name: watches
  mountPath: {{ include "assayer.watchesDir" . }}
  readOnly: true
{{- if include "assayer.evaluators.mounted" . }}
- name: evaluators
  mountPath: {{ .Values.evaluators.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Env entries every Assayer container gets besides the ConfigMap: Redis and evaluator path. */}}
{{- define "assayer.commonEnv" -}}
{{ include "assayer.redis.env" . | trim }}
{{- if include "assayer.evaluators.mounted" . }}
- name: PYTHONPATH
  value: {{ .Values.evaluators.mountPath | quote }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- exporter */}}

{{/* Name of the exporter's Deployment, Service, ServiceMonitor and NetworkPolicy. */}}
{{- define "assayer.exporter.fullname" -}}
{{- printf "%s-exporter" (include "assayer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prometheus-operator API of the ServiceMonitor. */}}
{{- define "assayer.exporter.serviceMonitorAPI" -}}
monitoring.coreos.com/v1
{{- end }}

{{/*
Milliseconds of a Prometheus duration ("1m30s", "500ms"); 0 for "". Only the form the schema
admits (units y, w, d, h, m, s, ms, largest first) is expected.
*/}}
{{- define "assayer.durationMs" -}}
{{- $rest := . }}
{{- $total := 0 }}
{{- with regexFind "[0-9]+ms$" $rest }}
{{- $total = add $total (trimSuffix "ms" . | int64) }}
{{- $rest = trimSuffix . $rest }}
{{- end }}
{{- range $unit, $factor := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 }}
{{- with regexFind (printf "[0-9]+%s" $unit) $rest }}
{{- $total = add $total (mul (trimSuffix $unit . | int64) $factor) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/* ---------------------------------------------------------------- trackers */}}

{{/* The trackers named anywhere in values (trackers.reportTo and every watch's report_to), comma joined. */}}
{{- define "assayer.trackers.used" -}}
{{- $used := list }}
{{- range splitList "," .Values.trackers.reportTo }}
{{- with trim . }}{{ $used = append $used . }}{{ end }}
{{- end }}
{{- range .Values.watches }}
{{- range (default list .report_to) }}{{ $used = append $used . }}{{ end }}
{{- end }}
{{- $used | uniq | sortAlpha | join "," }}
{{- end }}

{{/*
"true" when watch pods write TensorBoard event files under results.mountPath: trackers.reportTo
names tensorboard (the default of watches added later too), or a watch does without its own
tensorboard_dir. Watch pods then mount the results volume.
*/}}
{{- define "assayer.trackers.tensorboardOnResults" -}}
{{- $on := has "tensorboard" (splitList "," (replace " " "" .Values.trackers.reportTo)) }}
{{- range .Values.watches }}
{{- if and (has "tensorboard" (default list .report_to)) (not .tensorboard_dir) }}{{ $on = true }}{{ end }}
{{- end }}
{{- if $on }}true{{ end }}
{{- end }}

{{/* Secret holding WANDB_API_KEY: trackers.wandb.existingSecret, or the chart's own from apiKey. */}}
{{- define "assayer.trackers.secretName" -}}
{{- default (printf "%s-trackers" (include "assayer.fullname" .)) .Values.trackers.wandb.existingSecret }}
{{- end }}

{{/* Key of WANDB_API_KEY in assayer.trackers.secretName. */}}
{{- define "assayer.trackers.apiKeyKey" -}}
{{- if .Values.trackers.wandb.existingSecret }}
{{- .Values.trackers.wandb.existingSecretKey }}
{{- else -}}
wandb-api-key
{{- end }}
{{- end }}

{{/*
Env entries of the watch container only (eval pods never get tracker settings or credentials):
the settings of trackers that are set, and WANDB_API_KEY from a secretKeyRef, never a literal.
*/}}
{{- define "assayer.trackers.env" -}}
{{- $t := .Values.trackers -}}
- name: ASSAYER_DELIVERY_LEASE
  value: {{ $t.deliveryLease | toString | quote }}
{{- range $name, $value := dict "ASSAYER_REPORT_TO" $t.reportTo "MLFLOW_TRACKING_URI" $t.mlflow.trackingUri "MLFLOW_EXPERIMENT_NAME" $t.mlflow.experimentName "WANDB_PROJECT" $t.wandb.project "WANDB_ENTITY" $t.wandb.entity "WANDB_MODE" $t.wandb.mode }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- if or $t.wandb.existingSecret $t.wandb.apiKey }}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "assayer.trackers.secretName" . }}
      key: {{ include "assayer.trackers.apiKeyKey" . }}
{{- end }}
{{- end }}

{{/* The results volume: its claim, or an emptyDir. */}}
{{- define "assayer.results.volume" -}}
- name: results
{{- with include "assayer.results.claimName" . }}
  persistentVolumeClaim:
    claimName: {{ . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Name of the snapshot claim (existing or chart-made); empty when snapshots are off or have no claim. */}}
{{- define "assayer.snapshots.claimName" -}}
{{- $s := .Values.snapshots }}
{{- if $s.enabled }}
{{- if $s.existingClaim }}
{{- $s.existingClaim }}
{{- else if $s.persistence.enabled }}
{{- printf "%s-snapshots" (include "assayer.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The snapshot volume (its claim), when snapshots are enabled. */}}
{{- define "assayer.snapshots.volume" -}}
{{- with include "assayer.snapshots.claimName" . }}
- name: snapshots
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- end }}

{{/*
The snapshot mount: read-write in the watch pods, which make and release pins; read-only in the
eval pods, which only read them (dict "ctx" . "readOnly" bool).
*/}}
{{- define "assayer.snapshots.volumeMount" -}}
{{- if include "assayer.snapshots.claimName" .ctx }}
- name: snapshots
  mountPath: {{ .ctx.Values.snapshots.mountPath }}
  {{- if .readOnly }}
  readOnly: true
  {{- end }}
{{- end }}
{{- end }}
