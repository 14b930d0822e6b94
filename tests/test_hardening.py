"""Faults and hostile input, each with real processes: evaluators that misbehave, names, regexes, links."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from pathlib import Path

import pytest
import redis
from harness import Workers, add_watch, attempts, final_results, hash_json, invoke, quiet, wait_for
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from writers import torch_bytes

from assayer import keys, rq_internals
from assayer.rq_internals import queue_key
from assayer.settings import Settings
from assayer.workers import WatchWorker


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def test_an_evaluator_that_forks_then_dies_is_reported_as_dead_at_once_and_its_orphan_killed(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, orphans = tmp_path / "ckpts", tmp_path / "orphans"
    add_watch(conn, settings, ckpts, "fork_then_die")
    workers.settings = dataclasses.replace(settings, retries=0, eval_timeout=120)
    workers.start("watch")
    workers.start("eval", {"ORPHAN_PIDS": str(orphans)})
    (ckpts / "a.pt").write_bytes(torch_bytes())
    started = time.monotonic()
    rec = wait_for(lambda: final_results(conn, "run"), 30, what="a result while the orphan still lives")[0]
    assert time.monotonic() - started < 30  # not the 120 s timeout, not the orphan's hour
    assert rec["status"] == "failed" and "exited with code 7" in rec["error"] and "timed out" not in rec["error"]
    orphan = int(orphans.read_text().split()[0])
    wait_for(lambda: not alive(orphan), 10, what="the orphan to be killed with its process group")


def test_an_evaluator_returning_none_fails_with_a_clear_message(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "returns_none")
    workers.settings = dataclasses.replace(settings, retries=0)
    workers.start("watch")
    workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 20, what="a result")[0]
    assert rec["status"] == "failed" and "returned None" in rec["error"] and "forgotten `return`" in rec["error"]


def test_a_failed_attempt_is_retried_in_a_fresh_evaluator_process(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, "breaks_its_process_once")
    workers.settings = dataclasses.replace(settings, retries=1)
    workers.start("watch")
    workers.start("eval", {"FLAKY_DIR": str(tmp_path)})
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 30, what="a final result")[0]
    assert rec["status"] == "ok" and rec["attempt"] == 2, attempts(conn, rec["job_id"])
    (ckpts / "b.pt").write_bytes(torch_bytes(1))  # later checkpoints are not failed by the broken process either
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="b evaluated")
    assert all(r["status"] == "ok" for r in final_results(conn, "run"))


def test_evaluator_processes_are_recycled_after_max_calls_and_above_max_rss(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    calls, memory = tmp_path / "calls", tmp_path / "memory"
    add_watch(conn, settings, calls, "record", name="calls")
    add_watch(conn, settings, memory, "holds_memory", name="memory")
    workers.start("watch")
    workers.start("eval", {"ASSAYER_EVAL_MAX_CALLS": "2", "ASSAYER_EVAL_MAX_RSS": "100", "HOLD_MIB": "45"})

    def results_are(watch: str, count: int) -> bool:
        return len(final_results(conn, watch)) == count

    for i in range(4):
        (calls / f"{i}.pt").write_bytes(torch_bytes(i))
        wait_for(functools.partial(results_are, "calls", i + 1), 20, what=f"calls checkpoint {i}")
    for i in range(3):  # the process itself is about 20 MiB; each checkpoint keeps 45 MiB more
        (memory / f"{i}.pt").write_bytes(torch_bytes(i))
        wait_for(functools.partial(results_are, "memory", i + 1), 20, what=f"memory checkpoint {i}")
    by_pid: dict[object, int] = {}
    for rec in final_results(conn, "calls"):
        by_pid[rec["metrics"]["pid"]] = by_pid.get(rec["metrics"]["pid"], 0) + 1
    assert sorted(by_pid.values()) == [2, 2]  # two checkpoints per process (ASSAYER_EVAL_MAX_CALLS=2)
    pids = [r["metrics"]["pid"] for r in sorted(final_results(conn, "memory"), key=lambda r: r["relpath"])]
    assert pids[0] == pids[1] != pids[2]  # ~65 MiB after one checkpoint is kept, ~110 MiB after two is not


def test_a_catastrophic_regex_neither_hangs_watch_add_nor_starves_the_other_watches(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:

    from harness import env_for, evaluator_ref, run_assayer

    hostile, other = tmp_path / "hostile", tmp_path / "other"
    deep = hostile / ("a" * 200) / ("a" * 200)
    deep.mkdir(parents=True)
    for i in range(200):
        (deep / ("a" * 150 + f"{i:03d}b")).write_bytes(b"x")
    started = time.monotonic()
    out = run_assayer(["watch", "add", str(hostile), "-e", evaluator_ref("record"), "--regex", "(a+)+$",
                       "--eval-existing", "--name", "hostile"], env_for(settings), timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30  # Python's re would backtrack for ages on each of these paths
    add_watch(conn, settings, other, name="other")
    workers.start("watch")
    workers.start("eval")
    (other / "a.pt").write_bytes(torch_bytes())
    wait_for(lambda: final_results(conn, "other"), 10, what="the other watch's checkpoint evaluated")


@pytest.mark.slow
def test_workers_register_again_after_redis_lost_their_keys_and_show_their_job(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    from assayer import status

    ckpts, marker = tmp_path / "ckpts", tmp_path / "started"
    add_watch(conn, settings, ckpts, "slow")
    workers.start("watch")
    workers.start("eval", {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "8"})
    (ckpts / "a.pt").write_bytes(torch_bytes())
    wait_for(marker.exists, 20, what="the evaluation to start")
    conn.flushall()  # Redis lost its data (no AOF, or wiped) while both workers are alive and one is busy
    listed = wait_for(lambda: [w for w in status.collect(conn, settings)["workers"]] if len(
        status.collect(conn, settings)["workers"]) == 2 else None, 10, what="both workers listed again")
    busy = [w for w in listed if w["state"] == "busy"]
    assert len(busy) == 1 and busy[0]["job"] and busy[0]["queues"] == ["assayer-eval", "assayer-eval-backfill"]


def test_a_worker_killed_with_9_leaves_status_within_the_lease(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    from assayer import status

    ckpts = tmp_path / "ckpts"
    for d in range(300):  # a large cold tree: its first scan takes a while, so the kill lands mid-scan
        (ckpts / f"d{d}").mkdir(parents=True)
        for f in range(60):
            (ckpts / f"d{d}" / f"{f}.bin").write_bytes(b"x")
    add_watch(conn, settings, ckpts, regex=r"\.pt$")
    doomed = workers.start("watch", {"ASSAYER_INOTIFY": "false"})
    workers.start("eval")  # the survivor that sweeps
    wait_for(lambda: any(w["state"] == "busy" for w in status.collect(conn, settings)["workers"]
                         if w["queues"] == ["assayer-watch"]) or conn.hget(keys.watch_state("run"), "last_scan"), 20,
             what="the first scan to start")
    workers.kill9(doomed)
    started = time.monotonic()
    wait_for(lambda: [w for w in status.collect(conn, settings)["workers"] if w["queues"] == ["assayer-watch"]] == [],
             3 * settings.lease_ttl, what="the dead watch worker to leave status")
    assert time.monotonic() - started <= 3 * settings.lease_ttl
    wait_for(lambda: status.collect(conn, settings)["queues"][0]["running"] == 0, 3 * settings.lease_ttl,
             what="its scan to leave the running jobs")


def test_a_full_results_directory_never_fails_an_evaluation_is_shown_and_catches_up(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    import json

    from assayer import status

    ckpts, results_dir = tmp_path / "ckpts", settings.results_path
    results_dir.mkdir(parents=True)
    copy = results_dir / "run.jsonl"
    copy.symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    workers.start("eval")
    for i in range(2):
        (ckpts / f"{i}.pt").write_bytes(torch_bytes(i))
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="both evaluated")
    assert all(r["status"] == "ok" and r["attempt"] == 1 for r in final_results(conn, "run"))
    info = wait_for(lambda: status.collect(conn, settings)["watches"][0]["results_copy"], 5, what="status to say so")
    assert "2 result line(s) not yet in the file" in info and "No space left on device" in info
    assert "results file behind" in status.render(status.collect(conn, settings))
    copy.unlink()  # space again
    wait_for(lambda: copy.exists() and len(copy.read_text().splitlines()) == 2, 10, what="the copy to catch up")
    # the lines land in the file a moment before the worker clears the note in Redis
    wait_for(lambda: status.collect(conn, settings)["watches"][0]["results_copy"] is None, 10,
             what="status to drop the note")
    assert len(copy.read_text().splitlines()) == 2
    copy.unlink()  # lost altogether: rebuilt from Redis on request
    out = invoke(settings, "results", "--export")
    assert out.returncode == 0 and "2 result line(s) from Redis" in out.stdout, out.stderr
    assert sorted(json.loads(line)["relpath"] for line in copy.read_text().splitlines()) == ["0.pt", "1.pt"]


def test_workers_run_only_assayers_job_functions(conn: redis.Redis, settings: Settings, workers: Workers,
                                                 tmp_path: Path) -> None:
    from rq import Queue

    proof = tmp_path / "pwned"
    workers.start("eval")
    workers.start("watch")
    for name in (settings.eval_queue, settings.watch_queue):  # anyone who can write to Redis can enqueue this
        Queue(name, connection=conn, serializer="json").enqueue("os.system", f"touch {proof}")
    failed = [FailedJobRegistry(name, connection=conn).key for name in (settings.eval_queue, settings.watch_queue)]
    wait_for(lambda: [conn.zcard(key) for key in failed] == [1, 1], 15, what="both jobs failed unrun")
    assert not proof.exists()  # os.system would have touched it before its job could end
    assert "refused: eval workers run only assayer.jobs.evaluate" in workers.logs()


def test_evaluators_outside_the_allowed_roots_are_refused_at_add_and_in_the_worker(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    from harness import EVALUATORS, env_for

    from assayer import watches

    allowed = dataclasses.replace(settings, evaluator_paths=(str(EVALUATORS.parent),))
    env = env_for(allowed) | {"ASSAYER_EVALUATOR_PATHS": str(EVALUATORS.parent)}
    outside = tmp_path / "elsewhere.py"
    outside.write_text("def evaluate(path):\n    return {'ran': 1}\n")
    for ref in (f"{outside}:evaluate", "os:system"):
        out = invoke(allowed, "watch", "add", str(tmp_path / "run"), "-e", ref, env=env)
        assert out.returncode == 2 and "outside the allowed evaluator roots" in out.stderr and "fix:" in out.stderr
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)  # allowed: tests/evaluators.py
    spec = watches.get(conn, "run")
    assert spec is not None
    spec.evaluators = [watches.Evaluator("evaluate", f"{outside}:evaluate")]  # rewritten in Redis by someone who can
    spec.evaluator = spec.evaluators[0].ref
    conn.hset(keys.WATCHES, "run", spec.to_json())
    workers.start("watch", {"ASSAYER_EVALUATOR_PATHS": str(EVALUATORS.parent)})
    workers.start("eval", {"ASSAYER_EVALUATOR_PATHS": str(EVALUATORS.parent)})
    (ckpts / "a.pt").write_bytes(torch_bytes())
    rec = wait_for(lambda: final_results(conn, "run"), 20, what="a result")[0]
    assert rec["status"] == "failed" and "outside the allowed evaluator roots" in rec["error"]
    assert rec["metrics"] == {} and len(attempts(conn, rec["job_id"])) == 1
    assert hash_json(conn, keys.WATCHES, "run")["evaluator"].endswith("elsewhere.py:evaluate")


def test_links_out_of_the_watched_tree_are_not_followed_unless_asked(tmp_path: Path) -> None:
    from assayer.scan import Scanner

    secret, run = tmp_path / "secret", tmp_path / "run"
    (secret / "dir").mkdir(parents=True)
    (secret / "passwd").write_bytes(b"root:x:0:0\n" * 20)
    (secret / "dir" / "model.pt").write_bytes(torch_bytes())
    run.mkdir()
    (run / "steal.pt").symlink_to(secret / "passwd")
    (run / "linked").symlink_to(secret / "dir")
    (run / "real.pt").write_bytes(torch_bytes(1))
    (run / "alias.pt").symlink_to(run / "real.pt")  # a link inside the tree is fine
    later = time.time() + 3600
    assert {c.relpath for c in Scanner(str(run)).scan(later).ready} == {"real.pt", "alias.pt"}
    followed = {c.relpath for c in Scanner(str(run), follow_symlinks=True).scan(later).ready}
    assert followed == {"real.pt", "alias.pt", "steal.pt", "linked/model.pt"}


def test_files_that_never_complete_are_listed_as_stalled_with_their_age(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    from assayer import status

    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)
    workers.start("watch", {"ASSAYER_STALL_AFTER": "60"})
    data = torch_bytes()
    (ckpts / "truncated.pt").write_bytes(data[: len(data) // 2])
    (ckpts / "empty.pt").write_bytes(b"")
    (ckpts / "fresh.pt").write_bytes(data[:100])
    old = time.time() - 3 * 3600
    for name in ("truncated.pt", "empty.pt"):
        os.utime(ckpts / name, (old, old))
    info = wait_for(lambda: status.collect(conn, settings)["watches"][0]["stalled"], 10, what="stalled files in status")
    assert "truncated.pt (still being written, unchanged for 3.0 h)" in info and "empty.pt" in info
    assert "fresh.pt" not in info
    assert "stalled: " in status.render(status.collect(conn, settings))


@pytest.mark.slow
def test_redis_that_lost_its_data_is_detected_and_restore_evaluates_exactly_what_never_finished(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    import json

    from harness import CliResult, evaluator_ref, results_by_path

    from assayer import status

    def cli(*args: str) -> CliResult:
        return invoke(settings, *args)

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    assert cli("watch", "add", str(ckpts), "-e", evaluator_ref("record"), "--name", "run").returncode == 0
    workers.start("watch")
    evaluator = workers.start("eval")
    for name in ("a.pt", "b.pt"):
        (ckpts / name).write_bytes(torch_bytes(len(name)))
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="a and b evaluated")
    # and in the results files: a result is stored in Redis first, its file line just after
    results_file = settings.results_path / "run.jsonl"
    wait_for(lambda: results_file.exists() and len(results_file.read_text().splitlines()) == 2, 10,
             what="a and b in the results file")
    workers.kill9(evaluator)
    (ckpts / "c.pt").write_bytes(torch_bytes(3))  # queued; its evaluation never happens before the loss
    mirrored = settings.results_path / "run.ledger.json"
    bystander = workers.start("eval", {"ASSAYER_EVAL_QUEUE": "elsewhere"})  # mirrors, never takes c's job
    wait_for(lambda: mirrored.exists() and "c.pt" in json.loads(mirrored.read_text()), 20,
             what="the ledger mirrored with c.pt")
    assert conn.llen(queue_key(settings.eval_queue)) == 1
    conn.flushall()  # Redis lost everything: no AOF
    (ckpts / "d.pt").write_bytes(torch_bytes(4))  # written while Redis knows nothing
    lost = wait_for(lambda: status.collect(conn, settings)["data_lost"], 20, what="status to say Redis lost data")
    assert "assayer restore" in lost and "run" in lost
    again = cli("watch", "add", str(ckpts), "-e", evaluator_ref("record"), "--name", "run")
    assert again.returncode == 2 and "assayer restore" in again.stderr, again.stderr  # no silent baseline
    out = cli("restore")
    assert out.returncode == 0 and "1 unfinished evaluation(s) queued again" in out.stdout, out.stderr
    workers.kill9(bystander)
    workers.start("eval")
    wait_for(lambda: len(final_results(conn, "run")) == 4, 30, what="c and d evaluated after the restore")
    quiet(conn)
    got = results_by_path(conn)
    assert sorted(got) == ["a.pt", "b.pt", "c.pt", "d.pt"] and all(len(v) == 1 for v in got.values())
    assert status.collect(conn, settings)["data_lost"] is None


@pytest.mark.slow
def test_kill_9_and_a_redis_restart_lose_no_pending_retry_and_no_backlogged_result_line(tmp_path: Path) -> None:
    """The new Redis state (failing attempts, the results-file backlog, the epoch) survives both, and nothing doubles."""
    import json

    from harness import RedisServer, results_by_path

    from assayer import status

    server = RedisServer(tmp_path / "redis")
    settings = Settings(redis_url=server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.5,
                        retry_backoff=(6,), lease_ttl=4, heartbeat_interval=1.0, reap_interval=0.5)
    conn = redis.Redis.from_url(server.url)
    (tmp_path / "logs").mkdir()
    w = Workers(settings, tmp_path / "logs")
    try:
        ckpts, copy = tmp_path / "ckpts", settings.results_path / "run.jsonl"
        copy.parent.mkdir(parents=True)
        copy.symlink_to("/dev/full")  # the copy falls behind: lines wait in Redis
        add_watch(conn, settings, ckpts, "flaky")  # first attempt of each raises assayer.Retry
        w.start("watch")
        first = w.start("eval", {"FLAKY_DIR": str(tmp_path)})
        for name in ("a.pt", "b.pt"):
            (ckpts / name).write_bytes(torch_bytes(len(name) + ord(name[0])))
        # Both retries scheduled and both jobs out of the started registry: rq is done with both, so the kill lands
        # on an idle worker (rq writes a retry's schedule before the rest of its bookkeeping; a kill in between is
        # test_failures.py::test_a_worker_killed_after_storing_a_failed_attempt_leaves_that_attempt_once).
        scheduled = ScheduledJobRegistry(settings.eval_queue, connection=conn).key
        started = StartedJobRegistry(settings.eval_queue, connection=conn).key
        wait_for(lambda: conn.hlen(keys.failing("run")) == 2 and conn.llen(keys.copy_backlog("run")) == 2
                 and conn.zcard(scheduled) == 2 and conn.zcard(started) == 0, 20,
                 what="two attempts failing, two lines backlogged, two retries scheduled, none started")
        w.kill9(first)
        server.restart()  # AOF: the failing attempts, the backlog, the scheduled retries and the epoch come back
        conn = redis.Redis.from_url(server.url)
        assert conn.hlen(keys.failing("run")) == 2 and conn.llen(keys.copy_backlog("run")) == 2
        copy.unlink()  # writable again
        w.start("eval", {"FLAKY_DIR": str(tmp_path)})
        wait_for(lambda: len(final_results(conn, "run")) == 2, 40, what="both retried to a final result")
        # the copy lock is a flock: the kernel released the killed worker's at once
        wait_for(lambda: copy.exists() and len(copy.read_text().splitlines()) == 4, 30, what="the copy caught up")
        quiet(conn)
        got = results_by_path(conn)
        assert sorted(got) == ["a.pt", "b.pt"] and all(len(v) == 1 and v[0]["attempt"] == 2 for v in got.values())
        lines = [json.loads(line) for line in copy.read_text().splitlines()]
        assert sorted((r["relpath"], r["attempt"]) for r in lines) == [("a.pt", 1), ("a.pt", 2), ("b.pt", 1), ("b.pt", 2)]
        assert conn.hlen(keys.failing("run")) == 0 and not conn.exists(keys.copy_backlog("run"))
        assert status.collect(conn, settings)["data_lost"] is None  # the epoch survived: no false alarm
    except BaseException:
        print(w.logs())
        raise
    finally:
        w.kill_all()
        server.stop()


def test_a_worker_reports_health_only_once_rq_has_registered_it(conn: redis.Redis, settings: Settings) -> None:
    # `assayer up` and the test harness take a health key for "registered and working" (status counts rq's
    # registry); a ticker that beat rq's register_birth also registered the worker itself, and rq's own
    # register_birth then refused to start: "There exists an active worker named ...".
    class Ticks(threading.Event):
        """The worker's registration event, counting the ticks the ticker waited on it."""

        count = 0

        def wait(self, timeout: float | None = None) -> bool:
            self.count += 1
            return super().wait(timeout)

    worker = WatchWorker(dataclasses.replace(settings, inotify=False), conn)
    health = keys.health("watch", worker.host, os.getpid())
    ticks = worker._registered = Ticks()
    ticker = threading.Thread(target=worker._run_ticker, daemon=True)
    ticker.start()
    try:
        wait_for(lambda: ticks.count > 10, 10, what="ten ticks before work() registered the worker")
        assert not conn.exists(health) and not rq_internals.registered(conn, worker)
        worker.register_birth()  # what rq's work() does first: it raises if the worker is registered already
        wait_for(lambda: conn.exists(health), 10, what="the health key once the worker is registered")
        assert rq_internals.registered(conn, worker)
    finally:
        worker._ticker_stop.set()
        ticker.join(10)
        assert not ticker.is_alive()
