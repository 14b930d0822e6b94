"""``assayer status``: watches, lag, queues, workers and the last error, in one place."""

from __future__ import annotations

import time
from datetime import timezone
from typing import Any

from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from . import deliveries, keys, pools, records, snapshots, watches
from .records import LedgerEntry
from .settings import Settings


def collect(conn: Any, settings: Settings) -> dict[str, Any]:
    now = time.time()
    lost = conn.get(keys.DATA_LOST)
    out: dict[str, Any] = {"redis": settings.redacted_redis_url, "data_lost": lost.decode() if lost else None,
                           "watches": [], "queues": [], "workers": []}
    for spec in watches.all_specs(conn):
        state = {k.decode(): v.decode() for k, v in conn.hgetall(keys.watch_state(spec.name)).items()}
        last_scan = float(state["last_scan"]) if state.get("last_scan") else None
        out["watches"].append({
            "name": spec.name,
            "directory": spec.directory,
            "evaluator": spec.shown_evaluators(),
            "evaluators": [{"name": e.name, "ref": e.ref, "pool": e.pool} for e in spec.evaluators],
            "paused": spec.paused,
            "queued_or_running": conn.scard(keys.pending(spec.name)),
            "incomplete": int(state.get("incomplete", 0) or 0),
            "evaluated": conn.hlen(keys.results(spec.name)),
            **_outcomes(conn, spec.name, now),
            "files": int(state.get("files", 0) or 0),
            "last_scan_ago": None if last_scan is None else round(now - last_scan, 1),
            "error": state.get("error") or None,
            "waiting": state.get("waiting") or None,
            "stalled": state.get("stalled") or None,
            "results_copy": _copy_state(conn, spec.name),
            "layout": spec.layout,
            "report_to": deliveries.summary(conn, spec.name, _sinks_of(conn, spec)),
            "snapshots": snapshots.summary(conn, spec.name) if spec.snapshot != "off" else None,
        })
    eval_queues = pools.all_queues(conn, settings)
    for name in [settings.watch_queue, *eval_queues]:
        queue = Queue(name, connection=conn, serializer=JSONSerializer)
        out["queues"].append({
            "name": name,
            "queued": queue.count,
            "running": StartedJobRegistry(name, conn).count,
            "retry_wait": ScheduledJobRegistry(name, conn).count,
            "failed": FailedJobRegistry(name, conn).count,
        })
    for worker in Worker.all(connection=conn, serializer=JSONSerializer):
        names = worker.queue_names()
        if not set(names) & {settings.watch_queue, *eval_queues}:
            continue
        job_id = worker.get_current_job_id()
        out["workers"].append({"name": worker.name, "queues": names, "state": worker.get_state(), "job": job_id,
                               **_doing(conn, job_id, now)})
    return out


def _outcomes(conn: Any, watch: str, now: float) -> dict[str, Any]:
    """Final outcomes by status, the jobs failing now (awaiting a retry), the last error, the oldest pending age."""
    finals = [records.parse(v) for v in conn.hvals(keys.results(watch))]
    failing = [records.parse(v) for v in conn.hvals(keys.failing(watch))]
    counts = {status: sum(1 for r in finals if r.get("status") == status) for status in records.STATUSES}
    errors = sorted((r for r in finals + failing if r.get("status") == "failed" and r.get("error")),
                    key=lambda r: str(r.get("finished_at") or ""))
    last = errors[-1] if errors else None
    pending = {m.decode() for m in conn.smembers(keys.pending(watch))}
    queued_at = []
    for raw in conn.hvals(keys.ledger(watch)) if pending else []:
        entry = LedgerEntry.from_json(raw)
        queued_at += [s.at for s in entry.evals.values() if s.job in pending and s.at]
        if not entry.evals and entry.job in pending and entry.at:
            queued_at.append(entry.at)
    return {
        "outcomes": counts,
        "failing": len(failing),
        "last_error": f"{last.get('relpath')}: {str(last['error']).strip().splitlines()[0][:300]}" if last else None,
        "oldest_pending_age": round(now - min(queued_at), 1) if queued_at else None,
    }


def _doing(conn: Any, job_id: str | None, now: float) -> dict[str, Any]:
    """What a busy worker works on, in words, and for how long."""
    if not job_id:
        return {"doing": None, "for_seconds": None}
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except Exception:  # gone meanwhile
        return {"doing": None, "for_seconds": None}
    kwargs = job.kwargs or {}
    doing = f"{kwargs.get('watch')}: {kwargs.get('relpath')}" if kwargs.get("relpath") else job.description
    started = job.started_at.replace(tzinfo=timezone.utc).timestamp() if job.started_at else None
    return {"doing": doing, "for_seconds": round(now - started, 1) if started else None}


def _sinks_of(conn: Any, spec: watches.WatchSpec) -> list[str]:
    """The watch's trackers, and any other one a backfill (``assayer report --to``) delivers to."""
    extra = {deliveries.Item.parse(m).sink for m, _ in conn.zscan_iter(keys.DELIVER_DUE, match=f"{spec.name}|*")}
    return [*spec.report_to, *sorted(extra - set(spec.report_to))]


def _copy_state(conn: Any, watch: str) -> str | None:
    why = conn.hget(keys.COPY_ERRORS, watch)
    if not why:
        return None
    return f"{conn.llen(keys.copy_backlog(watch))} result line(s) not yet in the file: {why.decode()}"


def render(info: dict[str, Any]) -> str:
    lines = [f"redis: {info['redis']}", "", "watches:"]
    if info.get("data_lost"):
        lines[1:1] = ["", f"!! {info['data_lost']}"]
    if not info["watches"]:
        lines.append("  none (add one with `assayer watch add DIR --evaluator file.py:fn`)")
    for w in info["watches"]:
        lines += _render_watch(w)
    lines += ["", "queues:"]
    for q in info["queues"]:
        lines.append(f"  {q['name']}: {q['queued']} queued, {q['running']} running, "
                     f"{q['retry_wait']} waiting to retry, {q['failed']} failed")
    lines += ["", f"workers: {len(info['workers'])}"]
    for w in info["workers"]:
        doing = f" {w['doing']}" if w["doing"] else (f" {w['job']}" if w["job"] else "")
        took = f" for {w['for_seconds']:.0f}s" if w["for_seconds"] is not None else ""
        lines.append(f"  {w['name']} [{', '.join(w['queues'])}] {w['state']}{doing}{took}")
    return "\n".join(lines)


def _render_watch(w: dict[str, Any]) -> list[str]:
    lag = w["queued_or_running"] + w["incomplete"]
    seen = "never scanned" if w["last_scan_ago"] is None else f"scanned {w['last_scan_ago']}s ago"
    outcomes = w["outcomes"]
    lines = [
        f"  {w['name']}{' (paused)' if w['paused'] else ''}: {w['directory']}  lag {lag} "
        f"({w['queued_or_running']} queued/running, {w['incomplete']} still being written), "
        f"{outcomes['ok']} ok, {outcomes['failed']} failed, {outcomes['missing']} missing, "
        + (f"{outcomes['skipped']} skipped, " if outcomes.get("skipped") else "") + seen
    ]
    snaps = w.get("snapshots")
    notes = [
        ("failing now", f"{w['failing']} (waiting to retry)" if w["failing"] else None),
        ("last evaluation error", f"{w['last_error']}  (assayer results --failed)" if w["last_error"] else None),
        ("oldest queued checkpoint", f"{w['oldest_pending_age']:.0f}s ago" if w["oldest_pending_age"] is not None
         else None),
        ("waiting for", w["waiting"]),
        ("stalled", w["stalled"]),
        ("last error", w["error"]),
        ("results file behind", f"{w['results_copy']} (Redis has them; it catches up once writable)"
         if w["results_copy"] else None),
        ("snapshots", f"{snaps['pinned']} pinned, {snaps['bytes'] / 1024**2:.1f} MiB copied"
         + (f"; {snaps['waiting']}" if snaps["waiting"] else "") if snaps else None),
    ]
    for sink, d in (w.get("report_to") or {}).items():
        failing = f", {d['failing']} failing: {d['last_error']}" if d["failing"] else ""
        notes.append((f"to {sink}", f"{d['delivered']} delivered, {d['pending']} pending{failing}"))
    return lines + [f"    {label}: {text}" for label, text in notes if text]
