"""Races between Assayer and the world around it: a rotation deleting a checkpoint, a kill -9 between two
writes, a Redis restart under pending deliveries. Each test reproduces the window itself, not a timing."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harness import (
    RedisServer,
    Workers,
    add_watch,
    built_once,
    final_results,
    quiet,
    results_by_path,
    run_cli,
    settled,
    tcp_ends,
    wait_for,
)
from trackers import tensorboard_scalars
from writers import torch_bytes, train_hf, write_atomically

from assayer import keys, records, results
from assayer.scan import Candidate, Scanner, ScanReport
from assayer.settings import Settings
from assayer.watches import Report

# -- a checkpoint directory being deleted (the trainer's rotation) -----------------------------------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Trainer run test_layouts builds (the same name and arguments: built once per test run)."""
    return built_once(tmp_path_factory, "hf", lambda root: train_hf(root / "out", max_steps=12, save_steps=4,
                                                                    save_total_limit=2)) / "out"


def scan_later(scanner: Scanner, seconds: float = 3600) -> ScanReport:
    """Scan as if long after the last change (past every quiet and settle time)."""
    return scanner.scan(time.time() + seconds)


def found(report: ScanReport) -> dict[str, Candidate]:
    return {c.relpath: c for c in report.ready}


def hand_over(scanner: Scanner) -> dict[str, Candidate]:
    ready = found(scan_later(scanner))
    for c in ready.values():
        scanner.mark_done(c.relpath, c.version)
    return ready


KEPT_LAST = ("model.safetensors", "trainer_state.json")
"""What a Trainer checkpoint needs to be complete: an rmtree that reaches these last leaves a complete
checkpoint behind at every step before them (os.scandir's order, which rmtree follows, is the
directory's own)."""


def deletion_order(directory: Path) -> list[str]:
    return sorted(os.listdir(directory), key=lambda n: (n in KEPT_LAST, n))


def test_a_trainer_checkpoint_deleted_one_file_at_a_time_is_never_handed_over_again(hf_run: Path,
                                                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(hf_run / "checkpoint-8", run / "checkpoint-8")
    scanner = Scanner(str(run))
    assert list(hand_over(scanner)) == ["checkpoint-8"]
    for name in deletion_order(run / "checkpoint-8"):
        (run / "checkpoint-8" / name).unlink()  # rmtree, pausing longer than the quiet time between unlinks
        report = scan_later(scanner)
        assert report.ready == [], f"with {name} deleted, what is left was handed over as a new version"
        assert report.pending == [] and report.errors == []
    (run / "checkpoint-8").rmdir()
    assert scan_later(scanner).files == 0  # gone: forgotten


def test_a_marker_deleted_first_does_not_turn_the_rest_into_loose_checkpoints(tmp_path: Path) -> None:
    snap = tmp_path / "exp" / "snap"
    snap.mkdir(parents=True)
    (snap / "weights.pt").write_bytes(torch_bytes(1))
    (snap / "COMMITTED").touch()
    scanner = Scanner(str(tmp_path))
    assert [c.layout for c in hand_over(scanner).values()] == ["marker"]
    (snap / "COMMITTED").unlink()  # without its marker, a plain folder holding a .pt file
    assert scan_later(scanner).ready == []
    (snap / "weights.pt").unlink()
    snap.rmdir()
    assert scan_later(scanner).files == 0


@pytest.mark.parametrize("change", ["a member rewritten", "a member added", "saved again under the same name"])
def test_a_checkpoint_changed_while_it_loses_files_is_a_new_version(hf_run: Path, tmp_path: Path, change: str) -> None:
    ckpt = tmp_path / "run" / "checkpoint-8"
    shutil.copytree(hf_run / "checkpoint-8", ckpt)
    scanner = Scanner(str(tmp_path / "run"))
    first = hand_over(scanner)["checkpoint-8"]
    (ckpt / "optimizer.pt").unlink()
    assert scan_later(scanner).ready == []
    if change == "a member rewritten":
        (ckpt / "trainer_state.json").write_text((ckpt / "trainer_state.json").read_text() + "\n")
    elif change == "a member added":
        (ckpt / "adapter_config.json").write_text("{}")
    else:  # the rest deleted, the directory kept, and the same step saved into it again
        for name in os.listdir(ckpt):
            (ckpt / name).unlink()
        assert scan_later(scanner).ready == []
        for name in os.listdir(hf_run / "checkpoint-8"):
            shutil.copy(hf_run / "checkpoint-8" / name, ckpt / name)
    scanner.force_full()  # a rewrite in place leaves the directory's mtime alone: full scans catch it
    second = found(scan_later(scanner)).get("checkpoint-8")
    assert second is not None and second.version != first.version


@pytest.mark.slow
def test_a_rotation_pausing_between_unlinks_queues_nothing_twice(
    conn: redis.Redis, settings: Settings, workers: Workers, hf_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    add_watch(conn, settings, run, fn="inspect_dir")
    workers.start("watch")
    workers.start("eval")
    shutil.copytree(hf_run / "checkpoint-8", run / "tmp-checkpoint-8")
    os.rename(run / "tmp-checkpoint-8", run / "checkpoint-8")  # as Trainer saves: renamed into place
    wait_for(lambda: results_by_path(conn).get("checkpoint-8"), 30, what="checkpoint-8 evaluated")
    quiet(conn)
    pause = 2 * settings.settle  # longer than the quiet time and the settle time: every scan sees each step
    for name in deletion_order(run / "checkpoint-8"):
        (run / "checkpoint-8" / name).unlink()
        time.sleep(pause)
    (run / "checkpoint-8").rmdir()
    quiet(conn, after=settings.settle)
    got = results_by_path(conn)
    assert len(got["checkpoint-8"]) == 1, [(r["status"], r["version"], r.get("error")) for r in got["checkpoint-8"]]
    assert got["checkpoint-8"][0]["status"] == "ok"
    assert settled(conn)


# -- a kill -9 between storing a result in Redis and copying it to the results file ------------------------------


@contextlib.contextmanager
def copy_locked(settings: Settings, watch: str = "run") -> Iterator[None]:
    """Hold the results file's locks, as a slow writer would: the copy lock, and the results file itself (which
    a version without the copy lock locked). A worker storing a result then waits right after its Redis step."""
    settings.results_path.mkdir(parents=True, exist_ok=True)
    with open(results.lock_path(settings.results_path, watch), "a") as lock, \
            open(settings.results_path / f"{watch}.jsonl", "a") as copy:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(copy, fcntl.LOCK_EX)
        yield


def file_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def stored_attempts(conn: redis.Redis, watch: str = "run") -> list[str]:
    """Every attempt line Redis holds for the watch's jobs: what its results file must hold, each once."""
    return [keys.text(raw) for job in conn.hkeys(keys.results(watch))
            for raw in conn.lrange(keys.attempts(keys.text(job)), 0, -1)]


def assert_copy_is_exact(conn: redis.Redis, copy: Path) -> None:
    lines = file_lines(copy)
    assert sorted(lines) == sorted(stored_attempts(conn)), "the results file differs from Redis's attempts"
    finals = [json.loads(line) for line in lines if json.loads(line)["final"]]
    assert sorted(r["job_id"] for r in finals) == sorted(r["job_id"] for r in final_results(conn, "run"))
    assert not conn.exists(keys.copy_backlog("run")) and not conn.sismember(keys.COPY_PENDING, "run")
    assert conn.hlen(keys.failing("run")) == 0  # no phantom "worker lost" attempt after the final result


@pytest.mark.slow
def test_an_eval_worker_killed_after_storing_a_result_and_before_copying_it_loses_no_line(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, copy = tmp_path / "ckpts", settings.results_path / "run.jsonl"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    doomed = workers.start("eval")
    with copy_locked(settings):
        (ckpts / "a.pt").write_bytes(torch_bytes(1))
        wait_for(lambda: final_results(conn, "run"), 20, what="a.pt's result stored in Redis")
        workers.kill9(doomed)  # waiting for the lock: after its Redis step, before its append
        assert file_lines(copy) == []
    workers.start("eval")  # finds the line the killed worker left, and the job it left running
    wait_for(lambda: any(json.loads(line)["final"] for line in file_lines(copy)), 20,
             what="the final result's line in the results file")
    quiet(conn)  # the lost job re-run too (it finds its final result and stores nothing)
    assert [json.loads(line)["relpath"] for line in file_lines(copy)] == ["a.pt"]
    assert_copy_is_exact(conn, copy)


@pytest.mark.slow
def test_an_eval_worker_killed_after_copying_a_line_and_before_trimming_it_doubles_no_line(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, copy = tmp_path / "ckpts", settings.results_path / "run.jsonl"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    doomed = workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes(1))
    wait_for(lambda: len(file_lines(copy)) == 1, 20, what="a.pt evaluated and copied")
    with copy_locked(settings):
        (ckpts / "b.pt").write_bytes(torch_bytes(2))
        wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="b.pt's result stored in Redis")
        conn.client_pause(30_000, all=False)  # from now on writes wait (reads go on): the worker's trim will
    try:  # the lock released: the worker reads the backlog, appends b's line, and waits to trim it
        wait_for(lambda: len(file_lines(copy)) == 2, 20, what="b.pt's line appended")
        ends = tcp_ends(doomed.pid)
        workers.kill9(doomed)
        # Redis runs a paused command the moment it unpauses, even one from a client whose socket it has
        # not yet seen close: unpause only once it dropped every connection of the killed worker.
        wait_for(lambda: not ends & {c["addr"] for c in conn.client_list()}, 10,
                 what="Redis to drop the killed worker's connections")
    finally:
        conn.client_unpause()
    assert conn.llen(keys.copy_backlog("run")) == 1  # in the file and still in the backlog
    workers.start("eval")
    wait_for(lambda: not conn.exists(keys.copy_backlog("run")), 20, what="the backlog drained")
    quiet(conn)
    assert [json.loads(line)["relpath"] for line in file_lines(copy)] == ["a.pt", "b.pt"]
    assert_copy_is_exact(conn, copy)


def test_a_line_torn_by_a_crash_is_cut_not_glued_to_the_next_one(conn: redis.Redis, tmp_path: Path) -> None:
    def attempt(n: int) -> records.ResultRecord:
        rec = records.new_attempt(f"job-{n}", {"watch": "run", "checkpoint": f"/c/{n}.pt", "relpath": f"{n}.pt",
                                               "version": "v1"}, 1, "w", records.utcnow())
        return records.finish(rec, "ok", True, metrics={"n": n})

    assert results.record(conn, tmp_path, attempt(1))
    copy = tmp_path / "run.jsonl"
    whole = copy.read_bytes()
    with open(copy, "ab") as fh:
        fh.write(records.dump(attempt(2)).encode()[:40])  # a writer killed mid-line (or a disk that filled up)
    third = attempt(3)
    assert results.record(conn, tmp_path, third)
    assert copy.read_bytes() == whole + records.dump(third).encode() + b"\n"
    assert [r["job_id"] for r in results.load_files(tmp_path, "run")] == ["job-1", "job-3"]


# -- Redis killed and restarted while deliveries to trackers are pending ---------------------------------------


def crash_and_restart(server: RedisServer) -> None:
    """kill -9 the redis-server and start it again on its data directory (AOF, fsync always: nothing acknowledged
    is lost, but every client's connection breaks wherever it was)."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.start()
    with redis.Redis(port=server.port) as client:  # it answers INFO while it loads; other commands get LOADING
        wait_for(lambda: client.info("persistence")["loading"] == 0, 20, what="Redis to load its AOF")


@pytest.mark.slow
def test_redis_killed_and_restarted_while_deliveries_are_pending_delivers_each_result_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    settings = Settings(redis_url=server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.5,
                        lease_ttl=4, heartbeat_interval=1.0, reap_interval=0.5)
    conn = redis.Redis.from_url(server.url)
    (tmp_path / "logs").mkdir()
    w = Workers(settings, tmp_path / "logs")
    steps = list(range(1, 9))
    board = settings.results_path / "tensorboard" / "run"
    try:
        ckpts = tmp_path / "ckpts"
        add_watch(conn, settings, ckpts, report=Report("tensorboard"))
        board.parent.mkdir(parents=True)
        board.write_text("in the way")  # TensorBoard's directory cannot be made: every delivery fails, and waits
        w.start("eval")
        w.start("watch", {"ASSAYER_DELIVERY_LEASE": "3"})
        for step in steps:
            write_atomically(ckpts / f"model-step{step}.pt", torch_bytes(step, size=1000 + step))
        wait_for(lambda: conn.hlen(keys.delivery_errors("run")) == len(steps), 60, interval=0.2,
                 what="every result evaluated and its delivery failed once")
        board.unlink()  # the tracker is back: the deliveries go as their backoff ends
        crash_and_restart(server)
        assert conn.hlen(keys.delivered("run")) < len(steps)  # pending across the first restart
        wait_for(lambda: conn.hlen(keys.delivered("run")) > 0, 60, interval=0.01, what="a first delivery")
        crash_and_restart(server)  # again, as the deliveries are being made
        wait_for(lambda: conn.hlen(keys.delivered("run")) == len(steps), 90, interval=0.2,
                 what="every delivery after the restarts")
        points = tensorboard_scalars(board, "eval/size")
        sizes = {r["step"]: r["metrics"]["size"] for r in final_results(conn, "run")}
        assert points == [(step, sizes[step]) for step in steps]  # each result once, at its step
        assert conn.zcard(keys.DELIVER_DUE) == 0 and conn.hlen(keys.delivery_errors("run")) == 0
        assert len(results_by_path(conn)) == len(steps) and all(len(v) == 1 for v in results_by_path(conn).values())
        out = run_cli(settings, "status", "--format", "json")
        assert json.loads(out.stdout)["watches"][0]["report_to"]["tensorboard"] == {
            "delivered": len(steps), "pending": 0, "failing": 0, "last_error": None}
        assert all(p.poll() is None for p in w.procs), "a worker did not survive the Redis restarts"
    except BaseException:
        print(w.logs())
        raise
    finally:
        w.kill_all()
        server.stop()
