"""A watch's checkpoints, one row each, as the checkpoint page, its JSON API and the exporter see them.

A row is the current version of a ledgered checkpoint path, an older version that has a final
result (a ``last.ckpt`` rewritten in place), or a checkpoint the last scan saw still being
written. Its status is one of :data:`STATUSES`, decided from Redis alone:

* ``writing``: seen by the last scan, not complete yet (never queued);
* ``baseline``: already there when the watch was added, not evaluated (``assayer evaluate``);
* ``queued``, ``running`` (in rq's started registry), ``retrying`` (its last attempt failed);
* ``ok``, ``failed``, ``missing``: its final result;
* ``unfinished``: queued once, but neither queued now nor finished (its queue was purged).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from . import keys, ledger, pools
from .directions import direction
from .records import ResultRecord, evaluator_name, parse
from .scan import parse_step
from .settings import Settings

STATUSES = ("writing", "baseline", "queued", "running", "retrying", "ok", "failed", "missing", "skipped", "unfinished")
"""Every status a checkpoint row can have, in the order of its life."""

_NUMBER = (int, float)


def running_jobs(conn: redis.Redis, settings: Settings) -> set[str]:
    """Ids of the eval jobs a worker runs now."""
    return {job_id for name in pools.all_queues(conn, settings)
            for job_id in StartedJobRegistry(name, conn, serializer=JSONSerializer).get_job_ids()}


def rows(conn: redis.Redis, watch: str, running: set[str]) -> list[dict[str, Any]]:
    """Every checkpoint row of ``watch``, by step (rows without a step last), then path."""
    entries = ledger.all_entries(conn, watch)
    finals = {keys.text(k): parse(v) for k, v in conn.hgetall(keys.results(watch)).items()}
    failing = {keys.text(k): parse(v) for k, v in conn.hgetall(keys.failing(watch)).items()}
    pending = {keys.text(m) for m in conn.smembers(keys.pending(watch))}
    out: list[dict[str, Any]] = []
    current_jobs = set()
    for relpath, entry in entries.items():
        if entry.is_baseline:
            out.append(_row(relpath, "baseline", version=entry.version))
            continue
        # One row per evaluator of the checkpoint (a ledger entry from before names has one unnamed job).
        slots: list[tuple[str | None, str | None]] = sorted((n, s.job) for n, s in entry.evals.items())
        for name, job in slots or [(None, entry.job)]:
            current_jobs.add(job)
            out.append(_slot_row(relpath, entry.version, name, job, finals, failing, pending, running))
    for job, rec in finals.items():  # older versions of a path (or of its evaluator), and results whose entry went
        if job not in current_jobs:
            out.append(_from_record(rec) | {"older_version": rec.get("relpath") in entries})
    raw = conn.hget(keys.watch_state(watch), "writing")
    for relpath in json.loads(raw) if raw else []:
        if relpath not in entries:
            out.append(_row(relpath, "writing"))
    evaluators = {r["evaluator"] for r in out if r["evaluator"]}
    if len(evaluators) > 1:  # EVALUATOR.METRIC, as `assayer results` names them (results.qualify)
        for r in out:
            if r["evaluator"]:
                r["metrics"] = {f"{r['evaluator']}.{k}": v for k, v in r["metrics"].items()}
                r["directions"] = {f"{r['evaluator']}.{k}": v for k, v in (r.get("directions") or {}).items()}
    out.sort(key=_order)
    return out


def _slot_row(relpath: str, version: str, name: str | None, job: str | None, finals: dict[str, ResultRecord],
              failing: dict[str, ResultRecord], pending: set[str], running: set[str]) -> dict[str, Any]:
    """The row of one evaluator's job for a checkpoint version."""
    named = {"evaluator": name} if name else {}
    if job in finals:
        return _from_record(finals[job])
    if job in running:
        return _row(relpath, "running", version=version, job_id=job, **named, **_attempt_of(failing.get(job or "")))
    if job in failing:
        return _from_record(failing[job], "retrying")
    status = "queued" if job in pending else "unfinished"
    return _row(relpath, status, version=version, job_id=job, **named)


def _row(relpath: str, status: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"relpath": relpath, "step": None, "status": status, "metrics": {}, "attempt": None,
                           "duration": None, "worker": None, "error": None, "traceback": None, "finished_at": None,
                           "version": None, "job_id": None, "evaluator": None, "evaluator_version": None}
    row.update(fields)
    if "step" not in fields:
        row["step"] = parse_step(relpath)
    return row


def _order(row: dict[str, Any]) -> tuple[bool, int, str, str, str]:
    step = row["step"]
    return step is None, step or 0, row["relpath"], row["evaluator"] or "", row["finished_at"] or ""


def _attempt_of(rec: ResultRecord | None) -> dict[str, Any]:
    return {"attempt": rec.get("attempt", 0) + 1} if rec else {"attempt": 1}


def _from_record(rec: ResultRecord, status: str | None = None) -> dict[str, Any]:
    return _row(str(rec.get("relpath") or rec.get("checkpoint")), status or str(rec.get("status")),
                step=rec.get("step"), metrics=rec.get("metrics") or {}, attempt=rec.get("attempt"),
                duration=rec.get("duration"), worker=rec.get("worker"), error=rec.get("error"),
                traceback=rec.get("traceback"), finished_at=rec.get("finished_at"), version=rec.get("version"),
                job_id=rec.get("job_id"), directions=rec.get("directions") or {},
                evaluator=evaluator_name(rec) if rec.get("evaluator") else None,
                evaluator_version=rec.get("evaluator_version"))


def metric_names(rows_: Iterable[dict[str, Any]]) -> list[str]:
    """Numeric metrics of ok rows, sorted (private ones, ``_step`` say, left out)."""
    names = {k for r in rows_ if r["status"] == "ok" for k, v in r["metrics"].items()
             if isinstance(v, _NUMBER) and not isinstance(v, bool)}
    return sorted(n for n in names if not n.startswith("_"))


def best(rows_: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: the best ok row's job id and value, and which way is better (the one rule of ``--best``)."""
    ok = [r for r in rows_ if r["status"] == "ok"]
    out: dict[str, dict[str, Any]] = {}
    for metric in metric_names(ok):
        rule = direction(metric, ok)
        scored = [r for r in ok if isinstance(r["metrics"].get(metric), _NUMBER) and not isinstance(r["metrics"][metric], bool)]
        if scored:
            top = (max if rule.mode == "max" else min)(scored, key=lambda r: r["metrics"][metric])
            out[metric] = {"job_id": top["job_id"], "relpath": top["relpath"], "step": top["step"],
                           "value": top["metrics"][metric], "mode": rule.mode, "why": rule.why}
    return out


def counts(rows_: Iterable[dict[str, Any]]) -> dict[str, int]:
    found = dict.fromkeys(STATUSES, 0)
    for r in rows_:
        found[r["status"]] = found.get(r["status"], 0) + 1
    return found


def page(rows_: list[dict[str, Any]], number: int, size: int) -> tuple[list[dict[str, Any]], int]:
    """Rows of page ``number`` (1-based, clamped) and the number of pages."""
    pages = max(1, -(-len(rows_) // size))
    number = min(max(number, 1), pages)
    return rows_[(number - 1) * size: number * size], pages

