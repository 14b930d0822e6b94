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

{{- /* Results: one source; a claim written by several eval pods (of all pools together) must be ReadWriteMany. */}}
{{- $res := $v.results }}
{{- if and $res.existingClaim $res.persistence.enabled }}
{{- $errors = append $errors "results.existingClaim and results.persistence.enabled are both set: set results.persistence.enabled=false to use the existing claim" }}
{{- end }}
{{- $pools := dict }}
{{- include "assayer.eval.pools" (dict "ctx" . "out" $pools) }}
{{- $evalPods := 0 }}
{{- range $pools }}
{{- $pods := .replicas }}
{{- if .keda.enabled }}{{ $pods = .keda.maxReplicaCount }}{{ end }}
{{- if .hpa.enabled }}{{ $pods = .hpa.maxReplicas }}{{ end }}
{{- $evalPods = add $evalPods (int $pods) }}
{{- end }}
{{- if and $res.persistence.enabled (not $res.existingClaim) (ne $res.persistence.accessMode "ReadWriteMany") (gt (int $evalPods) 1) }}
{{- $errors = append $errors (printf "results.persistence.accessMode is %s but up to %d eval pods write results: use ReadWriteMany, or one eval pod" $res.persistence.accessMode (int $evalPods)) }}
{{- end }}

{{- /* TensorBoard: watch pods write results too; a ReadWriteOnce claim cannot take pods on several nodes. */}}
{{- if and (include "assayer.trackers.tensorboardOnResults" .) $res.persistence.enabled (not $res.existingClaim) (ne $res.persistence.accessMode "ReadWriteMany") (le (int $evalPods) 1) (gt (add (int $evalPods) (int $v.watch.replicas)) 1) }}
{{- $errors = append $errors (printf "results.persistence.accessMode is %s but TensorBoard makes the watch pods write results beside the eval pods: use ReadWriteMany, or give each tensorboard watch a tensorboard_dir on a volume of watch.extraVolumes (and keep tensorboard out of trackers.reportTo)" $res.persistence.accessMode) }}
{{- end }}

{{- /* Snapshots: one claim, shared by the watch pods (writing) and the eval pods (reading). An
emptyDir is no option: it belongs to one pod, and watch and eval are separate pods. */}}
{{- $snap := $v.snapshots }}
{{- if $snap.enabled }}
{{- if and $snap.existingClaim $snap.persistence.enabled }}
{{- $errors = append $errors "snapshots.existingClaim and snapshots.persistence.enabled are both set: set snapshots.persistence.enabled=false to use the existing claim" }}
{{- else if not (or $snap.existingClaim $snap.persistence.enabled) }}
{{- $errors = append $errors "snapshots.enabled needs a claim the watch and eval pods share: set snapshots.existingClaim or snapshots.persistence.enabled=true (an emptyDir cannot be shared: watch and eval are separate pods)" }}
{{- else if and $snap.persistence.enabled (ne $snap.persistence.accessMode "ReadWriteMany") }}
{{- $errors = append $errors (printf "snapshots.persistence.accessMode is %s but the watch pods write snapshots and the eval pods read them, on any node: use ReadWriteMany (or an existingClaim, if every watch and eval pod shares a node)" $snap.persistence.accessMode) }}
{{- end }}
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

{{- /* Pools: evalPools keys are pool names (the schema checks them too); the default pool is the eval block. */}}
{{- range $pool := keys $v.evalPools | sortAlpha }}
{{- if eq $pool "default" }}
{{- $errors = append $errors "evalPools.default is set: the default pool's settings are the eval block; move them there" }}
{{- else if not (regexMatch (include "assayer.eval.poolPattern" $) $pool) }}
{{- $errors = append $errors (printf "evalPools key %q is not a pool name: use lower-case letters, digits and '-' (at most 30, not starting or ending with '-'), e.g. gpu or a100-80g" $pool) }}
{{- end }}
{{- end }}

{{- /* Every pool's queue and backfill queue is its own rq queue: a pool named "backfill" would take the default pool's backfill queue. */}}
{{- $owners := dict $v.config.watchQueue "config.watchQueue" }}
{{- $backfill := include "assayer.eval.backfillSuffix" . }}
{{- range $pool := prepend (without (keys $v.evalPools | sortAlpha) "default") "default" }}
{{- $queue := include "assayer.eval.queue" (dict "ctx" $ "pool" $pool) }}
{{- $who := ternary "the default pool" (printf "pool %s (evalPools.%s)" $pool $pool) (eq $pool "default") }}
{{- range $q, $what := dict $queue (printf "the queue of %s" $who) (printf "%s%s" $queue $backfill) (printf "the backfill queue of %s" $who) }}
{{- $other := get $owners $q }}
{{- if and $other (not (and (eq $other "config.watchQueue") (eq $q $v.config.evalQueue))) }}
{{- $errors = append $errors (printf "%s and %s are both the rq queue %q: rename the pool (or change config.watchQueue)" $other $what $q) }}
{{- end }}
{{- $_ := set $owners $q $what }}
{{- end }}
{{- end }}

{{- /* Leases: a busy worker must heartbeat at least twice per lease (the settings refuse it otherwise). */}}
{{- if gt (mulf 2.0 (float64 $v.config.heartbeatInterval)) (float64 $v.config.leaseTTL) }}
{{- $errors = append $errors (printf "config.heartbeatInterval (%v) must be at most half of config.leaseTTL (%v): raise leaseTTL or lower heartbeatInterval" $v.config.heartbeatInterval $v.config.leaseTTL) }}
{{- end }}

{{- /*
Autoscaling and warm shutdown, for each pool's Deployment. A pool takes from eval what it does not
set, so a problem of eval's values is reported once, for eval; a pool's own message comes only where
the pool sets one of the keys involved.
*/}}
{{- $kedaKeys := list }}
{{- range $pool := prepend (without (keys $v.evalPools | sortAlpha) "default") "default" }}
{{- $e := index $pools $pool }}
{{- $at := ternary "eval" (printf "evalPools.%s" $pool) (eq $pool "default") }}
{{- $own := dict }}
{{- range $key := list "keda" "hpa" "resources" "terminationGracePeriodSeconds" "extraEnv" }}
{{- $_ := set $own $key (or (eq $pool "default") (ne (toJson (index $e $key)) (toJson (index $v.eval $key)))) }}
{{- end }}
{{- $keda := $e.keda }}
{{- $hpa := $e.hpa }}
{{- if and $keda.enabled (or (eq $pool "default") (not $v.eval.keda.enabled)) }}
{{- $kedaKeys = append $kedaKeys (printf "%s.keda.enabled" $at) }}
{{- end }}
{{- if and $keda.enabled $hpa.enabled (or $own.keda $own.hpa) }}
{{- $errors = append $errors (printf "%s.keda.enabled and %s.hpa.enabled are both true: KEDA creates its own HPA, enable only one" $at $at) }}
{{- end }}
{{- if and $keda.enabled $own.keda (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- $errors = append $errors (printf "%s.keda.minReplicaCount %d is above %s.keda.maxReplicaCount %d" $at (int $keda.minReplicaCount) $at (int $keda.maxReplicaCount)) }}
{{- end }}
{{- if and $hpa.enabled $own.hpa (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- $errors = append $errors (printf "%s.hpa.minReplicas %d is above %s.hpa.maxReplicas %d" $at (int $hpa.minReplicas) $at (int $hpa.maxReplicas)) }}
{{- end }}
{{- if and $hpa.enabled (or $own.hpa $own.resources) (not (dig "requests" "cpu" "" $e.resources)) }}
{{- $errors = append $errors (printf "%s.hpa.enabled needs %s.resources.requests.cpu: the HPA scales on CPU use relative to the request" $at $at) }}
{{- end }}
{{- /* The pool a Deployment serves is its own: a second ASSAYER_POOLS would leave the first to chance. */}}
{{- range $e.extraEnv }}
{{- if and $own.extraEnv (eq .name "ASSAYER_POOLS") }}
{{- $errors = append $errors (printf "%s.extraEnv sets ASSAYER_POOLS, which the chart sets to the Deployment's pool (%s): remove it; for workers of another pool add an evalPools entry" $at $pool) }}
{{- end }}
{{- end }}
{{- /* Warm shutdown must outlast an evaluation. */}}
{{- if and $own.terminationGracePeriodSeconds (gt (float64 $v.config.evalTimeout) 0.0) (lt (float64 $e.terminationGracePeriodSeconds) (float64 $v.config.evalTimeout)) }}
{{- $errors = append $errors (printf "%s.terminationGracePeriodSeconds (%v) is shorter than config.evalTimeout (%v): a scaled-down or upgraded eval pod would be killed mid-evaluation; raise the grace period" $at $e.terminationGracePeriodSeconds $v.config.evalTimeout) }}
{{- end }}
{{- end }}

{{- /* KEDA (for any pool): its API, and a Redis address its operator can reach (eval.keda's, for every pool). */}}
{{- if $kedaKeys }}
{{- $kedaOn := printf "%s %s" (join ", " $kedaKeys) (ternary "is" "are" (eq (len $kedaKeys) 1)) }}
{{- $addr := $v.eval.keda.redisAddress }}
{{- if not (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") }}
{{- $errors = append $errors (printf "%s true but the cluster has no keda.sh/v1alpha1 API: install KEDA first (with `helm template`, pass --api-versions keda.sh/v1alpha1)" $kedaOn) }}
{{- end }}
{{- if and (not $v.redis.enabled) $v.externalRedis.existingSecret (not $addr) }}
{{- $errors = append $errors (printf "%s true with externalRedis.existingSecret, which needs eval.keda.redisAddress (host:port): KEDA cannot read the URL from the Secret" $kedaOn) }}
{{- end }}
{{- if and (not $v.redis.enabled) $v.externalRedis.url (not $addr) }}
{{- $url := urlParse $v.externalRedis.url }}
{{- if eq $url.scheme "unix" }}
{{- $errors = append $errors (printf "%s true with a unix:// externalRedis.url: KEDA's operator cannot reach a socket; set eval.keda.redisAddress (host:port)" $kedaOn) }}
{{- end }}
{{- if and (contains ":" (default "" $url.userinfo)) (not $v.externalRedis.password) }}
{{- $errors = append $errors (printf "%s true and externalRedis.url carries the password: move it to externalRedis.password so KEDA can authenticate too" $kedaOn) }}
{{- end }}
{{- end }}
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
