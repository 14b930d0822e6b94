"""Things going wrong: kill -9, Redis restarts, shutdowns mid-eval, evaluators that fail. Nothing lost, nothing twice."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import RedisServer, Workers, add_watch, attempts, burst, final_results, invoke, quiet, scan_now, wait_for
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from writers import torch_bytes, zip_bytes

from assayer import keys, watches
from assayer.rq_internals import queue_key
from assayer.settings import Settings
from assayer.workers import EvalWorker


def markers(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_kill_9_of_an_eval_worker_mid_eval_then_the_job_completes_once(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, marker = tmp_path / "ckpts", tmp_path / "started"
    add_watch(conn, settings, ckpts, "slow")
    env = {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "4"}
    workers.start("watch")
    victim = workers.start("eval", env)
    (ckpts / "a.pt").write_bytes(torch_bytes())
    wait_for(lambda: markers(marker), 20, what="the evaluation to start")
    workers.kill9(victim)
    killed_at = time.monotonic()
    workers.start("eval", env)
    rec = wait_for(lambda: final_results(conn, "run"), 60, what="the job to complete on the other worker")[0]
    retried_after = time.monotonic() - killed_at
    assert rec["status"] == "ok" and rec["attempt"] == 2
    history = attempts(conn, rec["job_id"])
    assert [a["status"] for a in history] == ["failed", "ok"] and "lost" in history[0]["error"]
    assert retried_after < settings.lease_ttl + 20  # seconds, not rq's 10-minute maintenance cycle
    quiet(conn)
    assert len(final_results(conn, "run")) == 1 and len(attempts(conn, rec["job_id"])) == 2
    assert wait_for(lambda: not _alive_evalhosts(victim.pid), 10, what="the killed worker's evaluator to exit")


class _Killed(BaseException):
    """Stands for a kill -9: raised where it lands, the worker does nothing more."""


class _KilledBeforeRqsBookkeeping(EvalWorker):
    """An eval worker killed once it has stored a failed attempt, before rq has scheduled the retry and taken
    the job out of its started registry (rq writes the retry's schedule before the rest, so a kill in there
    also leaves the job in both registries)."""

    def handle_job_failure(self, job: Any, queue: Any, started_job_registry: Any = None, exc_string: str = "") -> None:
        raise _Killed


def test_a_worker_killed_after_storing_a_failed_attempt_leaves_that_attempt_once(
    conn: redis.Redis, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep finds the job lost and retries it, but its attempt was stored: no second record of attempt 1."""
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path))  # the evaluator process inherits it
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "flaky")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    [job_id] = scan_now(conn, settings)
    burst(settings, conn, worker_class=_KilledBeforeRqsBookkeeping)  # rq logs the "kill" and the worker ends there
    assert [(a["attempt"], a["status"]) for a in attempts(conn, job_id)] == [(1, "failed")]
    started = StartedJobRegistry(settings.eval_queue, connection=conn)
    [execution] = started.get_job_and_execution_ids(cleanup=False)  # (job id, execution id): the member is "job:execution"
    conn.zadd(started.key, {":".join(execution): 1})  # its lease ran out: the next sweep finds it lost
    with caplog.at_level(logging.WARNING, logger="assayer.workers"):
        burst(settings, conn)  # sweeps first: the retry is scheduled (and run, if its 1 s backoff ended meanwhile)
    assert f"job {job_id} lost its worker" in caplog.text and conn.zcard(started.key) == 0

    def retried() -> bool:
        burst(settings, conn)  # each burst sweeps first, which queues a retry whose backoff ended
        return bool(final_results(conn, "run"))

    wait_for(retried, 20, interval=0.3, what="the retry to run once its backoff ended")
    assert [(a["attempt"], a["status"]) for a in attempts(conn, job_id)] == [(1, "failed"), (2, "ok")]
    copy = [json.loads(line) for line in (settings.results_path / "run.jsonl").read_text().splitlines()]
    assert [(r["attempt"], r["status"]) for r in copy] == [(1, "failed"), (2, "ok")]


def _alive_evalhosts(parent_pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-f", "assayer.evalhost"], capture_output=True, text=True).stdout.split()
    return [pid for pid in out if _ppid(pid) == parent_pid]


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.slow  # up to the scan lease (8 s here): the killed worker's claim on the watch must run out
def test_kill_9_of_the_watch_worker_then_watching_resumes(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "record")
    first = workers.start("watch")
    workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes(1))
    wait_for(lambda: len(final_results(conn, "run")) == 1, 20, what="a.pt evaluated")
    workers.kill9(first)
    (ckpts / "b.pt").write_bytes(torch_bytes(2))
    workers.start("watch")  # what supervisor / compose / Kubernetes do
    wait_for(lambda: len(final_results(conn, "run")) == 2, 60, what="b.pt evaluated after the restart")
    assert sorted(r["relpath"] for r in final_results(conn, "run")) == ["a.pt", "b.pt"]


def test_a_lost_scan_job_does_not_end_the_watch(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "record")
    conn.zadd(keys.DUE, {"run": time.time() + 3})  # as if a worker claimed it and died mid-scan
    workers.start("watch")
    workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    wait_for(lambda: final_results(conn, "run"), 30, what="the watch to be scanned again after the lease")


@pytest.mark.slow
def test_redis_restart_with_aof_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    settings = Settings(redis_url=server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.5,
                        retry_backoff=(1,), lease_ttl=6, heartbeat_interval=1.0, reap_interval=0.5)
    conn = redis.Redis.from_url(server.url)
    logs = tmp_path / "logs"
    logs.mkdir()
    w = Workers(settings, logs)
    try:
        ckpts = tmp_path / "ckpts"
        ckpts.mkdir()
        add_watch(conn, settings, ckpts, "slow")
        env = {"EVAL_SECONDS": "0.3"}
        w.start("watch")
        w.start("eval", env)
        w.start("eval", env)
        for i in range(10):
            (ckpts / f"a{i}.pt").write_bytes(zip_bytes(i))
        wait_for(lambda: conn.hlen(keys.results("run")) >= 3, 30, what="some results before the restart")
        server.restart()  # queued, running and finished work all in flight
        for i in range(10):
            (ckpts / f"b{i}.pt").write_bytes(zip_bytes(100 + i))
        conn = redis.Redis.from_url(server.url)
        wait_for(lambda: conn.hlen(keys.results("run")) >= 20, 90, interval=0.3, what="20 results after restart")
        quiet(conn)
        recs = final_results(conn, "run")
        assert len(recs) == 20 and len({r["relpath"] for r in recs}) == 20
        assert all(r["status"] == "ok" for r in recs)
        assert all(p.poll() is None for p in w.procs), "a worker died with the Redis restart"
    except BaseException:
        print(w.logs())
        raise
    finally:
        w.kill_all()
        server.stop()


@pytest.mark.slow
def test_shutdown_mid_eval_finishes_the_eval_keeps_the_queue_and_resumes(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, marker = tmp_path / "ckpts", tmp_path / "started"
    add_watch(conn, settings, ckpts, "slow")
    env = {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "4"}
    watch = workers.start("watch")
    ev = workers.start("eval", env)
    for i in range(3):
        (ckpts / f"{i}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: markers(marker) and conn.llen(queue_key(settings.eval_queue)) == 2, 20, what="one running, two queued")
    out = invoke(settings, "shutdown")
    assert out.returncode == 0, out.stderr
    assert ev.wait(30) == 0 and watch.wait(30) == 0  # exit 0: supervisor and compose leave them stopped
    assert len(final_results(conn, "run")) == 1  # the running one finished
    assert final_results(conn, "run")[0]["status"] == "ok"
    assert conn.llen(queue_key(settings.eval_queue)) == 2  # the queued ones stayed queued
    workers.start("eval", env)
    wait_for(lambda: len(final_results(conn, "run")) == 3, 30, what="the queued ones after restart")
    assert len(markers(marker)) == 3  # every checkpoint evaluated exactly once


def test_shutdown_purge_empties_the_queues(conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "record")
    workers.start("watch")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    wait_for(lambda: conn.llen(queue_key(settings.eval_queue)) == 1, 20, what="a queued job")
    out = invoke(settings, "shutdown", "--purge")
    assert out.returncode == 0 and "emptied" in out.stdout
    assert conn.llen(queue_key(settings.eval_queue)) == 0


def test_evaluator_that_raises_fails_at_once_with_traceback_and_is_not_retried(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "boom")
    workers.start("watch")
    workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 30, what="a final result")[0]
    assert rec["status"] == "failed" and rec["attempt"] == 1  # an exception is deterministic: not retried
    assert "RuntimeError: cannot evaluate a.pt" in rec["error"] and "raise assayer.Retry" in rec["error"]
    assert ", in boom" in rec["traceback"]  # the user's own frame, to debug from
    assert [a["status"] for a in attempts(conn, rec["job_id"])] == ["failed"]
    failed = FailedJobRegistry(settings.eval_queue, connection=conn).key
    wait_for(lambda: conn.zcard(failed) == 1, 5, what="rq-dashboard to show it as failed")
    assert conn.zcard(ScheduledJobRegistry(settings.eval_queue, connection=conn).key) == 0  # and no retry is waiting


def test_transient_failure_succeeds_on_retry(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "flaky")
    workers.start("watch")
    workers.start("eval", {"FLAKY_DIR": str(tmp_path)})
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 30, what="a final result")[0]
    assert rec["status"] == "ok" and rec["attempt"] == 2 and rec["metrics"] == {"tries": 2}


def test_non_json_result_crash_and_timeout_fail_clearly(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    for fn in ("not_json", "crash", "slow"):
        (tmp_path / fn).mkdir()
        add_watch(conn, settings, tmp_path / fn, fn, name=fn)
    fast = dataclasses.replace(settings, retries=0, eval_timeout=1.0)
    workers.settings = fast
    workers.start("watch")
    workers.start("eval", {"EVAL_SECONDS": "30"})
    for fn in ("not_json", "crash", "slow"):
        (tmp_path / fn / "a.pt").write_bytes(torch_bytes())
    got = wait_for(lambda: all(final_results(conn, f) for f in ("not_json", "crash", "slow")), 40, what="3 results")
    assert got
    errors = {f: final_results(conn, f)[0]["error"] for f in ("not_json", "crash", "slow")}
    assert "not a dict of metrics" in errors["not_json"]
    assert "exited with code 3" in errors["crash"]
    assert "timed out after 1 s" in errors["slow"]
    (tmp_path / "not_json" / "b.pt").write_bytes(torch_bytes(1))  # the worker survived all three
    wait_for(lambda: len(final_results(conn, "not_json")) == 2, 20, what="the worker to go on")


def test_evaluator_broken_after_the_watch_was_added_fails_the_job_not_the_worker(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ev = tmp_path / "ev.py"
    ev.write_text("def evaluate(path):\n    return {'ok': 1}\n")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    spec, _ = watches.build_spec(str(ckpts), f"{ev}:evaluate", name="run")
    watches.register(conn, settings, spec)
    ev.write_text("import not_a_module_anywhere\n")
    workers.settings = dataclasses.replace(settings, retries=0)
    workers.start("watch")
    proc = workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 20, what="a result")[0]
    assert rec["status"] == "failed" and "failed to import" in rec["error"] and "not_a_module_anywhere" in rec["error"]
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)
