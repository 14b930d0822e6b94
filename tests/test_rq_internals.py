"""Each rq internal Assayer relies on (assayer/rq_internals.py), checked against the installed rq on a real Redis.

An rq upgrade that moves one of them fails here first.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta
from importlib.metadata import version
from typing import Any

import pytest
import redis
from harness import wait_for
from rq import Queue, Retry, Worker
from rq.exceptions import DequeueTimeout, StopRequested
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from assayer import defaults, keys, rq_internals


def _queue(conn: redis.Redis, name: str = "q") -> Queue:
    return rq_internals.SafeQueue(name, connection=conn, serializer=JSONSerializer)


class _Recorder(rq_internals.StoppableWorker):
    maintained = 0

    def maintain(self) -> None:
        type(self).maintained += 1


def test_rq_is_the_minor_series_the_internals_were_tested_on() -> None:
    assert version("rq").startswith(rq_internals.RQ_SERIES + "."), (
        f"rq {version('rq')} is installed; assayer/rq_internals.py was written for {rq_internals.RQ_SERIES}: "
        "re-check each internal it uses, then move RQ_SERIES and the pin in pyproject.toml")


def test_queue_key_is_the_list_rq_pushes_jobs_onto(conn: redis.Redis) -> None:
    _queue(conn, "evals").enqueue("os.getpid")
    assert conn.llen(rq_internals.queue_key("evals")) == 1


@pytest.mark.parametrize("queues", [1, 2], ids=["one queue (watch)", "several queues (eval: new work, backfill)"])
def test_an_idle_worker_stops_at_its_next_short_wait_not_after_worker_ttl(
    conn: redis.Redis, monkeypatch: pytest.MonkeyPatch, queues: int
) -> None:
    worker = _Recorder([_queue(conn, f"q{i}") for i in range(queues)], connection=conn, serializer=JSONSerializer,
                       worker_ttl=600)
    waits: list[tuple[float, float]] = []  # (when it started, its timeout)
    blmove = conn.blmove

    def timed_blmove(first: str, second: str, timeout: float, *args: Any) -> Any:
        waits.append((time.monotonic(), float(timeout)))
        return blmove(first, second, timeout, *args)  # type: ignore[arg-type]  # redis-py says int; Redis takes 0.5

    monkeypatch.setattr(conn, "blmove", timed_blmove)
    done, stopped_at = threading.Event(), []

    def stop_soon() -> None:
        wait_for(lambda: worker.get_state() == "idle", 10, what="the worker to wait for a job")
        worker._stop_requested = True  # what request_stop sets when the signal's exception is swallowed
        stopped_at.append(time.monotonic())
        done.set()

    threading.Thread(target=stop_soon, daemon=True).start()
    started = time.monotonic()
    worker.work(with_scheduler=False)  # must return, not block for worker_ttl (600 s)
    assert done.is_set()
    assert time.monotonic() - started < defaults.STOP_POLL * 3 + 5
    # Each blocking wait is one short slice and the flag is looked at after each: no more than the wait under
    # way when it was set (or one starting just then) begins after it, so the worker stops within STOP_POLL.
    assert waits and max(timeout for _, timeout in waits) <= defaults.STOP_POLL
    assert len([at for at, _ in waits if at > stopped_at[0]]) <= 1


def test_request_stop_sets_the_flag_the_dequeue_loop_reads(conn: redis.Redis) -> None:
    worker = _Recorder([_queue(conn)], connection=conn, serializer=JSONSerializer)
    assert not worker.stopping
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.request_stop(signal.SIGINT, None)  # never raises: it may land in the middle of a Redis call
        assert signal.getsignal(signal.SIGTERM) == worker.request_force_stop  # a second signal is a cold stop
    finally:
        for sig, handler in handlers.items():  # rq installs its force-stop handlers
            signal.signal(sig, handler)
    assert worker.stopping
    started = time.monotonic()
    with pytest.raises(StopRequested):  # the idle wait sees the flag and leaves, raising outside any Redis call
        worker.dequeue_job_and_maintain_ttl(timeout=60)
    assert time.monotonic() - started < defaults.STOP_POLL + 1


def test_rq_runs_maintain_in_place_of_its_registry_cleaning(conn: redis.Redis) -> None:
    _Recorder.maintained = 0
    worker = _Recorder([_queue(conn)], connection=conn, serializer=JSONSerializer)
    worker.work(burst=True, with_scheduler=False)
    assert _Recorder.maintained >= 1
    assert worker.last_cleaned_at is not None


def test_maintenance_lock_is_the_key_rq_locks_before_cleaning(conn: redis.Redis) -> None:
    queue = _queue(conn)
    key = rq_internals.maintenance_lock(queue)
    assert queue.acquire_maintenance_lock()
    assert conn.exists(key)
    assert not queue.acquire_maintenance_lock()  # rq itself would now skip its cleaning
    queue.release_maintenance_lock()
    assert not conn.exists(key)


def test_registered_and_unregister_follow_rqs_own_worker_registry(conn: redis.Redis) -> None:
    queue = _queue(conn)
    worker = Worker([queue], connection=conn, serializer=JSONSerializer, name="w1")
    worker.register_birth()
    assert rq_internals.registered(conn, worker)
    assert [w.name for w in Worker.all(connection=conn)] == ["w1"]
    rq_internals.unregister(conn, worker)
    assert not rq_internals.registered(conn, worker)
    assert Worker.all(connection=conn) == [] and Worker.all(queue=queue) == []


def test_cleanup_intermediate_requeues_at_the_front_unspent_a_job_taken_but_never_started(conn: redis.Redis) -> None:
    queue = _queue(conn)
    job = queue.enqueue("os.getpid", retry=Retry(max=1))
    running = queue.enqueue("os.getpid")
    conn.lmove(queue.key, queue.intermediate_queue.key, "LEFT", "RIGHT")  # what a dequeue does first (rq's lmove)
    conn.lmove(queue.key, queue.intermediate_queue.key, "LEFT", "RIGHT")
    conn.zadd(queue.started_job_registry.key, {f"{running.id}:exec-1": time.time() + 60})  # its worker started it
    later = queue.enqueue("os.getpid")
    assert rq_internals.cleanup_intermediate(queue, stranded_after=5) == []  # first sighting: the time is noted
    assert rq_internals.cleanup_intermediate(queue, stranded_after=5) == []  # a live worker may be starting it
    conn.set(queue.intermediate_queue.get_first_seen_key(job.id), time.time() - 6)
    conn.set(queue.intermediate_queue.get_first_seen_key(running.id), time.time() - 6)
    assert rq_internals.cleanup_intermediate(queue, stranded_after=5) == [job.id]
    assert queue.intermediate_queue.get_job_ids() == [running.id]  # a started job is its worker's
    assert [keys.text(j) for j in conn.lrange(queue.key, 0, -1)] == [job.id, later.id]  # first in line again
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).retries_left == 1  # no attempt spent
    assert not conn.exists(queue.intermediate_queue.get_first_seen_key(job.id))


def test_enqueue_due_moves_only_jobs_whose_backoff_ended(conn: redis.Redis) -> None:
    queue = _queue(conn)
    registry = ScheduledJobRegistry(queue.name, conn, serializer=JSONSerializer)
    # Backoffs far apart: a slow machine taking seconds between two lines changes nothing here.
    due = queue.enqueue_in(timedelta(seconds=60), "os.getpid", retry=Retry(max=1))
    later = queue.enqueue_in(timedelta(seconds=600), "os.getpid")
    assert set(registry.get_job_ids()) == {due.id, later.id}
    assert rq_internals.enqueue_due(queue, time.time()) == []
    assert rq_internals.enqueue_due(queue, time.time() + 120) == [due.id]
    assert queue.get_job_ids() == [due.id]
    assert registry.get_job_ids() == [later.id]
    assert Job.fetch(due.id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.QUEUED


def test_a_worker_of_several_queues_dequeues_in_order_through_the_intermediate_lists(conn: redis.Redis) -> None:
    """rq's own multi-queue dequeue is a BLPOP: a job taken by a worker that then loses Redis is in no list.
    SafeQueue moves it into its queue's intermediate list, as rq does for one queue, and the worker takes
    it out there only once the job is started."""
    new, backfill = _queue(conn, "new"), _queue(conn, "new-backfill")
    late = backfill.enqueue("assayer.jobs.evaluate", job_id="late")
    first = new.enqueue("assayer.jobs.evaluate", job_id="first")
    queues = [new, backfill]
    taken = rq_internals.SafeQueue.dequeue_any(queues, None, connection=conn, serializer=JSONSerializer)
    assert taken is not None
    job, queue = taken
    assert (job.id, queue.name) == (first.id, "new")  # new work before backfill, whatever was queued first
    assert new.intermediate_queue.get_job_ids() == ["first"]  # a crash now: rq's cleanup finds it there
    worker = rq_internals.StoppableWorker(queues, connection=conn, serializer=JSONSerializer)
    worker.prepare_job_execution(job)
    assert new.intermediate_queue.get_job_ids() == []  # started: in the started registry instead
    taken = rq_internals.SafeQueue.dequeue_any(queues, None, connection=conn, serializer=JSONSerializer)
    assert taken is not None
    job, queue = taken
    assert (job.id, queue.name) == (late.id, "new-backfill") and backfill.intermediate_queue.get_job_ids() == ["late"]
    assert rq_internals.SafeQueue.dequeue_any(queues, None, connection=conn, serializer=JSONSerializer) is None
    started = time.monotonic()
    with pytest.raises(DequeueTimeout):
        rq_internals.SafeQueue.dequeue_any(queues, 5, connection=conn, serializer=JSONSerializer)
    assert time.monotonic() - started < 2  # blocks in slices, so the other queues are looked at again
