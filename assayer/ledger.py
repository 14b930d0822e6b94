"""The ledger: which version of which checkpoint was handed to an eval job, kept in Redis.

Enqueueing an eval job and recording it in the ledger happen in one MULTI/EXEC transaction
guarded by WATCH on the watch's ledger, so several watch workers (or a worker restarted
mid-scan) never enqueue the same checkpoint version twice, and a crash can never leave a
ledger entry without its job or a job without its entry.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, Retry

from . import defaults, keys
from .records import LedgerEntry
from .scan import Candidate
from .settings import Settings
from .watches import WatchSpec

log = logging.getLogger("assayer.ledger")

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
    for start in range(0, len(candidates), defaults.ENQUEUE_BATCH):
        enqueued += _enqueue_batch(conn, queue, settings, spec, candidates[start : start + defaults.ENQUEUE_BATCH], force)
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
                    c for c, raw in zip(batch, current)
                    if force or raw is None or LedgerEntry.from_json(raw).version != c.version
                ]
                if not fresh:
                    pipe.unwatch()
                    return []
                pipe.multi()
                ids = []
                for cand in fresh:
                    job_id = job_id_for(spec.name, cand.relpath, cand.version, salt)
                    pipe.hset(ledger_key, cand.relpath, LedgerEntry(cand.version, job_id, time.time()).to_json())
                    pipe.sadd(keys.pending(spec.name), job_id)
                    queue.enqueue_job(_new_job(queue, settings, spec, cand, job_id), pipeline=pipe)
                    ids.append(job_id)
                pipe.execute()
                for cand in fresh:
                    log.info("queued %s: %s (step %s)", spec.name, cand.relpath, cand.step)
                return ids
            except redis.WatchError:
                continue  # another worker touched the ledger: read it again


def entries(conn: Any, watch: str, relpaths: Sequence[str]) -> list[LedgerEntry | None]:
    """The ledger's entry for each path (None where it has none)."""
    raws = conn.hmget(keys.ledger(watch), list(relpaths)) if relpaths else []
    return [LedgerEntry.from_json(raw) if raw else None for raw in raws]


def all_entries(conn: Any, watch: str) -> dict[str, LedgerEntry]:
    return {k.decode(): LedgerEntry.from_json(v) for k, v in conn.hgetall(keys.ledger(watch)).items()}


def unevaluated(conn: Any, watch: str, candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
    """Split complete checkpoints without a result: ``(new, again)``.

    ``new``: versions the ledger does not know (a baseline entry of another version, or none).
    ``again``: versions it knows but whose job has neither a final result nor a place in the queue
    (a baseline entry, or a job lost with its queue); they need a fresh job id.
    """
    handled = {m.decode() for m in conn.hkeys(keys.results(watch))} | {m.decode() for m in conn.smembers(keys.pending(watch))}
    new, again = [], []
    for cand, entry in zip(candidates, entries(conn, watch, [c.relpath for c in candidates])):
        if entry is None or entry.version != cand.version:
            new.append(cand)
        elif entry.job not in handled:
            again.append(cand)
    return new, again

