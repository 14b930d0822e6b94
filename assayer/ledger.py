"""The ledger: which version of which checkpoint was handed to an eval job, kept in Redis.

Enqueueing an eval job and recording it in the ledger happen in one MULTI/EXEC transaction
guarded by WATCH on the watch's ledger, so several watch workers (or a worker restarted
mid-scan) never enqueue the same checkpoint version twice, and a crash can never leave a
ledger entry without its job or a job without its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, Retry

from . import backup, defaults, keys
from .errors import WatchError
from .scan import Candidate
from .settings import Settings
from .watches import WatchSpec

log = logging.getLogger("assayer.ledger")

BATCH = 200
"""Checkpoints enqueued per transaction (bounds a transaction's size during a burst)."""


def job_id_for(watch: str, relpath: str, version: str, salt: str = "") -> str:
    """rq job ids must match ``[A-Za-z0-9_-]+``: hash the path and version."""
    digest = hashlib.sha1(f"{watch}\0{relpath}\0{version}\0{salt}".encode()).hexdigest()
    return f"ev-{digest[:32]}"


def eval_queue(conn: Any, settings: Settings) -> Queue:
    return Queue(settings.eval_queue, connection=conn, serializer="json", default_timeout=-1)


def _new_job(queue: Queue, settings: Settings, spec: WatchSpec, cand: Candidate, job_id: str) -> Any:
    payload = {
        "watch": spec.name,
        "checkpoint": cand.path,
        "relpath": cand.relpath,
        "version": cand.version,
        "evaluator": spec.evaluator,
        "step": cand.step,
        "retries": settings.retries,
        "layout": cand.layout,
        "epoch": cand.epoch,
        "mtime": cand.mtime,
    }
    retry = Retry(max=settings.retries, interval=list(settings.retry_backoff)) if settings.retries else None
    return queue.create_job(
        "assayer.jobs.evaluate",
        kwargs=payload,
        job_id=job_id,
        timeout=-1,  # the eval worker enforces ASSAYER_EVAL_TIMEOUT itself; rq's 180 s default must not apply
        result_ttl=defaults.RESULT_TTL,
        failure_ttl=defaults.FAILURE_TTL,
        retry=retry,
        description=f"evaluate {spec.name}: {cand.relpath}",
    )


def enqueue_new(
    conn: Any, settings: Settings, spec: WatchSpec, candidates: Sequence[Candidate], force: bool = False
) -> list[str]:
    """Enqueue an eval job for each candidate whose version the ledger does not have yet.

    With ``force`` (an explicit ``assayer evaluate``), enqueue even known versions, under a fresh job id.
    """
    queue = eval_queue(conn, settings)
    enqueued: list[str] = []
    for start in range(0, len(candidates), BATCH):
        enqueued += _enqueue_batch(conn, queue, settings, spec, candidates[start : start + BATCH], force)
    return enqueued


def _enqueue_batch(
    conn: Any, queue: Queue, settings: Settings, spec: WatchSpec, batch: Sequence[Candidate], force: bool
) -> list[str]:
    ledger_key = keys.ledger(spec.name)
    salt = f"request-{time.time_ns()}" if force else ""
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(ledger_key, keys.WATCHES)
                if not pipe.hexists(keys.WATCHES, spec.name):
                    pipe.unwatch()
                    return []  # removed while we scanned
                current = pipe.hmget(ledger_key, [c.relpath for c in batch])
                fresh = [
                    c for c, raw in zip(batch, current) if force or raw is None or json.loads(raw)["v"] != c.version
                ]
                if not fresh:
                    pipe.unwatch()
                    return []
                pipe.multi()
                ids = []
                for cand in fresh:
                    job_id = job_id_for(spec.name, cand.relpath, cand.version, salt)
                    entry = {"v": cand.version, "job": job_id, "at": time.time()}
                    pipe.hset(ledger_key, cand.relpath, json.dumps(entry))
                    pipe.sadd(keys.pending(spec.name), job_id)
                    queue.enqueue_job(_new_job(queue, settings, spec, cand, job_id), pipeline=pipe)
                    ids.append(job_id)
                pipe.execute()
                for cand in fresh:
                    log.info("queued %s: %s (step %s)", spec.name, cand.relpath, cand.step)
                return ids
            except redis.WatchError:
                continue  # another worker touched the ledger: read it again


def register(conn: Any, settings: Settings, spec: WatchSpec) -> str:
    """Store a new watch, with the checkpoints already there as its baseline unless ``eval_existing``.

    Returns ``"added"`` or ``"unchanged"`` (same spec already registered); one transaction, so a
    failure leaves nothing half-registered.
    """
    existing_raw = conn.hget(keys.WATCHES, spec.name)
    if existing_raw:
        existing = WatchSpec.from_json(existing_raw)
        if existing.same_target(spec):
            return "unchanged"
        raise WatchError(
            f"a watch named {spec.name!r} already watches {existing.directory} with {existing.evaluator}",
            f"pick another --name, or `assayer watch remove {spec.name}` first",
        )
    backup.refuse_baseline_if_lost(conn, settings.results_path, spec.name)
    baseline: dict[str, str] = {}
    if not spec.eval_existing:
        scanner = spec.scanner(settings)
        baseline = {c.relpath: c.version for c in scanner.scan(time.time()).ready}
    with conn.pipeline() as pipe:
        pipe.watch(keys.WATCHES)
        if pipe.hexists(keys.WATCHES, spec.name):
            pipe.unwatch()
            return register(conn, settings, spec)
        pipe.multi()
        pipe.hset(keys.WATCHES, spec.name, spec.to_json())
        for relpath, version in baseline.items():
            pipe.hset(keys.ledger(spec.name), relpath, json.dumps({"v": version, "job": None, "at": time.time()}))
        if not spec.paused:
            pipe.zadd(keys.DUE, {spec.name: 0})
        try:
            pipe.execute()
        except redis.WatchError:
            return register(conn, settings, spec)
    log.info("watch %s added on %s (%d existing checkpoints as baseline)", spec.name, spec.directory, len(baseline))
    return "added"


def baseline_size(conn: Any, watch: str) -> int:
    """Checkpoints taken as already there when the watch was added (ledgered without a job)."""
    return sum(1 for raw in conn.hvals(keys.ledger(watch)) if json.loads(raw).get("job") is None)


def update(conn: Any, spec: WatchSpec) -> None:
    """Replace a watch's spec (from a watches file), keeping its ledger."""
    with conn.pipeline() as pipe:
        pipe.hset(keys.WATCHES, spec.name, spec.to_json())
        if spec.paused:
            pipe.zrem(keys.DUE, spec.name)
        else:
            pipe.zadd(keys.DUE, {spec.name: 0})
        pipe.execute()
