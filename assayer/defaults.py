"""Defaults and Redis key layout, each named once.

Every key Assayer writes starts with :data:`KEY_PREFIX`; rq's own keys keep
their ``rq:`` prefix so rq-dashboard and ``rq info`` see the queues and workers.
"""

KEY_PREFIX = "assayer:"
"""Prefix of every Redis key Assayer owns."""

REDIS_URL = "redis://localhost:6379/0"
"""Redis used when neither a flag, ``ASSAYER_REDIS_URL`` nor a local stack says otherwise."""

WATCH_QUEUE = "assayer-watch"
"""rq queue that carries scan jobs (watch work)."""

EVAL_QUEUE = "assayer-eval"
"""rq queue that carries evaluation jobs."""

CHECKPOINT_REGEX = r"\.(pt|pth|ckpt|model|state|safetensors)$"
"""Default filter, searched in the checkpoint's absolute path."""

POLL_INTERVAL = 0.5
"""Seconds between two scans of a watch (an unchanged directory costs one stat per scan)."""

SETTLE = 2.0
"""Seconds a file of unknown format must stay unchanged before it counts as complete."""

EVAL_TIMEOUT = 0.0
"""Seconds an evaluation may run; 0 means no limit (LM-harness runs take hours)."""

RETRIES = 2
"""Retries after a failed or lost attempt (so three attempts in all)."""

RETRY_BACKOFF = (10, 60)
"""Seconds to wait before the 1st, 2nd, ... retry; the last value repeats."""

LEASE_TTL = 15
"""Seconds an eval attempt stays owned without a heartbeat; after that it counts as lost and is retried."""

HEARTBEAT_INTERVAL = 3.0
"""Seconds between heartbeats of a busy eval worker (well inside :data:`LEASE_TTL`)."""

REAP_INTERVAL = 3.0
"""Seconds between two sweeps for lost jobs (jobs of killed workers)."""

SCAN_LEASE = 30
"""Seconds a claimed watch stays claimed; a watch whose scan was lost is scanned again after this
(``ASSAYER_SCAN_LEASE``)."""

STALL_AFTER = 600.0
"""Seconds a checkpoint may stay incomplete and unchanged before ``assayer status`` calls it stalled."""

HOT_RECHECK = 5.0
"""Seconds between re-stats of a recently modified file that was already handed over (an in-place rewrite
is still noticed within this long; a fresh run of 20,000 files no longer costs 40,000 stats a second)."""

SCAN_BUDGET = 2.0
"""Seconds one scan of one watch may take; a slower watch is reported and goes on at its next scan, so
it never keeps the other watches of its batch waiting."""

FULL_SCAN_INTERVAL = 30.0
"""Seconds between full re-stats of every known file (catches in-place rewrites of cold files)."""

HOT_WINDOW = 600.0
"""Files modified within this many seconds are re-stat'ed on every scan, not only on full scans."""

IDLE_POLL_INTERVAL = 2.0
"""Seconds between scans of a quiet watch that no change notification covers (network mounts, inotify off)."""

NOTIFIED_IDLE_POLL = 30.0
"""Seconds between scans of a quiet watch whose directories inotify watches (a change wakes it at once)."""

QUIET_AFTER = 10.0
"""Seconds without any change after which a watch counts as quiet and is polled less often
(``ASSAYER_QUIET_AFTER``)."""

MIRROR_INTERVAL = 5.0
"""Seconds between two mirrors of watches and ledgers into the results directory (``assayer restore``)."""

WATCH_TICK = 0.1
"""Seconds between two looks of a watch worker for due watches."""

RESULT_TTL = 7 * 24 * 3600
"""Seconds rq keeps a finished eval job (rq-dashboard's view). Assayer's own results never expire."""

FAILURE_TTL = 30 * 24 * 3600
"""Seconds rq keeps a failed eval job in its FailedJobRegistry."""

SCAN_RESULT_TTL = 60
"""rq result TTL of scan jobs, long enough to see them in rq-dashboard."""

WORKER_TTL = 60
"""rq worker key TTL; dead workers leave rq-dashboard within about this long."""

HEALTH_TTL = 60
"""Seconds a worker's health key lives; ``assayer health`` fails once it is gone."""

MAX_WARM_EVALUATORS = 2
"""Evaluator processes an eval worker keeps warm at once (one per evaluator reference)."""

DASHBOARD_PORT = 9181
"""Port of rq-dashboard."""

DASHBOARD_BIND = "127.0.0.1"
"""Address rq-dashboard binds to: loopback unless asked otherwise."""

DASHBOARD_USER = "assayer"
"""Basic-auth user of rq-dashboard."""

LOCAL_REDIS_PORT = 6390
"""Port of the Redis that ``assayer up`` starts on 127.0.0.1 (off 6379 to avoid a system Redis)."""

SUPERVISOR_STOP_WAIT = 3600
"""Seconds supervisor lets a worker finish its current evaluation on ``assayer down``."""

DIR_QUIET = 0.2
"""Seconds a directory checkpoint's members must stay unchanged once its layout's marker or format
rule holds (the settle-only ``dir`` layout waits the whole settle time instead)."""

EVAL_TICK = 0.5
"""Seconds between two rounds of an eval worker's background thread (sweep, mirror, results copy)."""

SHUTDOWN_CHECK_INTERVAL = 0.5
"""Seconds between two looks at the shutdown flag by a worker's background thread."""

STOP_POLL = 0.5
"""Seconds an idle worker waits for a job before it looks at its stop flag again: an idle worker stops within
this long (``assayer down``, ``docker compose stop``, a pod's termination); each wait also beats its heartbeat."""

MAX_WATCHES_PER_SCAN = 100
"""Watches scanned by one scan job."""

SCAN_FAILURE_TTL = 24 * 3600
"""Seconds rq keeps a failed scan job (for rq-dashboard); a scan's errors also show in ``assayer status``."""

ENQUEUE_BATCH = 200
"""Checkpoints enqueued per ledger transaction (bounds a transaction's size during a burst)."""

STATE_REFRESH = 5.0
"""Seconds between two writes of an unchanged watch state (``assayer status`` shows its age)."""

STACK_READY_TIMEOUT = 60.0
"""Seconds ``assayer up`` waits for the stack's workers to report."""

DELIVERY_LEASE = 120
"""Seconds a reporter holds a claimed delivery; one killed mid-delivery leaves it to be claimed again after this."""

DELIVERY_BATCH = 20
"""Deliveries one reporter claims at a time."""

DELIVERY_POLL = 1.0
"""Seconds an idle reporter waits before it looks for due deliveries again."""

DELIVERY_BACKOFF = 5.0
"""Seconds before the first retry of a failed delivery; doubled at each failure."""

DELIVERY_BACKOFF_MAX = 300.0
"""At most this many seconds between two tries of a failing delivery."""

DELIVERY_STOP_WAIT = 30.0
"""Seconds a stopping watch worker waits for a delivery under way (a later one redelivers it, once)."""

TRACKER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""Trackers' own variables a watch worker sets when the user did not: a failed delivery is retried by
Assayer with backoff, so the client's own minutes of retries would only hold up the other deliveries."""

WRITING_SHOWN = 100
"""Checkpoints still being written that a watch's state lists by name (the checkpoint page shows them)."""

PAGE_SIZE = 100
"""Checkpoints per page of the checkpoint page and of ``/api/watches/<name>/checkpoints``."""

CURVE_POINTS = 2000
"""At most this many points per metric curve on the checkpoint page (evenly thinned beyond)."""

EXPORTER_PORT = 9182
"""Port of ``assayer exporter`` (Prometheus metrics)."""


NEWEST_AFTER = 60.0
"""``--every N``: seconds a checkpoint whose step is no multiple of N must stay the newest before it is
evaluated anyway (the run's last checkpoint); ``ASSAYER_NEWEST_AFTER``."""

COPY_BATCH = 100
"""Result lines one round trip takes from a watch's copy backlog to append to its results file."""

SNAPSHOT_MAX_GB = 50.0
"""Bound of the snapshot cache's copies (``ASSAYER_SNAPSHOT_MAX_GB``); links cost nothing."""
