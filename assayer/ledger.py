"""The ledger: which version of which checkpoint was handed to an eval job, kept in Redis.

Enqueueing an eval job and recording it in the ledger happen in one MULTI/EXEC transaction
guarded by WATCH on the watch's ledger, so several watch workers (or a worker restarted
mid-scan) never enqueue the same checkpoint version twice, and a crash can never leave a
ledger entry without its job or a job without its entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, Retry

from . import defaults, evaluator, keys, pools, snapshots
from .dirs import version_of_path
from .evaluator import UNKNOWN_VERSION
from .records import LedgerEntry, Slot
from .scan import Candidate, parse_step
from .settings import Settings
from .snapshots import Pin
from .watches import Evaluator, WatchSpec

log = logging.getLogger("assayer.ledger")

def job_id_for(watch: str, relpath: str, version: str, salt: str = "", evaluator: str = "", ev_version: str = "") -> str:
    """rq job ids must match ``[A-Za-z0-9_-]+``: hash what the job evaluates."""
    digest = hashlib.sha1(f"{watch}\0{relpath}\0{version}\0{salt}\0{evaluator}\0{ev_version}".encode()).hexdigest()
    return f"ev-{digest[:32]}"


def eval_queue(conn: Any, settings: Settings, pool: str = pools.DEFAULT, backfill: bool = False) -> Queue:
    return Queue(pools.queue(settings, pool, backfill), connection=conn, serializer="json", default_timeout=-1)


def _new_job(queue: Queue, settings: Settings, spec: WatchSpec, cand: Candidate, job_id: str, ev: Evaluator,
             ev_version: str, pin: Pin | None = None, skipped: str | None = None) -> Any:
    payload = {
        "watch": spec.name,
        "checkpoint": pin.path if pin else cand.path,
        "relpath": cand.relpath,
        "version": cand.version,
        "evaluator": ev.ref,
        "evaluator_name": ev.name,
        "evaluator_version": ev_version,
        "pool": ev.pool,
        "step": cand.step,
        "retries": settings.retries,
        "layout": cand.layout,
        "epoch": cand.epoch,
        "mtime": cand.mtime,
    }
    if pin is not None:  # the evaluator reads the snapshot; results name the original
        payload.update(original_path=cand.path, pinned_version=pin.pinned_version, pin=pin.name)
    if skipped:
        payload["skipped"] = skipped
    retry = Retry(max=settings.retries, interval=list(settings.retry_backoff)) if settings.retries else None
    shown = cand.relpath if len(spec.evaluators) == 1 else f"{cand.relpath} [{ev.name}]"
    return queue.create_job(
        "assayer.jobs.evaluate",
        kwargs=payload,
        job_id=job_id,
        timeout=-1,  # the eval worker enforces ASSAYER_EVAL_TIMEOUT itself; rq's 180 s default must not apply
        result_ttl=defaults.RESULT_TTL,
        failure_ttl=defaults.FAILURE_TTL,
        retry=retry,
        description=f"evaluate {spec.name}: {shown}",
    )


def versions(spec: WatchSpec) -> dict[str, str]:
    """The current version of each of the watch's evaluators (read from their source, never imported)."""
    return {ev.name: evaluator.version_of(ev.ref) for ev in spec.evaluators}


def enqueue_new(
    conn: Any, settings: Settings, spec: WatchSpec, candidates: Sequence[Candidate], force: bool = False,
    current: dict[str, str] | None = None, only: Sequence[str] | None = None, backfill: bool = False,
    pins: dict[str, Pin] | None = None, skipped: dict[str, str] | None = None,
) -> list[str]:
    """Enqueue an eval job for each candidate and evaluator the ledger does not have at the current versions.

    ``current``: each evaluator's version (read from its source when not given). ``only``: these
    evaluators' names (default all). ``backfill``: the jobs go to the pools' backfill queues, after
    new work. With ``force`` (an explicit ``assayer evaluate``), enqueue even what the ledger has,
    under fresh job ids. Every (checkpoint version, evaluator, evaluator version) is queued once:
    the ledger and the queues change in one WATCH/MULTI transaction.

    ``pins``: snapshots of candidates (by relpath): their jobs read the snapshot, and the pin is
    recorded, holding those jobs, in the same transaction; a pin no job needed is removed.
    ``skipped``: candidates (by relpath) whose jobs only record a final ``skipped`` result, and why.
    """
    current = current if current is not None else versions(spec)
    chosen = [ev for ev in spec.evaluators if only is None or ev.name in only]
    order = sorted(candidates, key=lambda c: (c.step is None, c.step or 0, c.relpath))
    if backfill and spec.order == "newest":
        order.reverse()  # appended in turn: the newest is taken first
    enqueued: list[str] = []
    for start in range(0, len(order), defaults.ENQUEUE_BATCH):
        batch = order[start : start + defaults.ENQUEUE_BATCH]
        enqueued += _enqueue_batch(conn, settings, spec, batch, force, current, chosen, backfill, pins or {},
                                   skipped or {})
    return enqueued


def _enqueue_batch(
    conn: Any, settings: Settings, spec: WatchSpec, batch: Sequence[Candidate], force: bool,
    current: dict[str, str], chosen: Sequence[Evaluator], backfill: bool, pins: dict[str, Pin],
    skipped: dict[str, str],
) -> list[str]:
    ledger_key = keys.ledger(spec.name)
    salt = f"request-{time.time_ns()}" if force else ""
    # New work of the newest order goes to the front of its queue, oldest first, so the newest is taken next.
    at_front = not backfill and spec.order == "newest"
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(ledger_key, keys.WATCHES)
                if not pipe.hexists(keys.WATCHES, spec.name):
                    pipe.unwatch()
                    _discard_unused(pins, batch, set())
                    return []  # removed while we scanned
                now = time.time()
                raws = pipe.hmget(ledger_key, [c.relpath for c in batch])
                writes: dict[str, LedgerEntry] = {}
                todo: list[tuple[Candidate, Evaluator, str, str]] = []
                for cand, raw in zip(batch, raws):
                    entry = LedgerEntry.from_json(raw, spec.first) if raw else None
                    planned = _plan(spec, cand, entry, chosen, current, force, salt, now)
                    if planned is not None:
                        writes[cand.relpath] = planned[0]
                        todo += [(cand, ev, job_id, current[ev.name]) for ev, job_id in planned[1]]
                if not writes:
                    pipe.unwatch()
                    _discard_unused(pins, batch, set())
                    return []
                if backfill:  # one evaluator's jobs after another's: a worker keeps fewer evaluators warm than it serves
                    rank = {ev.name: i for i, ev in enumerate(chosen)}
                    todo.sort(key=lambda t: rank[t[1].name])
                pipe.multi()
                for relpath, entry in writes.items():
                    pipe.hset(ledger_key, relpath, entry.to_json())
                queues: dict[tuple[str, bool], Queue] = {}
                for cand, ev, job_id, ev_version in todo:
                    queue = queues.get((ev.pool, backfill)) or eval_queue(conn, settings, ev.pool, backfill)
                    queues[(ev.pool, backfill)] = queue
                    pipe.sadd(keys.pending(spec.name), job_id)
                    queue.enqueue_job(_new_job(queue, settings, spec, cand, job_id, ev, ev_version,
                                               pins.get(cand.relpath), skipped.get(cand.relpath)),
                                      pipeline=pipe, at_front=at_front)
                used = set()
                for relpath in {c.relpath for c, _, _, _ in todo} & set(pins):
                    pin = pins[relpath]
                    pin.jobs = [job_id for c, _, job_id, _ in todo if c.relpath == relpath]
                    pipe.hset(keys.pins(spec.name), pin.name, pin.to_json())
                    used.add(relpath)
                pipe.execute()
                _discard_unused(pins, batch, used)
                for cand, ev, _, ev_version in todo:
                    log.info("queued %s: %s (step %s) for %s %s%s", spec.name, cand.relpath, cand.step, ev.name,
                             ev_version, " (backfill)" if backfill else "")
                return [job_id for _, _, job_id, _ in todo]
            except redis.WatchError:
                continue  # another worker touched the ledger: read it again


def _discard_unused(pins: dict[str, Pin], batch: Sequence[Candidate], used: set[str]) -> None:
    """Remove the snapshots of this batch that no job needed (another worker queued the version first)."""
    for cand in batch:
        pin = pins.get(cand.relpath)
        if pin is not None and cand.relpath not in used:
            snapshots.discard(pin)


def needs(conn: Any, spec: WatchSpec, candidates: Sequence[Candidate], current: dict[str, str]) -> list[Candidate]:
    """The candidates ``enqueue_new`` would queue something for now (what is worth pinning)."""
    chosen = list(spec.evaluators)
    found = entries(conn, spec.name, [c.relpath for c in candidates], spec.first)
    out = []
    for cand, entry in zip(candidates, found):
        planned = _plan(spec, cand, entry, chosen, current, False, "", 0.0)
        if planned is not None and planned[1]:
            out.append(cand)
    return out


def matches(queued_for: str | None, version: str) -> bool:
    """Whether a slot queued for ``queued_for`` covers the evaluator at ``version``: the same version, or one
    side unknown (a slot from before versions, a process that cannot read the evaluator's source)."""
    return queued_for in (None, UNKNOWN_VERSION, version) or version == UNKNOWN_VERSION


def _plan(spec: WatchSpec, cand: Candidate, entry: LedgerEntry | None, chosen: Sequence[Evaluator],
          current: dict[str, str], force: bool, salt: str, now: float,
          ) -> tuple[LedgerEntry, list[tuple[Evaluator, str]]] | None:
    """The ledger entry ``cand`` needs and the jobs to queue for it; None when the ledger has all of it."""
    same = entry is not None and entry.version == cand.version
    if same and entry is not None and entry.is_baseline and not force:
        return None  # there when the watch was added: only `assayer evaluate` queues it
    slots = dict(entry.evals) if same and entry is not None else {}
    changed = not same
    jobs = []
    for ev in chosen:
        slot = slots.get(ev.name)
        version = current[ev.name]
        if not force and slot is not None and matches(slot.ev, version):
            if slot.ev in (None, UNKNOWN_VERSION) and version != UNKNOWN_VERSION:
                slots[ev.name], changed = Slot(version, slot.job, slot.at), True  # learn the version it is at
            continue
        job_id = job_id_for(spec.name, cand.relpath, cand.version, salt, ev.name, version)
        slots[ev.name], changed = Slot(version, job_id, now), True
        jobs.append((ev, job_id))
    if not changed:
        return None
    first = slots.get(spec.first) or next(iter(slots.values()), None)
    return LedgerEntry(cand.version, first.job if first else None, now, slots, cand.step, cand.layout), jobs


def backfill(conn: Any, settings: Settings, spec: WatchSpec, current: dict[str, str] | None = None,
             only: Sequence[str] | None = None) -> list[str]:
    """Queue the evaluations that checkpoints already evaluated lack at the evaluators' current versions.

    Looks at the ledger's non-baseline entries whose checkpoint is still on disk at the same
    version; what is already queued or done at the current version is never queued again.
    """
    current = current if current is not None else versions(spec)
    chosen = [ev.name for ev in spec.evaluators if (only is None or ev.name in only)
              and current[ev.name] != UNKNOWN_VERSION]  # a version this process cannot read starts nothing
    wanted = []
    for relpath, entry in all_entries(conn, spec.name, spec.first).items():
        if entry.is_baseline:
            continue
        if all((slot := entry.evals.get(n)) is not None and matches(slot.ev, current[n]) for n in chosen):
            continue
        path = os.path.join(spec.directory, relpath)
        try:
            if version_of_path(path) != entry.version:
                continue  # rewritten (a scan queues the new version) or gone
        except OSError:
            continue
        step = entry.step if entry.step is not None else parse_step(relpath)
        wanted.append(Candidate(path, relpath, entry.version, step, entry.layout or "file"))
    return enqueue_new(conn, settings, spec, wanted, current=current, only=chosen, backfill=True) if wanted else []


def entries(conn: Any, watch: str, relpaths: Sequence[str], first: str | None = None) -> list[LedgerEntry | None]:
    """The ledger's entry for each path (None where it has none)."""
    raws = conn.hmget(keys.ledger(watch), list(relpaths)) if relpaths else []
    return [LedgerEntry.from_json(raw, first) if raw else None for raw in raws]


def all_entries(conn: Any, watch: str, first: str | None = None) -> dict[str, LedgerEntry]:
    return {k.decode(): LedgerEntry.from_json(v, first) for k, v in conn.hgetall(keys.ledger(watch)).items()}


def unevaluated(conn: Any, spec: WatchSpec, candidates: Sequence[Candidate], current: dict[str, str],
                only: Sequence[str]) -> list[tuple[Candidate, list[str]]]:
    """Complete checkpoints whose evaluation by some of ``only`` was queued once but is now neither
    queued, running nor finished (a baseline entry, or a job lost with its queue), with those
    evaluators' names: they need a fresh job id. (What the ledger lacks, ``enqueue_new`` queues.)
    """
    handled = {m.decode() for m in conn.hkeys(keys.results(spec.name))} | {
        m.decode() for m in conn.smembers(keys.pending(spec.name))}
    again = []
    for cand, entry in zip(candidates, entries(conn, spec.name, [c.relpath for c in candidates], spec.first)):
        if entry is None or entry.version != cand.version:
            continue
        if entry.is_baseline:
            again.append((cand, list(only)))
            continue
        lost = [n for n in only if (slot := entry.evals.get(n)) is not None and matches(slot.ev, current[n])
                and slot.job not in handled]
        if lost:
            again.append((cand, lost))
    return again
