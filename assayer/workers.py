"""Assayer's rq workers: ``WatchWorker`` (scans) and ``EvalWorker`` (evaluations).

Both run jobs in their own process (no fork per job): scanners keep their directory caches and
eval workers keep evaluators warm in a child process (see :mod:`assayer.evalhost`). Each has a
background thread that

* writes the worker's health key (``assayer health``),
* stops the worker warmly when ``assayer shutdown`` is issued,
* for watch workers: claims the watches whose scan is due and enqueues one scan job for them,
* for eval workers: every few seconds re-queues the jobs of workers that vanished (their
  heartbeat lease expired in rq's StartedJobRegistry) and enqueues retries whose backoff ended,
  instead of rq's 10-minute maintenance cycle.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import ScheduledJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from . import backup, defaults, deliveries, evaluator, jobs, keys, pools, results, rq_internals, snapshots, watches
from .notify import Notifier
from .settings import Settings

log = logging.getLogger("assayer.workers")

CLAIM_DUE = """
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, n in ipairs(names) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), n)
end
return names
"""
"""Atomically take the watches whose scan is due and push their due time one lease ahead, so a
scan that is lost (its worker killed) is claimed again once the lease ends."""

JOB_FUNCTIONS = {"watch": "assayer.jobs.scan", "eval": "assayer.jobs.evaluate"}
"""The one job function each role runs; any other job is failed unrun."""


class AssayerWorker(rq_internals.StoppableWorker):
    role = ""
    tick = 1.0

    def __init__(self, settings: Settings, connection: redis.Redis, queue_names: list[str],
                 name: str | None = None) -> None:
        self.settings = settings
        self.host = socket.gethostname()
        name = name or f"{self.role}-{self.host}-{os.getpid()}-{secrets.token_hex(2)}"
        queues = [self.queue_class(q, connection=connection, serializer=JSONSerializer) for q in queue_names]
        super().__init__(queues, name=name, connection=connection, serializer=JSONSerializer,
                         worker_ttl=defaults.WORKER_TTL)
        self.born = time.time()
        self.runtime = jobs.Runtime(settings, connection, worker_name=name)
        self._ticker_stop = threading.Event()
        self._registered = threading.Event()  # set once rq registered us: health is reported only from then on
        self._busy_job: Job | None = None
        self._shutdown_sent = False
        self.stop_requested = False  # by a signal or `assayer shutdown`: work() returning is then expected

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def register_birth(self) -> None:
        super().register_birth()
        self._registered.set()

    # -- background thread ------------------------------------------------------------------

    def work(self, *args: Any, **kwargs: Any) -> bool:
        jobs.install(self.runtime)
        thread = threading.Thread(target=self._run_ticker, name=f"{self.role}-ticker", daemon=True)
        thread.start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            self._ticker_stop.set()
            thread.join(timeout=5)
            self.runtime.close()
            jobs.install(None)
            self.connection.delete(keys.health(self.role, self.host, os.getpid()))

    def _run_ticker(self) -> None:
        last_health = last_flag = 0.0
        # A health key means "registered and working": `assayer up` waits for them, and status counts rq's
        # registry. Until work() has registered us, a tick would also take rq's missing key for a lost one and
        # register us itself, and rq's own register_birth would then refuse to start ("an active worker named ...").
        while not self._registered.wait(self.tick):  # returns as soon as it is set
            if self._ticker_stop.is_set():
                return
        wait = 0.0  # the first tick at once: `assayer up` and the tests wait for that health key
        while not self._ticker_stop.wait(wait):
            wait = self.tick
            try:
                now = time.time()
                if now - last_flag >= defaults.SHUTDOWN_CHECK_INTERVAL:
                    self._check_shutdown()
                    last_flag = now
                if now - last_health >= self.settings.lease_ttl / 3:
                    self._write_health()
                    self._check_registration()
                    last_health = now
                self.on_tick(now)
            except Exception as exc:  # Redis away, mostly: keep ticking, the main loop reconnects
                log.warning("%s: background work failed: %s", self.name, exc)
                self._ticker_stop.wait(1.0)

    def _write_health(self) -> None:
        if threading.main_thread().is_alive():
            with self.connection.pipeline() as pipe:
                # The per-process key lives one lease: a worker whose key is gone is dead (reap_dead_workers).
                pipe.set(keys.health(self.role, self.host, os.getpid()), self.name, ex=self.settings.lease_ttl)
                pipe.set(keys.host_health(self.role, self.host), self.name, ex=defaults.HEALTH_TTL)
                pipe.execute()

    def _check_registration(self) -> None:
        """Register again when our rq worker key vanished (Redis lost its data, or a reaper misjudged us).

        rq's heartbeat only refreshes the key; without this a worker that outlived its key stays
        invisible to ``assayer status`` and rq-dashboard while it works on.
        """
        if self.stop_requested or self.stopping or rq_internals.registered(self.connection, self):
            return  # a stopping worker's key is gone because rq unregistered it: not to be put back
        log.warning("%s: its registration in Redis is gone (Redis lost its data?); registering again", self.name)
        job_id = self.get_current_job_id() if self.connection.exists(self.key) else None
        self.connection.delete(self.key)
        self.register_birth()
        busy = self._busy_job is not None
        self.set_state(WorkerStatus.BUSY if busy else WorkerStatus.IDLE)
        if busy and self._busy_job is not None:
            self.set_current_job_id(job_id or self._busy_job.id)

    def perform_job(self, job: Job, queue: Queue) -> bool:
        """Run only Assayer's own job function for this role: anyone who can write to Redis can enqueue a job."""
        if job.func_name != JOB_FUNCTIONS[self.role]:
            why = (f"refused: {self.role} workers run only {JOB_FUNCTIONS[self.role]}, "
                   f"not {job.func_name!r} (a job not enqueued by Assayer)")
            log.error("job %s %s", job.id, why)
            job.retries_left = 0
            self.handle_job_failure(job, queue, exc_string=why)
            return False
        return bool(super().perform_job(job, queue))

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._busy_job = job
        try:
            super().execute_job(job, queue)
        finally:
            self._busy_job = None

    def get_heartbeat_ttl(self, job: Job) -> int:
        # rq's StartedJobRegistry score: a job whose worker stops beating is lost after this long.
        return self.settings.lease_ttl

    def maintain(self) -> None:
        self.sweep()

    def sweep(self) -> None:
        """Re-queue lost eval jobs, drop lost scans, enqueue due retries and remove dead workers.

        Every worker of either role does it (one at a time per queue), so a dead worker leaves
        ``assayer status`` and rq-dashboard even when it was the last of its role.
        """
        eval_queues = pools.all_queues(self.connection, self.settings)
        for name, on_lost in [(self.settings.watch_queue, self._drop_lost_scan)] + [
                (q, self._record_lost) for q in eval_queues]:
            queue = Queue(name, connection=self.connection, serializer=JSONSerializer)
            lock = rq_internals.maintenance_lock(queue)
            if not self.connection.set(lock, self.name, nx=True, px=int(max(self.settings.reap_interval, 1) * 10_000)):
                continue
            try:
                # rq's own registry cleaning, with our handler for a lost job (re-queue, record the attempt)
                clean_registries(queue, exception_handlers=[on_lost])
                for job_id in rq_internals.cleanup_intermediate(queue, stranded_after=self.settings.lease_ttl):
                    log.warning("job %s was taken off %s by a worker that never started it (it died, or lost "
                                "Redis mid-dequeue); queued again", job_id, name)
                if name != self.settings.watch_queue:
                    rq_internals.enqueue_due(queue, time.time())
                reap_dead_workers(self.connection, self.settings, name, "watch" if name == self.settings.watch_queue else "eval")
            finally:
                self.connection.delete(lock)

    def _drop_lost_scan(self, job: Job, *exc_info: Any) -> bool:
        log.warning("scan job %s lost its worker %s; its watches are claimed again when their lease ends",
                    job.id, job.worker_name)
        return True

    def _record_lost(self, job: Job, *exc_info: Any) -> bool:
        log.warning("job %s lost its worker %s; re-queueing it", job.id, job.worker_name)
        jobs.record_lost(self.connection, self.settings, job)
        return True

    def _check_shutdown(self) -> None:
        raw = self.connection.get(keys.SHUTDOWN)
        if raw and float(raw) > self.born and not self._shutdown_sent:
            self._shutdown_sent = True
            log.info("%s: shutdown requested; finishing the current job, then stopping", self.name)
            os.kill(os.getpid(), signal.SIGINT)  # rq's warm shutdown

    def on_tick(self, now: float) -> None:
        """Per-role background work."""


class WatchWorker(AssayerWorker):
    role = "watch"
    tick = defaults.WATCH_TICK

    def __init__(self, settings: Settings, connection: redis.Redis, name: str | None = None) -> None:
        super().__init__(settings, connection, [settings.watch_queue], name)
        self._last_sweep = self._last_beat = 0.0
        if settings.watches_file:
            watches.sync_file(connection, settings)
        if settings.inotify:
            try:
                self.runtime.notifier = Notifier(self._wake)
            except (OSError, AttributeError) as exc:  # not Linux, or no inotify in this kernel or sandbox
                log.warning("no change notification (%s): every watch is polled", exc)

    def _wake(self, names: set[str]) -> None:
        """A watched directory changed: its watch is due now (never later than it was, never re-added)."""
        now = time.time()
        self.connection.zadd(keys.DUE, dict.fromkeys(names, now), xx=True, lt=True)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """Scan; beside it, a thread delivers results to trackers and one reads change notifications."""
        stop = threading.Event()
        reporter = deliveries.Reporter(self.connection, self.settings.results_path, self.settings.delivery_lease)
        threads = [threading.Thread(target=reporter.run, args=(stop,), name="watch-report", daemon=True)]
        notifier = self.runtime.notifier
        if notifier is not None:
            threads.append(threading.Thread(target=notifier.run, args=(stop,), name="watch-notify", daemon=True))
        for thread in threads:
            thread.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=defaults.DELIVERY_STOP_WAIT)
            if notifier is not None:
                notifier.close()

    def on_tick(self, now: float) -> None:
        job = self._busy_job
        if job is not None and now - self._last_beat >= self.settings.heartbeat_interval:
            self._last_beat = now
            self.beat(job)  # a scan runs in the main thread; this thread keeps its lease
        if now - self._last_sweep >= self.settings.reap_interval:
            self._last_sweep = now
            self.sweep()
            snapshots.release_done(self.connection, self.settings)  # pins whose evaluations all ended
        # Claim what falls due before the next tick too: watches scanned together stay in step, one job per batch.
        names = self.connection.eval(CLAIM_DUE, 1, keys.DUE, now + self.tick, self.settings.scan_lease,
                                     defaults.MAX_WATCHES_PER_SCAN)
        if names:
            names = sorted(n.decode() for n in names)
            self.queues[0].enqueue(
                "assayer.jobs.scan",
                kwargs={"names": names},
                job_timeout=-1,
                result_ttl=defaults.SCAN_RESULT_TTL,
                failure_ttl=defaults.SCAN_FAILURE_TTL,
                description=f"scan {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}",
            )


class EvalWorker(AssayerWorker):
    role = "eval"
    tick = defaults.EVAL_TICK

    def __init__(self, settings: Settings, connection: redis.Redis, name: str | None = None) -> None:
        # New work of each pool it serves first, then their backfill (rq takes from the first queue that has a job).
        super().__init__(settings, connection, pools.worker_queues(settings, settings.pools), name)
        self._last_sweep = 0.0
        self._last_beat = 0.0
        self._last_mirror = 0.0
        # Warm the evaluators it serves of the watches there are, most recently added first.
        served = []
        for spec in sorted(watches.all_specs(connection), key=lambda s: -s.created_at):
            for ev in spec.evaluators:
                if (not spec.paused and ev.pool in settings.pools
                        and evaluator.is_allowed(ev.ref, settings.evaluator_paths)):
                    self.runtime.pool.prestart(ev.ref)
                    served.append(ev.ref)
        if len(set(served)) > settings.max_warm_evaluators:
            log.warning("%s serves %d evaluators but keeps at most %d warm (ASSAYER_MAX_WARM): evaluations that "
                        "alternate between them start an evaluator process each time; raise ASSAYER_MAX_WARM if "
                        "memory allows", name or self.name, len(set(served)), settings.max_warm_evaluators)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.runtime.beat = self._beat_for(job)
        try:
            super().execute_job(job, queue)
        finally:
            self.runtime.beat = None

    def _beat_for(self, job: Job) -> Callable[[], None]:
        def beat() -> None:
            now = time.monotonic()
            if now - self._last_beat >= self.settings.heartbeat_interval:
                self._last_beat = now
                try:
                    self.beat(job)
                except Exception as exc:  # Redis briefly away: the lease has room for a few misses
                    log.warning("%s: heartbeat failed: %s", self.name, exc)

        return beat

    def on_tick(self, now: float) -> None:
        if now - self._last_sweep >= self.settings.reap_interval:
            self._last_sweep = now
            self.sweep()
            results.catch_up_all(self.connection, self.settings.results_path)
        if now - self._last_mirror >= defaults.MIRROR_INTERVAL:
            self._last_mirror = now
            self.mirror()

    def mirror(self) -> None:
        """Check that Redis still holds our data, and mirror watches and ledgers for ``assayer restore``."""
        if not self.connection.set(keys.MIRROR_LOCK, self.name, nx=True, px=int(defaults.MIRROR_INTERVAL * 2000)):
            return
        try:
            if backup.check_epoch(self.connection, self.settings.results_path) is None:
                backup.mirror(self.connection, self.settings.results_path)
        except OSError as exc:  # the results directory is a copy: its trouble shows in status, never fails work
            log.warning("cannot mirror watches into %s: %s", self.settings.results_path, exc.strerror or exc)
        finally:
            self.connection.delete(keys.MIRROR_LOCK)


def reap_dead_workers(conn: redis.Redis, settings: Settings, queue_name: str, role: str) -> list[str]:
    """Unregister the workers of ``queue_name`` whose health key expired (killed with -9, node lost).

    A live worker writes its key every third of a lease; one missing for a whole lease is dead, and
    its job is re-queued by the StartedJobRegistry sweep once the job's own lease ends. A worker
    reaped wrongly (stopped, not dead) registers again when it resumes (``_check_registration``).
    """
    reaped = []
    grace = datetime.now(timezone.utc) - timedelta(seconds=settings.lease_ttl)
    for worker in Worker.all(connection=conn, queue=Queue(queue_name, connection=conn, serializer=JSONSerializer),
                             serializer=JSONSerializer):
        if conn.exists(keys.health(role, worker.hostname or "", worker.pid or 0)):
            continue
        if worker.birth_date is not None and worker.birth_date.replace(tzinfo=timezone.utc) > grace:
            continue  # just started: its first health key may not be written yet
        log.warning("worker %s (pid %s on %s) stopped reporting; removing it", worker.name, worker.pid, worker.hostname)
        rq_internals.unregister(conn, worker)
        reaped.append(worker.name)
    return reaped


def request_shutdown(conn: redis.Redis, settings: Settings, purge: bool = False) -> int:
    """Ask every Assayer worker to finish its current job and stop; returns how many were running."""
    conn.set(keys.SHUTDOWN, time.time())
    ours = {settings.watch_queue, *pools.all_queues(conn, settings)}
    count = sum(1 for w in Worker.all(connection=conn) if set(w.queue_names()) & ours)
    if purge:
        for name in ours:
            Queue(name, connection=conn, serializer=JSONSerializer).empty()
            registry = ScheduledJobRegistry(name, conn)
            for job_id in registry.get_job_ids():
                registry.remove(job_id)
    return count


WORKERS: dict[str, Callable[..., AssayerWorker]] = {"watch": WatchWorker, "eval": EvalWorker}
