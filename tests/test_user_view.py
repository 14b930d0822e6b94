"""What a user sees: the right best checkpoint, real steps, failures at once, what watch add leaves out."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import (
    ROOT,
    Workers,
    add_watch,
    attempts,
    burst,
    env_for,
    evaluator_ref,
    final_results,
    invoke,
    run_cli,
    wait_for,
)
from rq.registry import ScheduledJobRegistry
from writers import torch_bytes

from assayer import status
from assayer.directions import direction
from assayer.settings import Settings


@pytest.mark.parametrize(("metric", "mode", "why"), [
    ("val_mse", "min", "name: 'mse'"), ("eval/rmse", "min", "name: 'rmse'"), ("test-mae", "min", "name: 'mae'"),
    ("nll", "min", "name: 'nll'"), ("fid", "min", "name: 'fid'"), ("val_bpb", "min", "name: 'bpb'"),
    ("ppl", "min", "name: 'ppl'"), ("val_loss", "min", "name: 'loss'"), ("accuracy", "max", "name: 'accuracy'"),
    ("top1_acc", "max", "name: 'acc'"), ("pass@1", "max", "name: 'pass'"), ("loss_scale_acc", "max", "name: 'acc'"),
    ("widgets", "max", "default: no rule for this name"),
])
def test_one_direction_rule_from_the_metric_name(metric: str, mode: str, why: str) -> None:
    assert (direction(metric).mode, direction(metric).why) == (mode, why)


def test_declared_and_given_directions_win_over_the_name() -> None:
    recs = [{"directions": {"val_mse": "max"}, "finished_at": "1"}]
    assert str(direction("val_mse", recs)) == "higher is better (declared by the evaluator)"
    assert str(direction("val_mse", recs, "min")) == "lower is better (given)"


def queue_existing(settings: Settings, conn: redis.Redis, ckpts: Path, fn: str, count: int) -> None:
    """Register a watch on ``ckpts`` (files already written and settled) and queue every checkpoint, as
    ``assayer evaluate --watch run`` does: for tests of what results say, not of how files are found."""
    old = time.time() - 3600  # long settled: no wait for the settle time of an unknown format
    for path in ckpts.iterdir():
        os.utime(path, (old, old))
    add_watch(conn, settings, ckpts, fn)
    out = invoke(settings, "evaluate", "--watch", "run")
    assert out.returncode == 0 and f"queued {count} evaluation(s)" in out.stdout, out.stdout + out.stderr


def test_best_and_the_plot_agree_say_which_direction_and_steps_come_from_the_evaluator(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    from assayer import plot, results

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for i, size in enumerate((3000, 1000, 5000)):
        (ckpts / f"model_{i}.state").write_bytes(b"\x80" * size)  # names that tell no step
    queue_existing(settings, conn, ckpts, "scored", 3)
    burst(settings, conn)
    assert len(final_results(conn, "run")) == 3
    assert sorted(r["step"] for r in final_results(conn, "run")) == [0, 0, 0]  # size % 1000, reported by ctx.step
    out = invoke(settings, "results", "run", "--best", "val_mse")
    assert "best val_mse for run: 1.0 at" in out.stdout and "(lower is better (name: 'mse'))" in out.stdout
    odd = invoke(settings, "results", "run", "--best", "odd")
    assert "best odd for run: -5.0" in odd.stdout and "(lower is better (declared by the evaluator))" in odd.stdout
    recs = results.load(conn, ["run"])
    winners, _ = results.best(recs, "val_mse")
    marked = plot.best_points(plot.series(recs, "val_mse"), "val_mse", direction("val_mse", recs).mode)
    assert marked["run"][1]["job_id"] == winners["run"]["job_id"]  # one rule for the CLI and the plot


def test_a_step_metric_reported_by_the_evaluator_is_the_step(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "resnet50_best.pt").write_bytes(torch_bytes())
    queue_existing(settings, conn, ckpts, "reports_step", 1)
    burst(settings, conn)
    (rec,) = final_results(conn, "run")
    assert rec["step"] == 4242 and "_step" not in rec["metrics"]


def test_a_failed_attempt_shows_at_once_in_status_results_failed_and_show(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "a.pt").write_bytes(torch_bytes())
    settings = dataclasses.replace(settings, retry_backoff=(60,))
    queue_existing(settings, conn, ckpts, "always_retry", 1)
    burst(settings, conn)  # the first attempt fails; the retry waits 60 s
    retries = ScheduledJobRegistry(f"{settings.eval_queue}-backfill", connection=conn).key  # `evaluate`: backfill
    assert conn.zcard(retries) == 1 and final_results(conn, "run") == []
    (watch,) = status.collect(conn, settings)["watches"]
    assert watch["failing"] == 1 and watch["last_error"] == "a.pt: Retry: GPU busy for a.pt"
    table = invoke(settings, "results", "run").stdout
    assert "retrying 2/3: Retry: GPU busy for a.pt" in table and "a.pt" in table
    failed = invoke(settings, "results", "--failed").stdout
    assert "Traceback (most recent call last)" in failed and "in always_retry" in failed
    shown = invoke(settings, "show", str(ckpts / "a.pt"))
    assert shown.returncode == 0 and "attempt 1/3  failed (not final)" in shown.stdout and "Traceback" in shown.stdout


def test_a_crash_is_retried_an_exception_is_not(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    crash, boom = tmp_path / "crash", tmp_path / "boom"
    add_watch(conn, settings, crash, "crash", name="crash")
    add_watch(conn, settings, boom, "boom", name="boom")
    workers.settings = dataclasses.replace(settings, retries=1)
    workers.start("watch")
    workers.start("eval")
    (crash / "a.pt").write_bytes(torch_bytes())
    (boom / "a.pt").write_bytes(torch_bytes())
    crashed = wait_for(lambda: final_results(conn, "crash"), 30, what="the crash to end")[0]
    raised = wait_for(lambda: final_results(conn, "boom"), 30, what="the exception to end")[0]
    assert crashed["attempt"] == 2 and len(attempts(conn, crashed["job_id"])) == 2
    assert raised["attempt"] == 1 and "not retried" in raised["error"]


def test_watch_add_says_how_many_existing_checkpoints_it_leaves_out(settings: Settings, tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"step_{i}.pt").write_bytes(torch_bytes(i))
    out = invoke(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run")
    assert out.returncode == 0, out.stderr
    assert "6 existing checkpoint(s) are not evaluated; use --eval-existing or `assayer evaluate --watch run`" in out.stdout


def test_commands_print_their_answer_without_log_lines_and_status_refreshes_in_place(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # Real processes: which log lines reach stderr is decided by the logging set up at a process's start.
    out = run_cli(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run")
    assert out.returncode == 0 and " INFO " not in out.stdout + out.stderr
    proc = subprocess.Popen([sys.executable, "-m", "assayer", "status", "--interval", "0.2"], env=env_for(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    status_out = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(status_out), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum("watches:" in line for line in list(lines)) >= 3, 30, what="three refreshes of status")
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    stdout = "".join(lines)
    assert "run:" in stdout and " INFO " not in stderr


def test_watch_add_reaches_redis_before_it_imports_the_evaluator(settings: Settings, tmp_path: Path) -> None:
    slow = tmp_path / "slow_import.py"
    slow.write_text("import time\ntime.sleep(20)\n\ndef evaluate(path):\n    return {}\n")
    away = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    out = invoke(away, "watch", "add", str(tmp_path), "-e", f"{slow}:evaluate")
    assert out.returncode == 3 and "cannot reach Redis" in out.stderr
    assert time.monotonic() - started < 15  # not after 20 s of importing


def test_the_original_command_line_names_its_own_flags_in_hints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from assayer.compat import watch_main  # what python -m assayer.watch runs

    code = watch_main(["--directory", str(tmp_path), "--evaluator", evaluator_ref("record"), "--polling_interval", "-1",
                       "--num_eval_workers", "0", "--num_watch_workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--polling_interval" in err and "--poll-interval" not in err


def test_stacks_sharing_a_home_keep_their_results_apart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    local = Settings(redis_url="redis://:s3cret@127.0.0.1:6390/0", home=home)
    compose = Settings(redis_url="redis://127.0.0.1:6379/0", home=home)
    other_db = Settings(redis_url="redis://127.0.0.1:6379/2", home=home)
    paths = {local.results_path, compose.results_path, other_db.results_path}
    assert len(paths) == 3 and all(p.parent == home / "results" for p in paths)
    assert local.results_path.name == "127.0.0.1-6390-0" and "s3cret" not in str(local.results_path)
    assert Settings(redis_url="redis://x:1/0", home=home, results_dir=tmp_path / "r").results_path == tmp_path / "r"


def test_a_taken_port_names_the_process_that_holds_it(settings: Settings) -> None:
    from harness import free_port, run_assayer

    port = free_port()
    squatter = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        def listens() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listens, 10, what="the squatter to listen")
        env = env_for(settings) | {"ASSAYER_DASHBOARD_PORT": str(port), "ASSAYER_DASHBOARD_PASSWORD": "pw-for-test"}
        out = run_assayer(["dashboard"], env, timeout=60)
        assert out.returncode == 4
        assert f"port {port} for rq-dashboard is taken by pid {squatter.pid}" in out.stderr
        assert "http.server" in out.stderr and "fix: " in out.stderr
    finally:
        squatter.terminate()
        squatter.wait(10)


@pytest.mark.slow
def test_status_shows_what_a_busy_worker_evaluates_and_the_oldest_queued_checkpoint(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, queued, marker = tmp_path / "ckpts", tmp_path / "queued", tmp_path / "started"
    add_watch(conn, settings, ckpts, "slow")
    add_watch(conn, settings, queued, name="queued")
    workers.start("watch")
    workers.start("eval", {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "6"})
    (ckpts / "sub").mkdir(parents=True)
    (ckpts / "sub" / "a.pt").write_bytes(torch_bytes())
    wait_for(marker.exists, 20, what="the evaluation to start")
    (queued / "b.pt").write_bytes(torch_bytes(1))  # waits behind the slow one (one eval worker)

    def evaluating_and_queued() -> dict[str, Any] | None:
        info = status.collect(conn, settings)
        evaluating = any(w["doing"] for w in info["workers"] if "assayer-eval" in w["queues"])
        queued_since = next(w for w in info["watches"] if w["name"] == "queued")["oldest_pending_age"]
        return info if evaluating and queued_since else None

    # The eval worker, not the watch worker: that one is busy too now and then, with a scan.
    info = wait_for(evaluating_and_queued, 10, what="the eval worker busy and a queued checkpoint")
    (busy,) = [w for w in info["workers"] if "assayer-eval" in w["queues"]]
    assert busy["doing"] == "run: sub/a.pt" and busy["for_seconds"] >= 0
    assert "run: sub/a.pt for " in status.render(info) and "oldest queued checkpoint: " in status.render(info)


def test_tables_show_paths_relative_to_the_watch_versions_of_rewritten_files_and_a_bounded_error() -> None:
    from assayer import results
    from assayer.records import ResultRecord

    base: ResultRecord = {"watch": "run", "metrics": {}, "job_id": "j", "duration": 0.1, "worker": "w", "step": None}
    recs: list[ResultRecord] = [
        {**base, "job_id": "1", "checkpoint": "/data/runs/exp1/last.ckpt", "relpath": "exp1/last.ckpt", "status": "ok",
         "checkpoint_time": "2026-12-02T10:00:01+00:00", "finished_at": "1"},
        {**base, "job_id": "2", "checkpoint": "/data/runs/exp1/last.ckpt", "relpath": "exp1/last.ckpt", "status": "ok",
         "checkpoint_time": "2026-12-02T11:30:45+00:00", "finished_at": "2"},
        {**base, "job_id": "3", "checkpoint": "/data/runs/exp1/step_5.pt", "relpath": "exp1/step_5.pt", "status": "failed",
         "error": "ValueError: " + "x" * 500 + " THE-END", "finished_at": "3"},
    ]
    table = results.to_table(recs)
    assert "exp1/last.ckpt @10:00:01" in table and "exp1/last.ckpt @11:30:45" in table
    assert "/data/runs" not in table and "exp1/step_5.pt" in table and "@" not in table.split("step_5.pt")[1][:3]
    assert "failed: ValueError: xxx" in table and "THE-END" not in table  # cut at its end, its start kept
    assert max(len(line) for line in table.splitlines()) < 160
