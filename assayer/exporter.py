"""Prometheus metrics, read from Redis at each scrape (as rq-exporter does).

The figures describe the whole deployment, whatever number of workers runs and whichever serves
the scrape: ``assayer exporter`` (its own small process, no password, meant for the bundle's
network only) and ``/metrics`` on the dashboard (behind its basic auth) answer the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import checkpoints, keys, status, watches
from .records import parse
from .settings import Settings

log = logging.getLogger("assayer.exporter")


class AssayerCollector(Collector):
    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = GaugeMetricFamily("assayer_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            log.warning("scrape failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        took = GaugeMetricFamily("assayer_scrape_duration_seconds", "Seconds this scrape spent reading Redis")
        took.add_metric([], time.monotonic() - started)
        yield took

    def _families(self) -> Iterator[Metric]:
        conn = self.conn
        info = status.collect(conn, self.settings)
        running = checkpoints.running_jobs(conn, self.settings)
        lag = _gauge("assayer_watch_lag", "Complete checkpoints not yet evaluated (queued, running or retrying)")
        oldest = _gauge("assayer_watch_oldest_unevaluated_seconds", "Age of the oldest queued checkpoint (0: none)")
        by_status = _gauge("assayer_checkpoints", "Checkpoints by status", ["watch", "status"])
        duration = SummaryMetricFamily("assayer_evaluation_duration_seconds", "Duration of final evaluations",
                                       labels=["watch"])
        failures = _gauge("assayer_evaluation_failures", "Final results that are failures", ["watch"])
        retries = _gauge("assayer_evaluation_retries", "Attempts beyond the first, over every evaluation", ["watch"])
        last_scan = _gauge("assayer_watch_last_scan_age_seconds", "Seconds since the watch's last scan")
        deliveries = _gauge("assayer_deliveries", "Tracker deliveries by state", ["watch", "sink", "state"])
        for w in info["watches"]:
            name = w["name"]
            lag.add_metric([name], w["queued_or_running"])
            oldest.add_metric([name], w["oldest_pending_age"] or 0)
            if w["last_scan_ago"] is not None:
                last_scan.add_metric([name], w["last_scan_ago"])
            for state, count in checkpoints.counts(checkpoints.rows(conn, name, running)).items():
                by_status.add_metric([name, state], count)
            finals = [parse(v) for v in conn.hvals(keys.results(name))]
            duration.add_metric([name], len(finals), sum(float(r.get("duration") or 0) for r in finals))
            failures.add_metric([name], sum(1 for r in finals if r.get("status") == "failed"))
            retries.add_metric([name], sum(max(int(r.get("attempt") or 1) - 1, 0) for r in finals) + w["failing"])
            for sink, d in (w.get("report_to") or {}).items():
                for state in ("delivered", "pending", "failing"):
                    deliveries.add_metric([name, sink, state], d[state])
        yield from (lag, oldest, by_status, duration, failures, retries, last_scan, deliveries)
        queue = _gauge("assayer_queue_jobs", "Jobs of an Assayer queue by state", ["queue", "state"])
        for q in info["queues"]:
            for state in ("queued", "running", "retry_wait", "failed"):
                queue.add_metric([q["name"], state], q[state])
        yield queue
        workers = _gauge("assayer_workers", "Live workers by role and state", ["role", "state"])
        seen: dict[tuple[str, str], int] = {}
        roles = {q["name"]: "eval" for q in info["queues"]} | {self.settings.watch_queue: "watch"}
        for wk in info["workers"]:
            role = next((roles[q] for q in wk["queues"] if q in roles), "other")
            seen[(role, wk["state"])] = seen.get((role, wk["state"]), 0) + 1
        for (role, state), count in sorted(seen.items()):
            workers.add_metric([role, state], count)
        yield workers
        paused = _gauge("assayer_watch_paused", "1 when the watch is paused")
        for spec in watches.all_specs(conn):
            paused.add_metric([spec.name], 1 if spec.paused else 0)
        yield paused


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or ["watch"])


def registry(conn: redis.Redis, settings: Settings) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AssayerCollector(conn, settings))
    return reg


def wsgi_app(conn: redis.Redis, settings: Settings) -> Any:
    """The metrics as a WSGI app: ``/metrics`` (and ``/`` for a quick look)."""
    from prometheus_client import make_wsgi_app

    return make_wsgi_app(registry(conn, settings))
