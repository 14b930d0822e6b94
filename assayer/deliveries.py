"""Deliveries of final results to trackers (``--report-to``), each exactly once per sink.

A delivery is one (watch, sink, eval job) triple, a member ``watch|sink|job_id`` of the sorted set
:data:`assayer.keys.DELIVER_DUE`, scored by when it may next be tried. The rule, and where it is kept:

* **Never skipped.** The member is added in the same Lua step that stores the job's final result
  (:func:`assayer.results.record`): no final ``ok`` result exists without its deliveries due.
* **Claimed with a lease.** A reporter takes due members and pushes their score one lease ahead in
  one Lua step (:data:`CLAIM`), and renews the lease of each just before trying it, only if it is
  still its own (:data:`RENEW`): a reporter killed mid-delivery leaves it to be claimed again when
  the lease ends, and two reporters never try the same one at once. The lease
  (``ASSAYER_DELIVERY_LEASE``) must exceed the longest single delivery.
* **Never twice.** A delivery leaves the set only together with its ``done`` mark
  (:func:`assayer.keys.delivered`), in one MULTI. A claim that finds the mark drops the member;
  a delivery tried before (a reporter died during it) first asks the tracker itself whether the
  result is there (:meth:`assayer.sinks.Sink.delivered`).
* **Off the critical path.** Reporters are threads of the watch workers (:class:`Reporter`): a slow
  or unreachable tracker delays only other deliveries, never a scan or an evaluation. Failures are
  retried with exponential backoff; ``assayer status`` shows what is pending and failing per sink.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from . import defaults, keys, watches
from .records import ResultRecord, evaluator_name, parse
from .sinks import Delivery, Sink, build

log = logging.getLogger("assayer.deliveries")

CLAIM = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, item in ipairs(items) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), item)
end
return items
"""
"""Take due deliveries and push each one lease ahead, atomically."""

RENEW = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"""
"""Extend our claim on one delivery just before trying it, only if it is still ours (its score unchanged):
a batch slower than the lease never lets two reporters try the same delivery at once."""


@dataclass(frozen=True)
class Item:
    watch: str
    sink: str
    job_id: str

    @property
    def member(self) -> str:
        return f"{self.watch}|{self.sink}|{self.job_id}"

    @property
    def field(self) -> str:
        """Its field in the watch's delivered and delivery-errors hashes."""
        return f"{self.sink}|{self.job_id}"

    @classmethod
    def parse(cls, member: str | bytes) -> Item:
        text = member.decode() if isinstance(member, bytes) else member
        watch, sink, job_id = text.split("|", 2)
        return cls(watch, sink, job_id)


def members(watch: str, sinks: Iterable[str], job_id: str) -> list[str]:
    return [Item(watch, sink, job_id).member for sink in sinks]


def schedule(conn: redis.Redis, watch: str, sinks: Iterable[str], records: Iterable[ResultRecord]) -> int:
    """Make deliveries due now for these final ok results, except those delivered or already due."""
    sinks = list(sinks)
    done = {keys.text(f) for f in conn.hkeys(keys.delivered(watch))}
    due: dict[str, float] = {}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("final"):
            for item in (Item(watch, sink, rec["job_id"]) for sink in sinks):
                if item.field not in done:
                    due[item.member] = time.time()
    return int(conn.zadd(keys.DELIVER_DUE, due, nx=True)) if due else 0  # type: ignore[arg-type]


def claim(conn: redis.Redis, now: float, lease: float, limit: int = defaults.DELIVERY_BATCH) -> list[tuple[Item, float]]:
    """Due deliveries, each with the score that marks it as ours until ``now + lease``."""
    raw = conn.eval(CLAIM, 1, keys.DELIVER_DUE, now, lease, limit)  # type: ignore[no-untyped-call]
    return [(Item.parse(m), now + lease) for m in raw or []]


def renew(conn: redis.Redis, item: Item, claimed: float, lease: float) -> float | None:
    """Hold ``item`` one more lease from now if it is still ours; the new claim score, or None."""
    until = time.time() + lease
    ok = conn.eval(RENEW, 1, keys.DELIVER_DUE, item.member, repr(claimed), repr(until))  # type: ignore[no-untyped-call]
    return until if ok else None


def delivery_for(item: Item, rec: ResultRecord, spec: watches.WatchSpec | None) -> Delivery:
    """What a tracker gets. The watch's first evaluator logs its metrics as they are named; any other
    evaluator's as ``NAME.METRIC``, so adding an evaluator to a running watch renames no curve."""
    finished = rec.get("finished_at")
    name = evaluator_name(rec)
    metrics = dict(rec.get("metrics") or {})
    if spec is not None and name != spec.first:
        metrics = {f"{name}.{k}": v for k, v in metrics.items()}
    return Delivery(
        watch=item.watch, sink=item.sink, result_key=f"{item.watch}/{item.job_id}", path=rec.get("checkpoint") or "",
        version=rec.get("version") or "", step=rec.get("step"), metrics=metrics,
        evaluator=name, epoch=rec.get("epoch"),
        finished_at=datetime.fromisoformat(finished).timestamp() if finished else time.time(),
        tensorboard_dir=spec.tensorboard_dir if spec else None, mlflow_run_id=spec.mlflow_run_id if spec else None,
        wandb_run_id=spec.wandb_run_id if spec else None,
    )


class Reporter:
    """Delivers due results; one per watch worker, in its own thread (see the module docstring)."""

    def __init__(self, conn: redis.Redis, results_dir: Path, lease: float = defaults.DELIVERY_LEASE,
                 make_sink: Callable[[str, Path], Sink] = build) -> None:
        self.conn = conn
        self.results_dir = results_dir
        self.lease = lease
        self.make_sink = make_sink
        self.sinks: dict[str, Sink] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                worked = self.tick(time.time())
            except redis.RedisError as exc:  # Redis away: the deliveries wait in Redis
                log.warning("deliveries paused: %s", exc)
                worked = 0
            stop.wait(0 if worked else defaults.DELIVERY_POLL)
        self.close()

    def tick(self, now: float) -> int:
        """Try every due delivery once; return how many were tried."""
        items = claim(self.conn, now, self.lease)
        for item, claimed in items:
            if renew(self.conn, item, claimed, self.lease) is not None:  # else: its lease ran out; someone else has it
                self.attempt(item)
        return len(items)

    def attempt(self, item: Item) -> None:
        conn = self.conn
        if conn.hexists(keys.delivered(item.watch), item.field):
            conn.zrem(keys.DELIVER_DUE, item.member)
            return
        raw = conn.hget(keys.results(item.watch), item.job_id)
        spec = watches.get(conn, item.watch)
        if raw is None or spec is None:  # the watch was removed, or its results with it
            conn.zrem(keys.DELIVER_DUE, item.member)
            return
        d = delivery_for(item, parse(raw), spec)
        previous = conn.hget(keys.delivery_errors(item.watch), item.field)
        tries = json.loads(previous)["attempts"] if previous else 0
        conn.hset(keys.delivery_errors(item.watch), item.field,  # a delivery under way: ask the tracker next time
                  json.dumps({"attempts": tries + 1, "error": _last_error(previous), "at": time.time()}))
        try:
            sink = self.sink(item.sink)
            if tries and sink.delivered(d):
                log.info("%s: %s already has result %s (a delivery was cut short)", item.watch, item.sink, item.job_id)
            else:
                sink.deliver(d)
        except Exception as exc:  # any tracker trouble: retried later, never lost
            delay = min(defaults.DELIVERY_BACKOFF * 2 ** tries, defaults.DELIVERY_BACKOFF_MAX)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: delivery of %s to %s failed (attempt %d, next in %.0fs): %s",
                        item.watch, item.job_id, item.sink, tries + 1, delay, error)
            with conn.pipeline() as pipe:
                pipe.hset(keys.delivery_errors(item.watch), item.field,
                          json.dumps({"attempts": tries + 1, "error": error[:500], "at": time.time()}))
                pipe.zadd(keys.DELIVER_DUE, {item.member: time.time() + delay}, xx=True)
                pipe.execute()
            return
        with conn.pipeline() as pipe:  # MULTI: done and no longer due, together
            pipe.hset(keys.delivered(item.watch), item.field, json.dumps({"at": time.time(), "attempts": tries + 1}))
            pipe.hdel(keys.delivery_errors(item.watch), item.field)
            pipe.zrem(keys.DELIVER_DUE, item.member)
            pipe.execute()

    def sink(self, name: str) -> Sink:
        if name not in self.sinks:
            sink = self.make_sink(name, self.results_dir)
            if hasattr(sink, "creation_lock"):  # the watch workers make a tracker's run one at a time
                sink.creation_lock = lambda what: self.conn.lock(keys.tracker_lock(what), timeout=60,
                                                                 blocking_timeout=120)
            self.sinks[name] = sink
        return self.sinks[name]

    def close(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception as exc:  # closing is best effort; what was delivered is recorded
                log.warning("closing the %s sink: %s", sink.name, exc)
        self.sinks.clear()


def _last_error(raw: Any) -> str | None:
    return json.loads(raw).get("error") if raw else None


def summary(conn: redis.Redis, watch: str, sinks: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per sink: deliveries done, pending (due or being tried), failing (last attempt failed) and the last error."""
    names = list(sinks)
    counts = {s: {"delivered": 0, "pending": 0, "failing": 0} for s in names}
    last: dict[str, tuple[float, str]] = {}
    for f in conn.hkeys(keys.delivered(watch)):
        sink = keys.text(f).split("|", 1)[0]
        if sink in counts:
            counts[sink]["delivered"] += 1
    for member, _ in conn.zscan_iter(keys.DELIVER_DUE, match=f"{watch}|*"):
        item = Item.parse(member)
        if item.watch == watch and item.sink in counts:
            counts[item.sink]["pending"] += 1
    for f, raw in conn.hgetall(keys.delivery_errors(watch)).items():
        sink = keys.text(f).split("|", 1)[0]
        info = json.loads(raw)
        if sink in counts and info.get("error"):
            counts[sink]["failing"] += 1
            if float(info.get("at") or 0) >= last.get(sink, (0.0, ""))[0]:
                last[sink] = (float(info.get("at") or 0), str(info["error"]))
    return {s: {**counts[s], "last_error": last[s][1] if s in last else None} for s in names}
