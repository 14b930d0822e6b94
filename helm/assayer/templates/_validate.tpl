{{/*
Checks of combinations of values that the schema cannot express. Every problem found is reported,
in one failure, with the keys involved and what to do.
*/}}
{{- define "assayer.validateValues" -}}
{{- $v := .Values }}
{{- $errors := list }}

{{- /* Redis: exactly one of the in-chart Redis or an external one. */}}
{{- $external := or $v.externalRedis.url $v.externalRedis.existingSecret }}
{{- if and $v.redis.enabled $external }}
{{- $errors = append $errors "redis.enabled is true and externalRedis is set: set redis.enabled=false to use the external Redis, or clear externalRedis" }}
{{- end }}
{{- if and (not $v.redis.enabled) (not $external) }}
{{- $errors = append $errors "redis.enabled is false but neither externalRedis.url nor externalRedis.existingSecret is set: Assayer needs a Redis" }}
{{- end }}
{{- if and $v.externalRedis.url $v.externalRedis.existingSecret }}
{{- $errors = append $errors "externalRedis.url and externalRedis.existingSecret are both set: give the URL in values or in the Secret, not both" }}
{{- end }}
{{- if and $v.externalRedis.password $v.externalRedis.existingSecret }}
{{- $errors = append $errors "externalRedis.password and externalRedis.existingSecret are both set: put the password in the Secret (externalRedis.existingSecretPasswordKey)" }}
{{- end }}
{{- if and $v.redis.auth.password $v.redis.auth.existingSecret }}
{{- $errors = append $errors "redis.auth.password and redis.auth.existingSecret are both set: choose one" }}
{{- end }}

{{- /* Checkpoints: exactly one source. */}}
{{- $cp := $v.checkpoints }}
{{- $sources := list }}
{{- if $cp.existingClaim }}{{ $sources = append $sources "checkpoints.existingClaim" }}{{ end }}
{{- if $cp.persistence.enabled }}{{ $sources = append $sources "checkpoints.persistence.enabled" }}{{ end }}
{{- if $cp.hostPath.path }}{{ $sources = append $sources "checkpoints.hostPath.path" }}{{ end }}
{{- if eq (len $sources) 0 }}
{{- $errors = append $errors "no checkpoint volume: set one of checkpoints.existingClaim, checkpoints.persistence.enabled=true or checkpoints.hostPath.path" }}
{{- else if gt (len $sources) 1 }}
{{- $errors = append $errors (printf "several checkpoint volumes (%s): choose one (to use an existing claim or a hostPath, also set checkpoints.persistence.enabled=false)" (join ", " $sources)) }}
{{- end }}

{{- /* Results: one source; a claim written by several eval pods must be ReadWriteMany. */}}
{{- $res := $v.results }}
{{- if and $res.existingClaim $res.persistence.enabled }}
{{- $errors = append $errors "results.existingClaim and results.persistence.enabled are both set: set results.persistence.enabled=false to use the existing claim" }}
{{- end }}
{{- $evalPods := $v.eval.replicas }}
{{- if $v.eval.keda.enabled }}{{ $evalPods = $v.eval.keda.maxReplicaCount }}{{ end }}
{{- if $v.eval.hpa.enabled }}{{ $evalPods = $v.eval.hpa.maxReplicas }}{{ end }}
{{- if and $res.persistence.enabled (not $res.existingClaim) (ne $res.persistence.accessMode "ReadWriteMany") (gt (int $evalPods) 1) }}
{{- $errors = append $errors (printf "results.persistence.accessMode is %s but up to %d eval pods write results: use ReadWriteMany, or one eval pod" $res.persistence.accessMode (int $evalPods)) }}
{{- end }}

{{- /* TensorBoard: watch pods write results too; a ReadWriteOnce claim cannot take pods on several nodes. */}}
{{- if and (include "assayer.trackers.tensorboardOnResults" .) $res.persistence.enabled (not $res.existingClaim) (ne $res.persistence.accessMode "ReadWriteMany") (le (int $evalPods) 1) (gt (add (int $evalPods) (int $v.watch.replicas)) 1) }}
{{- $errors = append $errors (printf "results.persistence.accessMode is %s but TensorBoard makes the watch pods write results beside the eval pods: use ReadWriteMany, or give each tensorboard watch a tensorboard_dir on a volume of watch.extraVolumes (and keep tensorboard out of trackers.reportTo)" $res.persistence.accessMode) }}
{{- end }}

{{- /* Evaluators: at most one source. */}}
{{- $ev := $v.evaluators }}
{{- $evSources := list }}
{{- if $ev.files }}{{ $evSources = append $evSources "evaluators.files" }}{{ end }}
{{- if $ev.existingConfigMap }}{{ $evSources = append $evSources "evaluators.existingConfigMap" }}{{ end }}
{{- if $ev.volume }}{{ $evSources = append $evSources "evaluators.volume" }}{{ end }}
{{- if gt (len $evSources) 1 }}
{{- $errors = append $errors (printf "several evaluator sources (%s): choose one" (join ", " $evSources)) }}
{{- end }}

{{- /* Watches: unique names, directories inside the checkpoint mount. */}}
{{- $names := dict }}
{{- range $i, $w := $v.watches }}
{{- if hasKey $names $w.name }}
{{- $errors = append $errors (printf "watches[%d].name %q is used twice: watch names must be unique" $i $w.name) }}
{{- end }}
{{- $_ := set $names $w.name true }}
{{- $mount := trimSuffix "/" $v.checkpoints.mountPath }}
{{- if and (hasPrefix "/" $w.directory) (ne $w.directory $mount) (not (hasPrefix (printf "%s/" $mount) $w.directory)) }}
{{- $errors = append $errors (printf "watches[%d].directory %q is outside checkpoints.mountPath %q: watch pods only see the checkpoint volume; use a path under it or a relative one" $i $w.directory $mount) }}
{{- end }}
{{- end }}

{{- /* Trackers: a watch's per-tracker option needs that tracker (the watch worker refuses the watch otherwise). */}}
{{- $defaultReport := splitList "," (replace " " "" $v.trackers.reportTo) }}
{{- range $i, $w := $v.watches }}
{{- $report := ternary (default list $w.report_to) $defaultReport (hasKey $w "report_to") }}
{{- range $option, $sink := dict "tensorboard_dir" "tensorboard" "mlflow_run_id" "mlflow" "wandb_run_id" "wandb" }}
{{- if and (index $w $option) (not (has $sink $report)) }}
{{- $errors = append $errors (printf "watches[%d].%s is set but %s is not in its report_to (nor, without report_to, in trackers.reportTo): add %s to report_to" $i $option $sink $sink) }}
{{- end }}
{{- end }}
{{- end }}
{{- $wandb := $v.trackers.wandb }}
{{- if and $wandb.apiKey $wandb.existingSecret }}
{{- $errors = append $errors "trackers.wandb.apiKey and trackers.wandb.existingSecret are both set: choose one" }}
{{- end }}
{{- if has "wandb" (splitList "," (include "assayer.trackers.used" .)) }}
{{- if and (has $wandb.mode (list "" "online")) (not $wandb.apiKey) (not $wandb.existingSecret) }}
{{- $errors = append $errors (printf "W&B is in trackers.reportTo or a watch's report_to and trackers.wandb.mode is %s, but there is no API key: set trackers.wandb.existingSecret (a Secret with key trackers.wandb.existingSecretKey) or trackers.wandb.apiKey, or use trackers.wandb.mode=offline" (ternary "online" "empty (online)" (eq $wandb.mode "online"))) }}
{{- end }}
{{- if eq $wandb.mode "disabled" }}
{{- $errors = append $errors "trackers.wandb.mode is disabled but W&B is in trackers.reportTo or a watch's report_to: Assayer cannot deliver to a disabled W&B; remove wandb from report_to, or use online or offline" }}
{{- end }}
{{- end }}

{{- /* Queues. */}}
{{- if eq $v.config.watchQueue $v.config.evalQueue }}
{{- $errors = append $errors (printf "config.watchQueue and config.evalQueue are both %q: scan and evaluation jobs need separate queues" $v.config.evalQueue) }}
{{- end }}

{{- /* Leases: a busy worker must heartbeat at least twice per lease (the settings refuse it otherwise). */}}
{{- if gt (mulf 2.0 (float64 $v.config.heartbeatInterval)) (float64 $v.config.leaseTTL) }}
{{- $errors = append $errors (printf "config.heartbeatInterval (%v) must be at most half of config.leaseTTL (%v): raise leaseTTL or lower heartbeatInterval" $v.config.heartbeatInterval $v.config.leaseTTL) }}
{{- end }}

{{- /* Autoscaling. */}}
{{- $keda := $v.eval.keda }}
{{- if and $keda.enabled $v.eval.hpa.enabled }}
{{- $errors = append $errors "eval.keda.enabled and eval.hpa.enabled are both true: KEDA creates its own HPA, enable only one" }}
{{- end }}
{{- if and $keda.enabled (not (.Capabilities.APIVersions.Has "keda.sh/v1alpha1")) }}
{{- $errors = append $errors "eval.keda.enabled is true but the cluster has no keda.sh/v1alpha1 API: install KEDA first (with `helm template`, pass --api-versions keda.sh/v1alpha1)" }}
{{- end }}
{{- if and $keda.enabled (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- $errors = append $errors (printf "eval.keda.minReplicaCount %d is above eval.keda.maxReplicaCount %d" (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- end }}
{{- if and $keda.enabled (not $v.redis.enabled) $v.externalRedis.existingSecret (not $keda.redisAddress) }}
{{- $errors = append $errors "eval.keda.enabled with externalRedis.existingSecret needs eval.keda.redisAddress (host:port): KEDA cannot read the URL from the Secret" }}
{{- end }}
{{- if and $keda.enabled (not $v.redis.enabled) $v.externalRedis.url (not $keda.redisAddress) }}
{{- $url := urlParse $v.externalRedis.url }}
{{- if eq $url.scheme "unix" }}
{{- $errors = append $errors "eval.keda.enabled with a unix:// externalRedis.url: KEDA's operator cannot reach a socket; set eval.keda.redisAddress (host:port)" }}
{{- end }}
{{- if and (contains ":" (default "" $url.userinfo)) (not $v.externalRedis.password) }}
{{- $errors = append $errors "eval.keda.enabled and externalRedis.url carries the password: move it to externalRedis.password so KEDA can authenticate too" }}
{{- end }}
{{- end }}
{{- $hpa := $v.eval.hpa }}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- $errors = append $errors (printf "eval.hpa.minReplicas %d is above eval.hpa.maxReplicas %d" (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- end }}
{{- if and $hpa.enabled (not (dig "requests" "cpu" "" $v.eval.resources)) }}
{{- $errors = append $errors "eval.hpa.enabled needs eval.resources.requests.cpu: the HPA scales on CPU use relative to the request" }}
{{- end }}

{{- /* Warm shutdown must outlast an evaluation. */}}
{{- if and (gt (float64 $v.config.evalTimeout) 0.0) (lt (float64 $v.eval.terminationGracePeriodSeconds) (float64 $v.config.evalTimeout)) }}
{{- $errors = append $errors (printf "eval.terminationGracePeriodSeconds (%v) is shorter than config.evalTimeout (%v): a scaled-down or upgraded eval pod would be killed mid-evaluation; raise the grace period" $v.eval.terminationGracePeriodSeconds $v.config.evalTimeout) }}
{{- end }}

{{- /* Dashboard. */}}
{{- $d := $v.dashboard }}
{{- if and $d.auth.password $d.auth.existingSecret }}
{{- $errors = append $errors "dashboard.auth.password and dashboard.auth.existingSecret are both set: choose one" }}
{{- end }}
{{- if and $d.ingress.enabled (not $d.enabled) }}
{{- $errors = append $errors "dashboard.ingress.enabled is true but dashboard.enabled is false: the Ingress would have no backend" }}
{{- end }}
{{- $np := $v.networkPolicy }}
{{- if and $d.enabled $d.ingress.enabled $np.enabled (not $np.dashboard.ingressController.namespace) (not $np.dashboardFrom) }}
{{- $errors = append $errors "dashboard.ingress.enabled is true but the dashboard's NetworkPolicy admits no Ingress controller: set networkPolicy.dashboard.ingressController.namespace (and podLabels), or name the controller's pods or address ranges in networkPolicy.dashboardFrom" }}
{{- end }}

{{- /* Exporter: a ServiceMonitor needs the exporter and prometheus-operator's API; its timeout fits in its interval. */}}
{{- $sm := $v.exporter.serviceMonitor }}
{{- $smAPI := include "assayer.exporter.serviceMonitorAPI" . }}
{{- if and $sm.enabled (not $v.exporter.enabled) }}
{{- $errors = append $errors "exporter.serviceMonitor.enabled is true but exporter.enabled is false: the ServiceMonitor would select no Service" }}
{{- end }}
{{- if and $sm.enabled $v.exporter.enabled (not (.Capabilities.APIVersions.Has $smAPI)) }}
{{- $errors = append $errors (printf "exporter.serviceMonitor.enabled is true but the cluster has no %s API: install prometheus-operator's CRDs first (with `helm template`, pass --api-versions %s), or scrape by annotation (exporter.scrapeAnnotations)" $smAPI $smAPI) }}
{{- end }}
{{- if and $sm.enabled $sm.interval $sm.scrapeTimeout }}
{{- if gt (include "assayer.durationMs" $sm.scrapeTimeout | int64) (include "assayer.durationMs" $sm.interval | int64) }}
{{- $errors = append $errors (printf "exporter.serviceMonitor.scrapeTimeout (%s) is longer than exporter.serviceMonitor.interval (%s): prometheus-operator rejects it; shorten the timeout" $sm.scrapeTimeout $sm.interval) }}
{{- end }}
{{- end }}

{{- if $errors }}
{{- $count := printf "%d %s" (len $errors) (ternary "problem" "problems" (eq (len $errors) 1)) }}
{{- fail (printf "\n\nassayer: invalid values (%s):\n  - %s\n" $count (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
