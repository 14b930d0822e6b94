"""Evaluation suites on real workers: several evaluators per checkpoint, their versions, backfill,
priorities and pools. Each (checkpoint version, evaluator, evaluator version) is evaluated once."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from harness import Workers, final_results, invoke, wait_for, wait_for_scans
from rq import Worker
from writers import torch_bytes

from assayer import checkpoints, keys, pools, watches
from assayer.rq_internals import queue_key
from assayer.settings import Settings

EVALUATOR = '''
import json, os, time

def {fn}(path):
    started = time.time()
    marker = os.environ.get("SUITE_MARKER")
    if marker:
        with open(marker, "a") as fh:
            fh.write(json.dumps({{"fn": "{fn}", "path": os.path.basename(path), "at": started}}) + "\\n")
    time.sleep(float(os.environ.get("SUITE_SECONDS", "0")))
    with open(os.environ["SUITE_LOG"], "a") as fh:
        fh.write(json.dumps({{"fn": "{fn}", "path": os.path.basename(path), "tag": {tag!r}, "at": started}}) + "\\n")
    step = int("".join(c for c in os.path.basename(path) if c.isdigit()) or 0)
    return {{"{metric}": step + {bonus}, "pid": os.getpid()}}
'''


def write_evaluator(folder: Path, fn: str, metric: str, tag: str = "v1", bonus: int = 0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fn}.py"
    path.write_text(EVALUATOR.format(fn=fn, metric=metric, tag=tag, bonus=bonus))
    return f"{fn}={path}:{fn}"


def runs(log: Path) -> Counter[tuple[str, str, str]]:
    """Completed evaluator calls: (function, checkpoint file, source tag) -> how many times."""
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter((d["fn"], d["path"], d["tag"]) for d in map(json.loads, lines))


def add(conn: redis.Redis, settings: Settings, ckpts: Path, refs: list[str], **suite: object) -> watches.WatchSpec:
    ckpts.mkdir(parents=True, exist_ok=True)
    spec, _ = watches.build_spec(str(ckpts), refs, name="run", suite=watches.Suite(**suite))  # type: ignore[arg-type]
    assert watches.register(conn, settings, spec) in ("added", "updated")
    return spec


def finals_by(conn: redis.Redis) -> Counter[tuple[str, str, str]]:
    """Final ok results: (evaluator, checkpoint, evaluator version) -> how many."""
    return Counter((r["evaluator"], r["relpath"], r["evaluator_version"]) for r in final_results(conn, "run")
                   if r["status"] == "ok")


def settled(conn: redis.Redis, settings: Settings) -> bool:
    queues = pools.all_queues(conn, settings)
    return conn.scard(keys.pending("run")) == 0 and all(conn.llen(queue_key(q)) == 0 for q in queues)


def test_two_evaluators_then_one_edited_runs_exactly_the_missing_evaluations(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, ckpts, suite = tmp_path / "runs.jsonl", tmp_path / "ckpts", tmp_path / "suite"
    refs = [write_evaluator(suite, "loss", "loss"), write_evaluator(suite, "acc", "acc")]
    add(conn, settings, ckpts, refs)
    env = {"SUITE_LOG": str(log)}
    workers.start("watch", env)
    workers.start("eval", env)
    for i in range(3):
        (ckpts / f"step-{i + 1}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: len(finals_by(conn)) == 6, 40, what="3 checkpoints x 2 evaluators")
    first = finals_by(conn)
    versions = {ev: {v for (e, _, v) in first if e == ev} for ev in ("loss", "acc")}
    assert all(len(v) == 1 for v in versions.values()), versions

    write_evaluator(suite, "acc", "acc", tag="v2", bonus=1)  # edited: its source hash changes
    wait_for(lambda: len(finals_by(conn)) == 9, 40, what="acc's new version on the 3 checkpoints")
    (ckpts / "step-4.pt").write_bytes(torch_bytes(4))
    wait_for(lambda: len(finals_by(conn)) == 11, 40, what="step-4 by both evaluators")
    wait_for_scans(conn, "run", 3)  # three scans saw every checkpoint since: what they queue is queued now
    wait_for(lambda: settled(conn, settings), 20, what="nothing left queued")
    assert len(finals_by(conn)) == 11

    done = runs(log)
    assert all(count == 1 for count in done.values()), done  # nothing twice
    assert sorted(k for k in done if k[0] == "loss") == [("loss", f"step-{i}.pt", "v1") for i in range(1, 5)]
    assert sorted(k for k in done if k[0] == "acc") == sorted(
        [("acc", f"step-{i}.pt", "v1") for i in range(1, 4)] + [("acc", f"step-{i}.pt", "v2") for i in range(1, 5)])
    finals = finals_by(conn)
    assert all(count == 1 for count in finals.values())
    new_acc = {v for (e, _, v) in finals if e == "acc"} - versions["acc"]
    assert len(new_acc) == 1 and {v for (e, _, v) in finals if e == "loss"} == versions["loss"]

    # The table: one row per checkpoint with both evaluators' newest metrics; old versions kept and said so.
    table = invoke(settings, "results", "run").stdout
    assert "acc.acc" in table and "loss.loss" in table and table.count("(old acc") == 3
    best = invoke(settings, "results", "run", "--best", "acc.acc", "--format", "json")
    (winner,) = json.loads(best.stdout)
    assert winner["evaluator"] == "acc" and winner["checkpoint"].endswith("step-4.pt")
    # The checkpoint page: one row per checkpoint and evaluator, the same names and the same best.
    rows = checkpoints.rows(conn, "run", set())
    assert {r["evaluator"] for r in rows} == {"loss", "acc"} and len(rows) == 11
    assert all(name.split(".")[0] == r["evaluator"] for r in rows for name in r["metrics"])
    assert checkpoints.best(rows)["acc.acc"]["relpath"] == "step-4.pt"


def test_trackers_get_the_first_evaluators_metrics_as_named_and_the_others_qualified() -> None:
    from assayer import deliveries

    spec = watches.WatchSpec("run", "/x", "", evaluators=[watches.Evaluator("loss", "a.py:loss"),
                                                          watches.Evaluator("mmlu", "b.py:run", "gpu")])
    base = {"watch": "run", "checkpoint": "/x/step-1.pt", "version": "v", "step": 1, "job_id": "j",
            "finished_at": "2026-12-02T00:00:00+00:00", "evaluator_ref": "a.py:loss"}
    first = deliveries.delivery_for(deliveries.Item("run", "mlflow", "j"),
                                    {**base, "evaluator": "loss", "metrics": {"loss": 0.5}}, spec)  # type: ignore[typeddict-item]
    other = deliveries.delivery_for(deliveries.Item("run", "mlflow", "k"),
                                    {**base, "evaluator": "mmlu", "metrics": {"acc": 0.7}}, spec)  # type: ignore[typeddict-item]
    assert first.metrics == {"loss": 0.5} and other.metrics == {"mmlu.acc": 0.7} and other.evaluator == "mmlu"


def test_an_evaluator_added_to_a_running_watch_backfills_unless_opted_out(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, ckpts, suite = tmp_path / "runs.jsonl", tmp_path / "ckpts", tmp_path / "suite"
    loss = write_evaluator(suite, "loss", "loss")
    add(conn, settings, ckpts, [loss])
    env = {"SUITE_LOG": str(log)}
    workers.start("watch", env)
    workers.start("eval", env)
    for i in range(2):
        (ckpts / f"step-{i + 1}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: len(finals_by(conn)) == 2, 30, what="both checkpoints by loss")

    acc = write_evaluator(suite, "acc", "acc")
    out = invoke(settings, "watch", "add", str(ckpts), "--name", "run", "-e", loss, "-e", acc)
    assert out.returncode == 0 and "watch run updated" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: len(finals_by(conn)) == 4, 30, what="acc backfilled on both")
    (ckpts / "step-3.pt").write_bytes(torch_bytes(3))
    wait_for(lambda: len(finals_by(conn)) == 6, 30, what="step-3 by both")

    # A third evaluator with --no-backfill: only new checkpoints get it.
    extra = write_evaluator(suite, "extra", "extra")
    out = invoke(settings, "watch", "add", str(ckpts), "--name", "run", "-e", loss, "-e", acc, "-e", extra,
                 "--no-backfill")
    assert out.returncode == 0, out.stderr
    (ckpts / "step-4.pt").write_bytes(torch_bytes(4))
    wait_for(lambda: len(finals_by(conn)) == 9, 30, what="step-4 by all three")
    wait_for_scans(conn, "run", 3)
    wait_for(lambda: settled(conn, settings), 20, what="nothing left queued")
    assert sorted(p for (e, p, _) in finals_by(conn) if e == "extra") == ["step-4.pt"]
    # ... and on request, exactly the missing ones (`assayer evaluate --evaluator`).
    out = invoke(settings, "evaluate", "--watch", "run", "--evaluator", "extra")
    assert out.returncode == 0 and "queued 3 evaluation(s)" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: len(finals_by(conn)) == 12, 30, what="extra on the first three")
    assert invoke(settings, "evaluate", "--watch", "run", "--evaluator", "extra").stdout.startswith("queued 0")
    assert all(count == 1 for count in runs(log).values()) and sum(runs(log).values()) == 12


def test_with_30_backfill_jobs_queued_a_new_checkpoint_is_evaluated_next(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, marker, ckpts, suite = tmp_path / "runs.jsonl", tmp_path / "started", tmp_path / "ckpts", tmp_path / "suite"
    ckpts.mkdir()
    old = time.time() - 3600
    for i in range(30):
        path = ckpts / f"step-{i + 1}.pt"
        path.write_bytes(torch_bytes(i, size=100))
        os.utime(path, (old, old))
    add(conn, settings, ckpts, [write_evaluator(suite, "loss", "loss")])
    out = invoke(settings, "evaluate", "--watch", "run")  # the 30 already there: backfill work
    assert "queued 30 evaluation(s)" in out.stdout, out.stdout + out.stderr
    backfill_queue = pools.queue(settings, pools.DEFAULT, backfill=True)
    assert conn.llen(queue_key(backfill_queue)) == 30
    env = {"SUITE_LOG": str(log), "SUITE_MARKER": str(marker)}
    workers.start("watch", env)
    (ckpts / "step-100.pt").write_bytes(torch_bytes(100))
    wait_for(lambda: conn.llen(queue_key(pools.queue(settings, pools.DEFAULT))) == 1, 20,
             what="the new checkpoint queued as new work")
    workers.start("eval", env)
    wait_for(lambda: len(finals_by(conn)) == 31, 90, what="all 31 evaluated")
    started = [json.loads(line)["path"] for line in marker.read_text().splitlines()]
    assert started[0] == "step-100.pt" and len(started) == 31
    # Backfill in the watch's order (newest first by default).
    assert started[1:4] == ["step-30.pt", "step-29.pt", "step-28.pt"], started


def test_a_gpu_pool_evaluator_never_runs_on_a_default_pool_worker(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, ckpts, suite = tmp_path / "runs.jsonl", tmp_path / "ckpts", tmp_path / "suite"
    refs = [write_evaluator(suite, "loss", "loss"), write_evaluator(suite, "mmlu", "mmlu")]
    add(conn, settings, ckpts, refs, pools=["mmlu=gpu"])
    env = {"SUITE_LOG": str(log)}
    workers.start("watch", env)
    cpu = workers.start("eval", env)
    for i in range(3):
        (ckpts / f"step-{i + 1}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: len(finals_by(conn)) == 3, 30, what="loss on the default-pool worker")
    gpu_queue = queue_key(pools.queue(settings, "gpu"))
    wait_for(lambda: conn.llen(gpu_queue) == 3, 10, what="mmlu's jobs waiting in the gpu queue")
    (default,) = [w for w in Worker.all(connection=conn) if w.pid == cpu.pid]
    # rq writes the state into the worker's hash (get_state() is what this copy read when it was fetched)
    wait_for(lambda: conn.hget(default.key, "state") == b"idle", 10, what="the default worker back at its empty queues")
    assert not any("gpu" in q for q in default.queue_names())  # it never even looks at the gpu queue
    assert conn.llen(gpu_queue) == 3 and {e for (e, _, _) in finals_by(conn)} == {"loss"}
    gpu = workers.start("eval", env | {"ASSAYER_POOLS": "gpu"})
    wait_for(lambda: len(finals_by(conn)) == 6, 30, what="mmlu on the gpu worker")
    for rec in final_results(conn, "run"):
        owner = gpu if rec["evaluator"] == "mmlu" else cpu
        assert rec["worker"].split("-")[-2] == str(owner.pid), rec
        assert rec["pool"] == ("gpu" if rec["evaluator"] == "mmlu" else "default")
    status = json.loads(invoke(settings, "status", "--format", "json").stdout)
    assert {q["name"] for q in status["queues"]} >= {pools.queue(settings, "gpu"), pools.queue(settings, "gpu", True)}


@pytest.mark.slow
def test_kill_9_during_a_backfill_loses_nothing_and_duplicates_nothing(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, marker, ckpts, suite = tmp_path / "runs.jsonl", tmp_path / "started", tmp_path / "ckpts", tmp_path / "suite"
    loss = write_evaluator(suite, "loss", "loss")
    add(conn, settings, ckpts, [loss])
    env = {"SUITE_LOG": str(log), "SUITE_MARKER": str(marker)}
    watch = workers.start("watch", env)
    first = workers.start("eval", env)
    for i in range(6):
        (ckpts / f"step-{i + 1}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: len(finals_by(conn)) == 6, 40, what="6 checkpoints by loss")
    workers.kill9(first)

    acc = write_evaluator(suite, "acc", "acc")
    add(conn, settings, ckpts, [loss, acc])  # acc added: 6 backfill evaluations
    slow = workers.start("eval", env | {"SUITE_SECONDS": "1.5"})
    wait_for(lambda: sum(1 for line in marker.read_text().splitlines() if '"acc"' in line) >= 3, 40,
             what="the backfill under way")
    workers.kill9(slow)  # mid-evaluation of a backfill job
    workers.kill9(watch)  # and the watch worker that queued them
    workers.start("watch", env)  # a cold watch worker backfills again: the ledger queues nothing twice
    workers.start("eval", env)
    wait_for(lambda: len(finals_by(conn)) == 12, 60, what="acc on all 6 checkpoints")
    wait_for_scans(conn, "run", 3)
    wait_for(lambda: settled(conn, settings), 30, what="nothing left queued")
    finals = finals_by(conn)
    assert len(finals) == 12 and all(count == 1 for count in finals.values()), finals
    assert sorted(p for (e, p, _) in finals if e == "acc") == [f"step-{i}.pt" for i in range(1, 7)]
    done = runs(log)
    assert all(count == 1 for count in done.values()), done  # the killed attempt never completed; no run twice
    lost = [r for r in final_results(conn, "run") if r["evaluator"] == "acc" and r["attempt"] > 1]
    assert lost, "the killed evaluation was retried (its lost attempt recorded)"


def test_every_n_evaluates_multiples_and_the_newest_once_no_newer_came(settings: Settings, conn: redis.Redis) -> None:
    import dataclasses

    from assayer import jobs
    from assayer.scan import Candidate

    rt = jobs.Runtime(dataclasses.replace(settings, newest_after=30), conn)
    spec = watches.WatchSpec("run", "/x", "e.py:f", every=10)

    def cand(step: int) -> Candidate:
        return Candidate(f"/x/step-{step}.pt", f"step-{step}.pt", f"v{step}", step)

    def kept(steps: list[int], now: float) -> list[int | None]:
        return [c.step for c in jobs._every(rt, spec, [cand(s) for s in steps], now)]

    assert kept([5, 10, 15], 1000) == [10]  # 15 is the newest: held back
    assert kept([], 1020) == []
    assert kept([], 1031) == [15]  # still the newest 30 s later: the run's last checkpoint
    assert kept([], 1100) == []  # once
    assert kept([20, 25], 1200) == [20]
    assert kept([30], 1210) == [30]  # a newer one came: 25 is skipped for good
    assert kept([], 1300) == []
    assert kept([31], 1400) == [] and kept([], 1431) == [31]


def test_an_evaluator_version_the_watch_side_cannot_read_never_requeues_nor_backfills(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """A watch worker without the evaluators mounted reads no version: that must not re-evaluate anything."""
    from assayer import ledger
    from assayer.evaluator import UNKNOWN_VERSION

    ckpts, suite = tmp_path / "ckpts", tmp_path / "suite"
    spec = add(conn, settings, ckpts, [write_evaluator(suite, "loss", "loss")])
    (ckpts / "step-1.pt").write_bytes(torch_bytes(1))
    ready = spec.scanner(settings).scan(time.time() + 60).ready
    assert len(ledger.enqueue_new(conn, settings, spec, ready)) == 1  # at the readable version
    blind = {"loss": UNKNOWN_VERSION}
    assert ledger.enqueue_new(conn, settings, spec, ready, current=blind) == []
    assert ledger.backfill(conn, settings, spec, current=blind) == []
    (ckpts / "step-2.pt").write_bytes(torch_bytes(2))
    fresh = [c for c in spec.scanner(settings).scan(time.time() + 60).ready if c.relpath == "step-2.pt"]
    assert len(ledger.enqueue_new(conn, settings, spec, fresh, current=blind)) == 1  # a new checkpoint still is
