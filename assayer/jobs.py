"""The two rq job functions: ``scan`` (watch queue) and ``evaluate`` (eval queue).

Both take JSON-serialisable keyword arguments only (the queues use rq's JSON serializer).
They run inside Assayer's workers, which install a :class:`Runtime` holding the settings, the
connection, the scanner caches and the warm evaluator pool; run by a plain ``rq worker`` they
build one from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rq import get_current_job

from . import defaults, keys, ledger, pools, records, results, snapshots, watches
from .dirs import version_of_path
from .errors import AssayerError, EvaluationFailed
from .evalhost import EvaluatorPool
from .evaluator import UNKNOWN_VERSION, check_allowed, version_of
from .notify import Notifier
from .scan import Candidate, Scanner, ScanReport
from .settings import Settings

log = logging.getLogger("assayer.jobs")

RETRY_POLICY = "the evaluator raised; raise assayer.Retry for failures worth another attempt"
"""Crashes, kills (OOM), timeouts and lost workers are retried; an exception is not, unless it is a Retry."""


@dataclass
class Runtime:
    settings: Settings
    conn: Any
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    scanners: dict[str, Scanner] = field(default_factory=dict)
    scanned_specs: dict[str, watches.WatchSpec] = field(default_factory=dict)
    last_errors: dict[str, str] = field(default_factory=dict)
    state_written: dict[str, tuple[tuple[Any, ...], float]] = field(default_factory=dict)
    beat: Callable[[], None] | None = None  # set by the eval worker while a job runs
    notifier: Notifier | None = None  # set by the watch worker when inotify is available
    active_at: dict[str, float] = field(default_factory=dict)  # last scan that saw a change, per watch
    notified: dict[str, tuple[int, int]] = field(default_factory=dict)  # (scanner generation, overflows) synced
    backfilled: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # per watch: the evaluators last backfilled
    newest: dict[str, tuple[int, Candidate | None, float]] = field(default_factory=dict)  # --every: see _every
    _pool: EvaluatorPool | None = None
    _specs: dict[bytes, watches.WatchSpec] = field(default_factory=dict)

    def spec(self, raw: bytes) -> watches.WatchSpec:
        """Parse a stored spec, remembering the last parse per watch (specs rarely change)."""
        cached = self._specs.get(raw)
        if cached is None:
            cached = watches.WatchSpec.from_json(raw)
            self._specs = {k: v for k, v in self._specs.items() if v.name != cached.name}
            self._specs[raw] = cached
        return cached

    @property
    def pool(self) -> EvaluatorPool:
        if self._pool is None:
            self._pool = EvaluatorPool(self.settings.max_warm_evaluators, self.settings.eval_max_calls,
                                       self.settings.eval_max_rss)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


_runtime: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Called by Assayer's workers at start (and with None at exit)."""
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        settings = Settings.from_env()
        job = get_current_job()
        _runtime = Runtime(settings, job.connection if job else settings.redis())
    return _runtime


# -- watch work ----------------------------------------------------------------------------


def scan(names: list[str]) -> dict[str, Any]:
    """Scan each named watch once, enqueue eval jobs for new complete checkpoints, and set the next scan time.

    Redis work is batched over the watches (one read of the specs, one pipeline of due times and
    states), so an idle watch costs a few stats and no round trip of its own.
    """
    rt = runtime()
    started = time.time()
    summary: dict[str, Any] = {}
    due: dict[str, float] = {}
    states: dict[str, dict[str, Any]] = {}
    for name, raw in zip(names, rt.conn.hmget(keys.WATCHES, names)):
        spec = rt.spec(raw) if raw else None
        if spec is None or spec.paused:
            rt.scanners.pop(name, None)
            if rt.notifier is not None:
                rt.notifier.drop(name)
            continue
        try:
            summary[name], due[name], state = scan_one(rt, spec, started)
        except Exception as exc:  # one broken watch must not stop the others, nor itself
            log.exception("scan of watch %s failed", name)
            due[name] = time.time() + rt.settings.poll_interval
            state = {"last_scan": time.time(), "error": f"{type(exc).__name__}: {exc}"}
            summary[name] = {"error": str(exc)}
        if _state_changed(rt, name, state):
            states[name] = state
    with rt.conn.pipeline(transaction=False) as pipe:
        if due:
            # xx: a watch removed meanwhile stays removed; lt: a change notified during the scan keeps its "now"
            pipe.zadd(keys.DUE, due, xx=True, lt=True)
        for name, state in states.items():
            pipe.hset(keys.watch_state(name), mapping=state)
        pipe.execute()
    return summary


def scan_one(rt: Runtime, spec: watches.WatchSpec, batch_start: float) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Scan one watch; return a summary, when to scan it next, and its state for ``assayer status``.

    The next scan counts from the batch's start, not this watch's turn in it: watches scanned
    together stay due together, so one scan job keeps serving them all (a long full scan would
    otherwise spread them over many small jobs, each paying rq's per-job cost).
    """
    poll = spec.poll_interval or rt.settings.poll_interval
    scanner = rt.scanners.get(spec.name)
    if scanner is None or rt.scanned_specs.get(spec.name) is not spec:  # a new or changed spec
        fresh = spec.scanner(rt.settings)
        if scanner is None or scanner.options != fresh.options:
            scanner = rt.scanners[spec.name] = fresh
        rt.scanned_specs[spec.name] = spec
    now = time.time()
    report = scanner.scan(now, budget=defaults.SCAN_BUDGET)
    current = ledger.versions(spec)
    ready = report.ready if spec.every is None else _every(rt, spec, report.ready, now)
    pinned = _pin(rt, spec, ready, current) if spec.snapshot != "off" and ready else Pinned()
    ready = [c for c in ready if c.relpath not in pinned.waiting]
    queued = ledger.enqueue_new(rt.conn, rt.settings, spec, ready, current=current, pins=pinned.pins,
                                skipped=pinned.skipped) if ready else []
    for cand in report.ready:
        if cand.relpath not in pinned.waiting:  # a checkpoint waiting for room in the snapshot cache is offered again
            scanner.mark_done(cand.relpath, cand.version)
    queued += _backfill(rt, spec, current)
    error = "; ".join(report.errors[:3])
    if report.truncated:  # reported, not waited for: the other watches of the batch get their turn
        error = (f"slow: the scan took over {defaults.SCAN_BUDGET:g} s ({report.files} checkpoints so far) "
                 "and goes on next time" + (f"; {error}" if error else ""))
    if report.missing_root:
        error = f"{spec.directory} does not exist (yet); waiting for it"
    poll = _poll_interval(rt, spec, scanner, report, poll, now)
    next_scan = batch_start + poll if report.next_check is None else min(batch_start + poll, report.next_check)
    waiting = _some([f"{rel}: {why}" for rel, why in sorted(report.waiting.items())])
    stalled = _some([f"{rel} ({report.waiting.get(rel) or 'incomplete'}, unchanged for {_age(age)})"
                     for rel, age in sorted(report.stalled.items(), key=lambda kv: -kv[1])])
    if pinned.error:
        error = f"{error}; {pinned.error}" if error else pinned.error
    state = {"last_scan": now, "files": report.files, "incomplete": len(report.pending), "error": error,
             "snapshot_waiting": _some(sorted(pinned.waiting)) and f"{pinned.full}: waiting {_some(sorted(pinned.waiting))}",
             "waiting": waiting, "stalled": stalled,
             "writing": json.dumps(sorted(report.pending)[: defaults.WRITING_SHOWN])}  # the checkpoint page's rows
    return {"queued": len(queued), "incomplete": len(report.pending), "files": report.files}, next_scan, state


@dataclass
class Pinned:
    """What pinning a scan's checkpoints gave: snapshots, checkpoints to record skipped or to offer again."""

    pins: dict[str, snapshots.Pin] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    full: str = ""
    error: str = ""


def _pin(rt: Runtime, spec: watches.WatchSpec, ready: list[Candidate], current: dict[str, str]) -> Pinned:
    """Pin the checkpoints this scan would queue, before they are queued (``--snapshot``).

    One that is gone already is queued unpinned (its evaluation ends ``missing``); when the cache
    is full it waits (offered again next scan) or, with ``--when-full skip``, is recorded skipped.
    """
    out = Pinned()
    for cand in ledger.needs(rt.conn, spec, ready, current):
        try:
            # this scan's pins are recorded with its jobs, after the loop: count their bytes here
            out.pins[cand.relpath] = snapshots.make(rt.conn, rt.settings, spec.name, cand.path, cand.relpath,
                                                    cand.version, spec.snapshot, spec.snapshot_dir,
                                                    unrecorded=sum(pin.size for pin in out.pins.values()))
        except FileNotFoundError:
            continue  # deleted (or replaced) before it could be pinned: queued as it is, it ends missing
        except snapshots.CacheFull as exc:
            out.full = "snapshot cache full"
            if spec.when_full == "skip":
                out.skipped[cand.relpath] = str(exc)
            else:
                out.waiting.add(cand.relpath)
        except (snapshots.SnapshotError, OSError) as exc:
            out.error = f"snapshot: {exc}"  # queued unpinned: evaluated if the trainer keeps it long enough
    return out


def _every(rt: Runtime, spec: watches.WatchSpec, ready: list[Candidate], now: float) -> list[Candidate]:
    """``--every N``: checkpoints whose step is a multiple of N, and the newest one once no newer came.

    Any other checkpoint is skipped, except the newest: it is held back, and evaluated once it has
    stayed the newest for ``ASSAYER_NEWEST_AFTER`` seconds (the run's last checkpoint, or the one
    training paused at). A worker restarted meanwhile holds it back again from its first scan.
    """
    assert spec.every is not None
    top, held, since = rt.newest.get(spec.name, (-1, None, now))
    keep = [c for c in ready if c.step is None or c.step % spec.every == 0]
    for cand in ready:
        if cand.step is not None and cand.step > top:
            top, held, since = cand.step, (None if cand.step % spec.every == 0 else cand), now
    if held is not None and now - since >= rt.settings.newest_after:
        keep.append(held)
        held = None
    rt.newest[spec.name] = (top, held, since)
    return keep


def _backfill(rt: Runtime, spec: watches.WatchSpec, current: dict[str, str]) -> list[str]:
    """When the watch's evaluators or their versions changed (or this worker first sees it), queue what
    its evaluated checkpoints lack; nothing when the watch opted out (``--no-backfill``)."""
    signature = (tuple(spec.evaluators), tuple(sorted(current.items())), spec.backfill)
    if rt.backfilled.get(spec.name) == signature:
        return []
    queued = ledger.backfill(rt.conn, rt.settings, spec, current) if spec.backfill else []
    rt.backfilled[spec.name] = signature
    if queued:
        log.info("watch %s: %d evaluation(s) of earlier checkpoints queued (evaluators %s)", spec.name, len(queued),
                 ", ".join(f"{k} {v}" for k, v in sorted(current.items())))
    return queued


def _some(items: list[str], shown: int = 3) -> str:
    """The first few items for ``assayer status``, and how many more there are."""
    text = "; ".join(items[:shown])
    return text + (f"; and {len(items) - shown} more" if len(items) > shown else "")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _poll_interval(rt: Runtime, spec: watches.WatchSpec, scanner: Scanner, report: ScanReport, poll: float,
                   now: float) -> float:
    """A watch that changed in the last ``quiet_after`` seconds is polled every ``poll``; a quiet one less often.

    A quiet watch whose directories inotify watches is woken by any change, so it is polled only as
    a safety net; one on a network mount (or with inotify off) keeps ``idle_poll_interval``.
    """
    covered = False
    if rt.notifier is not None and not report.missing_root:
        synced = rt.notified.get(spec.name)
        if synced is None or synced[0] != scanner.generation:
            rt.notifier.sync(spec.name, spec.directory, scanner.directories())
        if synced is not None and synced[1] != rt.notifier.overflows:
            scanner.force_full()  # events were lost: look at everything once
        rt.notified[spec.name] = (scanner.generation, rt.notifier.overflows)
        covered = rt.notifier.covers(spec.name)
    if report.changed or report.pending or report.ready or report.errors or report.truncated:
        rt.active_at[spec.name] = now
    if now - rt.active_at.setdefault(spec.name, now) < rt.settings.quiet_after:
        return poll
    return max(poll, defaults.NOTIFIED_IDLE_POLL if covered else rt.settings.idle_poll_interval)


def _state_changed(rt: Runtime, name: str, state: dict[str, Any]) -> bool:
    """Write a watch's state when it changes, else every STATE_REFRESH seconds; log errors once."""
    error = state.get("error") or ""
    if error and rt.last_errors.get(name) != error:
        log.warning("watch %s: %s", name, error)
    elif not error and rt.last_errors.get(name):
        log.info("watch %s: recovered", name)
    rt.last_errors[name] = error
    signature = tuple(v for k, v in sorted(state.items()) if k != "last_scan")
    previous = rt.state_written.get(name)
    if previous and previous[0] == signature and state["last_scan"] - previous[1] < defaults.STATE_REFRESH:
        return False
    rt.state_written[name] = (signature, state["last_scan"])
    return True


# -- eval work -----------------------------------------------------------------------------


def evaluate(
    watch: str, checkpoint: str, relpath: str, version: str, evaluator: str, step: int | None, retries: int,
    layout: str = "file", epoch: int | None = None, mtime: float | None = None, evaluator_name: str | None = None,
    evaluator_version: str | None = None, pool: str | None = None, original_path: str | None = None,
    pinned_version: str | None = None, pin: str | None = None, skipped: str | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint version with one evaluator in a warm evaluator process and store the outcome."""
    rt = runtime()
    job = get_current_job()
    job_id = job.id if job else f"adhoc-{time.time_ns()}"
    retries_left = (job.retries_left or 0) if job else 0
    if job and results.has_final(rt.conn, watch, job_id):
        log.warning("job %s already has a final result; not evaluating %s again", job_id, relpath)
        return {"status": "duplicate"}
    payload = {"watch": watch, "checkpoint": original_path or checkpoint, "relpath": relpath, "version": version,
               "step": step,
               "evaluator": evaluator, "retries": retries, "layout": layout, "epoch": epoch, "mtime": mtime,
               "evaluator_name": evaluator_name, "evaluator_version": evaluator_version, "pool": pool}
    rec = records.new_attempt(job_id, payload, retries - retries_left + 1, rt.worker_name, records.utcnow())
    try:
        check_allowed(evaluator, rt.settings.evaluator_paths)
    except AssayerError as exc:  # written into Redis by someone else: never run, never retried
        results.record(rt.conn, rt.settings.results_path, records.finish(rec, "failed", True, str(exc)))
        log.error("%s: %s", relpath, exc)
        return {"status": "failed", "error": str(exc)}
    if skipped:  # --when-full skip: the snapshot cache had no room for it
        results.record(rt.conn, rt.settings.results_path, records.finish(rec, "skipped", True, skipped))
        return {"status": "skipped"}
    missing = _missing_reason(checkpoint, pinned_version or version)
    if missing:
        return _missing(rt, rec, f"{missing} before it could be evaluated")
    superseded = _check_version(rt, job, payload, rec)
    if superseded is not None:
        return superseded
    context = {"watch": watch, "checkpoint": checkpoint, "step": step, "attempt": rec["attempt"],
               "job_id": job_id, "version": version, "layout": layout, "original_path": original_path}
    outcome = rt.pool.evaluate(evaluator, checkpoint, context, rt.settings.eval_timeout or None, rt.beat)
    changed = _missing_reason(checkpoint, pinned_version or version)
    if changed:  # rewritten while being read: these metrics describe neither version
        return _missing(rt, rec, f"{changed} while it was being evaluated", duration=round(outcome.duration, 4))
    final = outcome.ok or retries_left <= 0 or not outcome.retryable
    if not outcome.ok and not outcome.retryable and retries_left > 0:  # another attempt would fail alike
        if job is not None:
            job.retries_left = 0  # rq must not retry it either
        outcome.error = f"{outcome.error} (not retried: {RETRY_POLICY})"
    extra: dict[str, Any] = {}
    if outcome.step is not None:
        extra["step"] = outcome.step  # reported by the evaluator: it knows better than the name
    if outcome.directions:
        extra["directions"] = outcome.directions
    done = records.finish(rec, "ok" if outcome.ok else "failed", final, outcome.error, metrics=outcome.metrics or {},
                          traceback=outcome.traceback, duration=round(outcome.duration, 4), **extra)
    spec = watches.get(rt.conn, watch) if outcome.ok else None
    results.record(rt.conn, rt.settings.results_path, done, spec.report_to if spec else ())
    if not outcome.ok:
        left = f"retrying ({retries_left} left)" if not final else "final"
        log.warning("evaluation of %s failed, %s: %s", relpath, left, outcome.error)
        raise EvaluationFailed(outcome.error or "evaluation failed")
    log.info("evaluated %s in %.2fs: %s", relpath, outcome.duration, outcome.metrics)
    return {"status": "ok", "metrics": outcome.metrics}


def _check_version(rt: Runtime, job: Any, payload: dict[str, Any], rec: records.ResultRecord) -> dict[str, Any] | None:
    """None when the job may run the evaluator as it is now; else what ended it (see :func:`_superseded`)."""
    queued_for = payload.get("evaluator_version")
    if not queued_for or job is None:
        return None
    now_version = version_of(payload["evaluator"])
    if queued_for == UNKNOWN_VERSION:  # queued by a process that could not read it: say what ran
        rec["evaluator_version"] = now_version
    elif now_version not in (queued_for, UNKNOWN_VERSION):
        return _superseded(rt, job, payload, now_version)
    return None


def _superseded(rt: Runtime, job: Any, payload: dict[str, Any], now_version: str) -> dict[str, Any]:
    """The evaluator changed since this job was queued: it is replaced by a job for the new version.

    Running it would record the new code's metrics under the old version (and the backfill of the
    new version would evaluate the checkpoint again); so the ledger hands the checkpoint to a job
    of the current version (queued once, whoever asks first) and this one ends without a result.
    """
    spec = watches.get(rt.conn, payload["watch"])
    name = records.evaluator_name(payload)
    queued: list[str] = []
    if spec is not None and any(e.name == name for e in spec.evaluators):
        # The new job reads the original (a snapshot is made for new work only; this one's goes with its jobs).
        cand = Candidate(payload["checkpoint"], payload["relpath"], payload["version"], payload.get("step"),
                         payload.get("layout") or "file", payload.get("epoch"), payload.get("mtime"))
        queued = ledger.enqueue_new(rt.conn, rt.settings, spec, [cand], current={name: now_version}, only=[name],
                                    backfill=str(job.origin).endswith(pools.BACKFILL_SUFFIX))
    rt.conn.srem(keys.pending(payload["watch"]), job.id)
    log.info("%s: evaluator %s changed (%s -> %s) since it was queued; %s", payload["relpath"], name,
             payload.get("evaluator_version"), now_version,
             "queued for the new version" if queued else "the new version is already queued")
    return {"status": "superseded", "by": queued}


def _missing(rt: Runtime, rec: records.ResultRecord, what: str, **fields: Any) -> dict[str, Any]:
    """The final "missing" result: the checkpoint was deleted, made unreadable or replaced."""
    done = records.finish(rec, "missing", True, f"the checkpoint was {what}", **fields)
    results.record(rt.conn, rt.settings.results_path, done)
    log.warning("%s: %s", rec["relpath"], done["error"])
    return {"status": "missing"}


def _missing_reason(checkpoint: str, version: str) -> str | None:
    try:
        current = version_of_path(checkpoint)
    except FileNotFoundError:
        return "deleted"
    except OSError as exc:
        return f"made unreadable ({exc.strerror or exc})"
    if current != version:
        return "replaced by a newer version"
    return None


def record_lost(conn: Any, settings: Settings, job: Any) -> None:
    """Store the attempt of a job whose worker vanished (SIGKILL, OOM, node loss)."""
    kwargs = job.kwargs or {}
    if not kwargs.get("watch"):
        return
    retries_left = job.retries_left or 0
    rec = records.new_attempt(job.id, kwargs, int(kwargs.get("retries") or 0) - retries_left + 1, job.worker_name,
                              job.started_at.isoformat() if job.started_at else None)
    why = "the eval worker was lost (killed, OOM or node failure) during the evaluation"
    results.record(conn, settings.results_path,
                   records.finish(rec, "failed", retries_left <= 0,
                                  why + ("; retrying" if retries_left > 0 else "; no retries left")))
