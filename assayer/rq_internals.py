"""What Assayer needs from rq beyond its documented API, in one place.

rq is pinned to the minor series these were written and tested against (pyproject.toml,
``RQ_SERIES``); ``tests/test_rq_internals.py`` exercises each one against the installed rq, so
an upgrade that moves one fails there, not in a user's worker. Everything else in Assayer uses
rq's public API: queues, jobs, ``Retry``, the registries, ``Worker.all``.

Why each is needed:

* :class:`StoppableWorker` overrides ``dequeue_job_and_maintain_ttl``: rq blocks for up to
  ``worker_ttl`` in one dequeue, and the stop signal's exception can be swallowed by the logging
  module, so an idle worker would not stop until the wait ended. It waits in short slices and
  looks at rq's ``_stop_requested`` flag between them.
* Its ``queue_class`` (:class:`SafeQueue`) dequeues from several queues (an eval worker's pools,
  new work before backfill) the way rq dequeues from one: with LMOVE into the queue's
  intermediate list, where rq's cleanup finds a job whose worker lost Redis before starting it.
  rq's own multi-queue dequeue is a BLPOP: such a job would be in no list at all, lost.
  ``prepare_job_execution`` then always takes the job out of the intermediate list.
* It overrides ``clean_registries`` (rq's registry maintenance, every 10 minutes) with the
  worker's own :meth:`StoppableWorker.maintain`, run every few seconds: a job whose worker was
  killed is re-queued within one lease, not ten minutes.
* :func:`enqueue_due` is what rq's scheduler does, without it: rq's scheduler is a process forked
  from the worker (``with_scheduler=True``), which a warm eval worker holding an evaluator
  process should not fork. It uses ``ScheduledJobRegistry`` and ``Queue.enqueue_job`` (public).
* :func:`maintenance_lock`, :func:`cleanup_intermediate`, :func:`registered`, :func:`unregister`:
  rq's own lock key for registry cleaning, its intermediate (being-dequeued) list and first-seen
  keys, and its worker registration set, so Assayer's sweep never runs beside rq's, a job stranded
  mid-dequeue is queued again within a lease, and a reaped worker leaves rq-dashboard as rq itself
  would remove it.
"""

from __future__ import annotations

import signal
from typing import Any

import redis
from rq import Queue, worker_registration
from rq.exceptions import DequeueTimeout, NoSuchJobError, StopRequested
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.utils import now
from rq.worker import BaseWorker, SimpleWorker
from rq.worker_registration import REDIS_WORKER_KEYS

from . import defaults

RQ_SERIES = "2.12"
"""The rq minor series this module was tested against (pyproject pins ``rq>=2.12,<2.13``)."""


def queue_key(name: str) -> str:
    """The Redis list of queue ``name`` (what KEDA's redis trigger and the chart's probes read)."""
    return Queue.redis_queue_namespace_prefix + name


MULTI_QUEUE_WAIT = 0.5
"""Seconds a worker of several queues blocks on its first queue before it looks at the others again."""


class SafeQueue(Queue):
    """rq's Queue, whose dequeue from several queues keeps each job in an intermediate list until started."""

    @classmethod
    def dequeue_any(cls, queues: Any, timeout: int | None, connection: Any, job_class: Any = None,
                    serializer: Any = None, death_penalty_class: Any = None) -> tuple[Job, Queue] | None:
        queues = list(queues)
        if len(queues) == 1:  # rq already does LMOVE for one queue
            return super().dequeue_any(queues, timeout, connection=connection, job_class=job_class,
                                       serializer=serializer, death_penalty_class=death_penalty_class)
        while True:
            found = None
            for queue in queues:  # in priority order
                job_id = connection.lmove(queue.key, queue.intermediate_queue_key)
                if job_id is not None:
                    found = queue, job_id
                    break
            if found is None:
                if timeout is None:
                    return None
                first = queues[0]
                job_id = connection.blmove(first.key, first.intermediate_queue_key, min(timeout, MULTI_QUEUE_WAIT))
                if job_id is None:
                    raise DequeueTimeout(timeout, [q.key for q in queues])
                found = first, job_id
            queue, raw = found
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                job = (job_class or Job).fetch(job_id, connection=connection, serializer=serializer)
            except NoSuchJobError:
                connection.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
            return job, queue


class StoppableWorker(SimpleWorker):
    """rq's in-process worker that stops promptly when idle and runs :meth:`maintain` instead of rq's cleaning."""

    queue_class = SafeQueue

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # rq removes it only for a worker of one queue; SafeQueue put it there for several too.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def request_stop(self, signum: int, frame: Any) -> None:
        """A warm stop that only sets rq's flag; the dequeue loop and rq's work loop read it.

        rq's own handler reads the worker's state from Redis and, when idle, raises StopRequested
        from inside the signal handler: wherever the main thread is, in the middle of a BLMOVE
        whose job Redis has just moved to the intermediate list, say. That job then waited for
        rq's one-minute cleanup, and its watch for its scan lease. A second signal is a cold stop.
        """
        self._stop_requested = True
        self._shutdown_requested_date = now()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)

    @property
    def stopping(self) -> bool:
        return bool(self._stop_requested)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """rq's dequeue, in short waits that look at the stop flag in between (see request_stop)."""
        if timeout is None or max_idle_time is not None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._stop_requested:
            # rq annotates max_idle_time as int; a fraction works: it bounds one BLMOVE's timeout, which Redis takes
            # in fractions of a second (tests/test_rq_internals.py times the stop)
            result = super().dequeue_job_and_maintain_ttl(
                timeout, max_idle_time=defaults.STOP_POLL)  # type: ignore[arg-type]
            if result is not None:
                return result
        raise StopRequested()

    def beat(self, job: Job) -> None:
        """Extend ``job``'s lease from another thread; a no-op once rq has ended the job's execution."""
        if self.execution is not None:
            self.maintain_heartbeats(job)

    def clean_registries(self) -> None:
        # rq calls this at start and every maintenance interval.
        self.maintain()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # rq declares it None-typed

    def maintain(self) -> None:
        """Registry maintenance; rq's own unless a subclass does better."""
        super().clean_registries()


def maintenance_lock(queue: Queue) -> str:
    """The key rq locks while it cleans ``queue``'s registries: whoever holds it cleans, never two at once."""
    return str(queue.registry_cleaning_key)


_REQUEUE_STRANDED = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[3])
"""


def cleanup_intermediate(queue: Queue, stranded_after: float) -> list[str]:
    """Put back at the head of ``queue`` each job a worker took off it but never started; return their ids.

    rq moves a job to the queue's intermediate list while dequeueing, and a live worker takes it out
    again as it starts the job, milliseconds later. One still there, and not started, ``stranded_after``
    seconds after a sweep first saw it was taken by a worker that died or lost Redis in between: a
    Redis restart drops the reply of a dequeue that Redis had already made. rq's own cleanup waits a
    minute and fails the job (a retry spent on an attempt that never ran); this one re-queues it, at the
    front, unspent. rq's first-seen key is the one the cleanup of either notes the time in.
    """
    intermediate = queue.intermediate_queue
    taken = intermediate.get_job_ids()
    if not taken:  # the usual case, every sweep: no read of the started registry
        return []
    started = set(queue.started_job_registry.get_job_ids(cleanup=False))
    moved = []
    for job_id in taken:
        if job_id in started:
            continue
        first_seen = intermediate.get_first_seen(job_id)
        if first_seen is None:
            intermediate.set_first_seen(job_id)
        elif (now() - first_seen).total_seconds() >= stranded_after:
            queue.connection.eval(_REQUEUE_STRANDED, 3, intermediate.key, queue.key,
                                  intermediate.get_first_seen_key(job_id), job_id)
            moved.append(job_id)
    return moved


def registered(conn: redis.Redis, worker: BaseWorker) -> bool:
    """True when ``worker`` is in rq's registry (what ``Worker.all``, ``rq info`` and rq-dashboard list)."""
    return bool(conn.hexists(worker.key, "birth") and conn.sismember(REDIS_WORKER_KEYS, worker.key))


def unregister(conn: redis.Redis, worker: BaseWorker) -> None:
    """Remove a dead worker from rq's registry, as rq does when a worker exits."""
    with conn.pipeline() as pipe:
        worker_registration.unregister(worker, pipe)
        pipe.delete(worker.key)
        pipe.execute()


def enqueue_due(queue: Queue, at: float) -> list[str]:
    """Move the jobs of ``queue`` whose scheduled time (a retry's backoff) is before ``at`` onto the queue."""
    registry = ScheduledJobRegistry(queue.name, queue.connection, serializer=queue.serializer)
    job_ids = registry.get_jobs_to_schedule(int(at))
    if not job_ids:
        return []
    with queue.connection.pipeline() as pipe:
        for job in Job.fetch_many(job_ids, connection=queue.connection, serializer=queue.serializer):
            if job is not None:
                queue.enqueue_job(job, pipeline=pipe)
        for job_id in job_ids:
            registry.remove(job_id, pipeline=pipe)
        pipe.execute()
    return [j.decode() if isinstance(j, bytes) else str(j) for j in job_ids]
