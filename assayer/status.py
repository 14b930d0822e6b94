"""``assayer status``: watches, lag, queues, workers and the last error, in one place."""

from __future__ import annotations

import time
from typing import Any

from rq import Queue, Worker
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from . import keys, watches
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
            "evaluator": spec.evaluator,
            "paused": spec.paused,
            "queued_or_running": conn.scard(keys.pending(spec.name)),
            "incomplete": int(state.get("incomplete", 0) or 0),
            "evaluated": conn.hlen(keys.results(spec.name)),
            "files": int(state.get("files", 0) or 0),
            "last_scan_ago": None if last_scan is None else round(now - last_scan, 1),
            "error": state.get("error") or None,
            "waiting": state.get("waiting") or None,
            "stalled": state.get("stalled") or None,
            "results_copy": _copy_state(conn, spec.name),
            "layout": spec.layout,
        })
    for name in (settings.watch_queue, settings.eval_queue):
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
        if not set(names) & {settings.watch_queue, settings.eval_queue}:
            continue
        out["workers"].append({"name": worker.name, "queues": names, "state": worker.get_state(),
                               "job": worker.get_current_job_id()})
    return out


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
        lag = w["queued_or_running"] + w["incomplete"]
        seen = "never scanned" if w["last_scan_ago"] is None else f"scanned {w['last_scan_ago']}s ago"
        lines.append(
            f"  {w['name']}{' (paused)' if w['paused'] else ''}: {w['directory']}  lag {lag} "
            f"({w['queued_or_running']} queued/running, {w['incomplete']} still being written), "
            f"{w['evaluated']} evaluated, {seen}"
        )
        if w["waiting"]:
            lines.append(f"    waiting for: {w['waiting']}")
        if w["stalled"]:
            lines.append(f"    stalled: {w['stalled']}")
        if w["error"]:
            lines.append(f"    last error: {w['error']}")
        if w["results_copy"]:
            lines.append(f"    results file behind: {w['results_copy']} (Redis has them; it catches up once writable)")
    lines += ["", "queues:"]
    for q in info["queues"]:
        lines.append(f"  {q['name']}: {q['queued']} queued, {q['running']} running, "
                     f"{q['retry_wait']} waiting to retry, {q['failed']} failed")
    lines += ["", f"workers: {len(info['workers'])}"]
    for w in info["workers"]:
        lines.append(f"  {w['name']} [{', '.join(w['queues'])}] {w['state']}{' ' + w['job'] if w['job'] else ''}")
    return "\n".join(lines)
