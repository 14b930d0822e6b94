"""Evaluation suites: a watch of 1,000 evaluated checkpoints gains two evaluators (printed figures, not a test).

    python bench/suite_bench.py [--checkpoints 1000] [--workers 2] [--cold 100]

1. 1,000 small checkpoint files and a watch with one evaluator ``a``; ``ledger.enqueue_new``
   queues them (as a scan would) and N real ``assayer worker eval`` processes evaluate them all.
2. The watch is registered again with evaluators ``a``, ``b`` and ``c`` ("updated", ledger kept), and
   ``ledger.backfill`` (what the watch worker runs when evaluators change) queues what the
   checkpoints lack: 2,000 jobs. Figures: (a) backfill jobs queued per second; (b) eval jobs drained
   per second by the N workers, end to end (first evaluation started -> last final result stored,
   results-file fsync included), for the 1,000 first and the 2,000 backfill jobs; (c) Redis memory
   per result: the INFO ``used_memory`` delta over the 3,000 results, and ``MEMORY USAGE`` of the
   keys left behind, by kind (results, attempts, ledger, rq's job hashes and registries).
3. ``--cold M``: M new checkpoints, each queued for the three evaluators (as a scan queues new work),
   drained with ASSAYER_MAX_WARM=2 and then =3. Three evaluators taken in turn by a worker that keeps
   two warm evict each other on every job (least recently used), so each evaluation starts a child.

No watch worker runs: the bench calls the ledger itself (so nothing else queues the backfill). The
three evaluators are three trivial functions of one file written to the temp directory (a warm
child per function). Starts its own redis-server; writes bench/out/suite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import redis
from common import ROOT, machine, wait

from assayer import keys, ledger, watches
from assayer.dirs import version_of_path
from assayer.scan import Candidate

OUT = ROOT / "bench" / "out"
WATCH = "suite"
EVALUATORS = '''"""Three trivial evaluators (one warm child each): the figures measure Assayer, not evaluation."""


def a(path):
    return {"loss": 1.0}


def b(path):
    return {"acc": 0.5}


def c(path):
    return {"f1": 0.25}
'''
KEY_KINDS = (("results hash", "assayer:results:"), ("attempts lists", "assayer:attempts:"),
             ("ledger hash", "assayer:ledger:"), ("rq job hashes", "rq:job:"), ("rq results", "rq:results:"),
             ("rq finished registry", "rq:finished:"))
"""Key prefixes whose memory is reported, in order; anything else is counted as other."""


class Stack(common.Stack):
    def start_eval(self, count: int, env: dict[str, str] | None = None) -> None:
        for _ in range(count):
            self.start("eval", env)


def _candidates(root: Path, steps: range) -> list[Candidate]:
    """One small file per step, and the candidate a scan would report for it."""
    out = []
    for step in steps:
        path = root / f"step_{step:06d}.pt"
        path.write_bytes(b"\x80\x04checkpoint" + step.to_bytes(4, "little"))
        out.append(Candidate(str(path), path.name, version_of_path(str(path)), step, mtime=path.stat().st_mtime))
    return out


def _spec(stack: Stack, root: Path, names: str) -> watches.WatchSpec:
    refs = [f"{n}={stack.tmp / 'evals.py'}:{n}" for n in names]
    spec, _ = watches.build_spec(str(root), refs, name=WATCH, eval_existing=True)
    return spec


def _drain(stack: Stack, total: int, job_ids: list[str], timeout: float) -> dict[str, Any]:
    """Wait until the watch has ``total`` final results; the rate over ``job_ids`` (first started -> last stored)."""
    results_key = keys.results(WATCH)
    wait(lambda: stack.conn.hlen(results_key) >= total, timeout, f"{total} final results")
    stored = time.time()
    recs = [json.loads(raw) for raw in stack.conn.hmget(results_key, job_ids) if raw]
    assert len(recs) == len(job_ids), f"{len(job_ids) - len(recs)} of the jobs have no final result"
    bad = [r for r in recs if r["status"] != "ok"]
    assert not bad, f"{len(bad)} evaluation(s) not ok, e.g. {bad[0].get('error')}"
    first = min(datetime.fromisoformat(r["started_at"]).timestamp() for r in recs)
    last = max(datetime.fromisoformat(r["finished_at"]).timestamp() for r in recs)
    # The poll notices the last result up to 50 ms late; the last finished_at is set just before its write.
    seconds = max(min(stored, last + 0.05) - first, 1e-9)
    return {"jobs": len(recs), "seconds": round(seconds, 2), "jobs_per_s": round(len(recs) / seconds, 1)}


def _memory_by_kind(conn: redis.Redis, sample: int = 200) -> dict[str, dict[str, float]]:
    """Count the keys of each kind and estimate their bytes from ``MEMORY USAGE`` of a random sample."""
    found: dict[str, list[bytes]] = {}
    for key in conn.scan_iter(count=1000):
        kind = next((label for label, prefix in KEY_KINDS if key.decode().startswith(prefix)), "other")
        found.setdefault(kind, []).append(key)
    out: dict[str, dict[str, float]] = {}
    for label in [k for k, _ in KEY_KINDS] + ["other"]:
        names = found.get(label, [])
        if not names:
            continue
        chosen = random.Random(0).sample(names, min(sample, len(names)))
        sizes = [conn.memory_usage(k, samples=0) or 0 for k in chosen]
        mean = sum(sizes) / len(sizes)
        out[label] = {"keys": len(names), "bytes_per_key": round(mean), "bytes": round(mean * len(names))}
    return out


def bench(tmp: Path, n: int, n_workers: int, cold: int) -> dict[str, Any]:
    stack = Stack(tmp)
    try:
        (tmp / "evals.py").write_text(EVALUATORS)
        root = tmp / "run"
        root.mkdir()
        conn, settings = stack.conn, stack.settings
        one = _spec(stack, root, "a")
        assert watches.register(conn, settings, one) == "added"
        mem0 = conn.info("memory")["used_memory"]
        cands = _candidates(root, range(1, n + 1))
        stack.start_eval(n_workers)

        t0 = time.perf_counter()
        first_ids = ledger.enqueue_new(conn, settings, one, cands)
        enqueue_s = time.perf_counter() - t0
        assert len(first_ids) == n, f"enqueue_new queued {len(first_ids)} jobs, not {n}"
        first = _drain(stack, n, first_ids, timeout=60 + n)

        three = _spec(stack, root, "abc")
        assert watches.register(conn, settings, three) == "updated"
        spec = watches.require(conn, WATCH)
        t0 = time.perf_counter()
        backfill_ids = ledger.backfill(conn, settings, spec)
        backfill_s = time.perf_counter() - t0
        assert len(backfill_ids) == 2 * n, f"backfill queued {len(backfill_ids)} jobs, not {2 * n}"
        drained = _drain(stack, 3 * n, backfill_ids, timeout=60 + 2 * n)
        assert ledger.backfill(conn, settings, spec) == [], "a second backfill queued jobs again"
        stack.stop_workers()  # their health keys and registrations leave with them

        mem1 = conn.info("memory")["used_memory"]
        figures: dict[str, Any] = {
            "checkpoints": n, "evaluators": 3, "eval_workers": n_workers,
            "enqueue_new": {"jobs": n, "seconds": round(enqueue_s, 3), "jobs_per_s": round(n / enqueue_s)},
            "backfill_enqueue": {"jobs": len(backfill_ids), "seconds": round(backfill_s, 3),
                                 "jobs_per_s": round(len(backfill_ids) / backfill_s)},
            "drain_one_evaluator": first, "drain_backfill": drained,
            "memory": {"results": 3 * n, "used_memory_delta": mem1 - mem0,
                       "used_memory_per_result": round((mem1 - mem0) / (3 * n)), "by_kind": _memory_by_kind(conn)},
        }
        if cold:
            figures["cold"] = _cold(stack, root, spec, n, cold)
        return figures
    finally:
        stack.close()


def _cold(stack: Stack, root: Path, spec: watches.WatchSpec, n: int, count: int) -> dict[str, Any]:
    """``count`` new checkpoints x 3 evaluators, one eval worker, keeping 2 and then 3 evaluators warm."""
    out: dict[str, dict[str, float]] = {}
    done = 3 * n
    for warm, offset in ((2, 0), (3, count)):
        cands = _candidates(root, range(n + 1 + offset, n + 1 + offset + count))
        stack.start_eval(1, {"ASSAYER_MAX_WARM": str(warm)})
        ids = ledger.enqueue_new(stack.conn, stack.settings, spec, cands)
        done += len(ids)
        out[f"max_warm_{warm}"] = _drain(stack, done, ids, timeout=120 + 3 * count)
        stack.stop_workers()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="eval worker processes")
    parser.add_argument("--cold", type=int, default=100, help="new checkpoints x 3 evaluators at max warm 2 vs 3 "
                                                              "(0: skip)")
    args = parser.parse_args()
    print(f"machine: {machine()} (load {os.getloadavg()[0]:.2f})")
    with tempfile.TemporaryDirectory(prefix="assayer-bench-suite-") as tmp:
        figures = bench(Path(tmp), args.checkpoints, args.workers, args.cold)
    n, mem = figures["checkpoints"], figures["memory"]
    print(f"\n{n:,} checkpoints evaluated by one evaluator, then two more evaluators added "
          f"({args.workers} eval worker processes, trivial evaluators)")
    e, b = figures["enqueue_new"], figures["backfill_enqueue"]
    print(f"  enqueue_new, 1 evaluator:     {e['jobs']:>5} jobs in {e['seconds']:.3f} s = {e['jobs_per_s']:,} jobs/s")
    print(f"  (a) backfill enqueue:         {b['jobs']:>5} jobs in {b['seconds']:.3f} s = {b['jobs_per_s']:,} jobs/s")
    for label, key in (("drain, first evaluator", "drain_one_evaluator"), ("(b) drain, backfill", "drain_backfill")):
        d = figures[key]
        print(f"  {label + ':':29} {d['jobs']:>5} jobs in {d['seconds']:.2f} s = {d['jobs_per_s']} jobs/s end to end")
    print(f"  (c) Redis used_memory: +{mem['used_memory_delta'] / 2**20:.1f} MiB over {mem['results']:,} results = "
          f"{mem['used_memory_per_result']:,} bytes per result (all keys left behind); by kind:")
    for label, k in mem["by_kind"].items():
        print(f"      {label:22} {k['keys']:>6} keys x {k['bytes_per_key']:>8,} B = {k['bytes'] / 2**20:7.2f} MiB")
    for label, d in figures.get("cold", {}).items():
        print(f"  new checkpoints x 3 evaluators, 1 worker, {label}: {d['jobs']} jobs in {d['seconds']:.2f} s = "
              f"{d['jobs_per_s']} jobs/s")
    print(f"\nreproduce: make bench-suite  (or {sys.executable} bench/suite_bench.py --checkpoints {n} "
          f"--workers {args.workers} --cold {args.cold})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "suite.json").write_text(json.dumps({"machine": machine(), **figures}, indent=2))


if __name__ == "__main__":
    main()
