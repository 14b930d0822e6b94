"""Results delivered to trackers by real workers: at their step, each once, never holding up evaluation.

TensorBoard is read back with its own EventAccumulator, MLflow through a real ``mlflow server``
(SQLite store), W&B from its offline run files with its own protobuf records (tests/trackers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from harness import Workers, add_watch, run_cli, wait_for
from trackers import MlflowServer, TcpProxy, tensorboard_scalars, wandb_history
from writers import torch_bytes, write_atomically

from assayer import keys
from assayer.settings import Settings
from assayer.watches import Report

FAST = {"ASSAYER_DELIVERY_LEASE": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _delivered(conn: redis.Redis, watch: str = "run") -> int:
    return int(conn.hlen(keys.delivered(watch)))


def _status(settings: Settings) -> dict[str, dict[str, object]]:
    out = run_cli(settings, "status", "--format", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["watches"][0]["report_to"])


def _save(ckpts: Path, steps: list[int]) -> None:
    for step in steps:  # sizes differ by step: the metric "size" tells them apart
        write_atomically(ckpts / f"model-step{step}.pt", torch_bytes(step, size=1000 + step))


def _mlflow_points(url: str, watch: str = "run", key: str = "eval/size") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("assayer.watch") == watch]
    assert len(runs) <= 1, f"one run per watch, found {len(runs)}"
    return sorted((m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, key))


def test_results_reach_tensorboard_at_their_steps_once_each_even_out_of_order(
        conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, report=Report("tensorboard"))
    workers.start("eval")
    workers.start("watch", FAST)
    _save(ckpts, [300, 100, 200])  # saved, so evaluated and delivered, out of step order
    wait_for(lambda: _delivered(conn) == 3, 60, what="three deliveries to TensorBoard")
    points = tensorboard_scalars(settings.results_path / "tensorboard" / "run", "eval/size")
    assert [step for step, _ in points] == [100, 200, 300]
    metrics = {r["step"]: r["metrics"]["size"] for r in map(json.loads, conn.hvals(keys.results("run")))}
    assert points == [(step, metrics[step]) for step in (100, 200, 300)]  # each result at its own step
    assert _status(settings)["tensorboard"] == {"delivered": 3, "pending": 0, "failing": 0, "last_error": None}


# The run's one mlflow server (conftest.py) is shared with tests/test_sinks.py: the watches here have names of their own.

@pytest.mark.slow
def test_a_tracker_down_during_evaluation_gets_each_result_once_when_it_is_back(
        conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path, mlflow_proxy: TcpProxy) -> None:
    ckpts, name = tmp_path / "ckpts", "tracker-down"
    add_watch(conn, settings, ckpts, name=name, report=Report("mlflow"))
    env = FAST | {"MLFLOW_TRACKING_URI": mlflow_proxy.url}  # MLflow as the workers reach it: down, then back
    workers.start("eval")
    workers.start("watch", env)
    mlflow_proxy.stop()
    try:
        _save(ckpts, [20, 10])
        wait_for(lambda: conn.hlen(keys.results(name)) == 2, 60, what="both evaluations, the tracker down")
        assert all(json.loads(v)["status"] == "ok" for v in conn.hvals(keys.results(name)))  # never failed by it
        failing = wait_for(lambda: (s := _status(settings)["mlflow"])["failing"] and s, 60,
                           what="status to show the failing deliveries")
        assert failing["pending"] == 2 and failing["delivered"] == 0
        assert "mlflow" in str(failing["last_error"]).lower() or "connect" in str(failing["last_error"]).lower()
    finally:
        mlflow_proxy.start()
    wait_for(lambda: _delivered(conn, name) == 2, 90, interval=0.5, what="both deliveries once MLflow is back")
    metrics = {r["step"]: r["metrics"]["size"] for r in map(json.loads, conn.hvals(keys.results(name)))}
    assert _mlflow_points(mlflow_proxy.url, name) == [(10, metrics[10]), (20, metrics[20])]
    assert _status(settings)["mlflow"] == {"delivered": 2, "pending": 0, "failing": 0, "last_error": None}


@pytest.mark.slow
def test_kill_9_of_the_watch_worker_mid_delivery_loses_no_point_and_doubles_none(
        conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path, mlflow_server: MlflowServer) -> None:
    ckpts, name = tmp_path / "ckpts", "killed-mid-delivery"
    add_watch(conn, settings, ckpts, name=name)  # its own MLflow run; no tracker yet: backfilled below
    steps = list(range(1, 25))
    workers.start("eval")
    watch = workers.start("watch", FAST)
    _save(ckpts, steps)
    wait_for(lambda: conn.hlen(keys.results(name)) == len(steps), 120, what="every evaluation")
    env = FAST | {"MLFLOW_TRACKING_URI": mlflow_server.url}
    workers.kill9(watch)
    out = run_cli(settings, "report", "--watch", name, "--to", "mlflow")
    assert out.returncode == 0 and f"queued {len(steps)} " in out.stdout, out.stdout + out.stderr
    watch = workers.start("watch", env)
    wait_for(lambda: 0 < _delivered(conn, name) < len(steps) - 4, 60, interval=0.01, what="some deliveries made")
    workers.kill9(watch)  # mid-batch: some done, one maybe written but not recorded, the rest claimed
    workers.start("watch", env)
    wait_for(lambda: _delivered(conn, name) == len(steps), 90, interval=0.5, what="every delivery after the restart")
    assert [s for s, _ in _mlflow_points(mlflow_server.url, name)] == steps  # each step exactly once
    again = run_cli(settings, "report", "--watch", name, "--to", "mlflow")
    assert "queued 0 " in again.stdout, again.stdout


def test_report_backfills_past_results_into_wandb_offline_at_their_steps(
        conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, report=Report("wandb", wandb_run_id="train-run-1"))
    env = FAST | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_PROJECT": "assayer-test",
                  "WANDB_SILENT": "true"}
    (tmp_path / "wandb").mkdir()
    workers.start("eval")
    workers.start("watch", env)
    _save(ckpts, [30, 10, 20])
    wait_for(lambda: _delivered(conn) == 3, 90, what="three deliveries to W&B")
    workers.stop_all()  # W&B finishes the run's file when the worker stops
    rows = [r for r in wandb_history(tmp_path / "wandb", "train-run-1") if "eval/size" in r]
    assert sorted(r["train/global_step"] for r in rows) == [10, 20, 30]


def test_watch_add_refuses_an_unknown_tracker_and_a_run_id_without_its_tracker(settings: Settings, tmp_path: Path) -> None:
    bad = run_cli(settings, "watch", "add", str(tmp_path), "-e", "tests/evaluators.py:record", "--report-to", "neptune")
    assert bad.returncode == 2 and "unknown sink 'neptune'" in bad.stderr and "tensorboard, mlflow, wandb" in bad.stderr
    orphan = run_cli(settings, "watch", "add", str(tmp_path), "-e", "tests/evaluators.py:record",
                     "--report-to", "tensorboard", "--mlflow-run-id", "abc")
    assert orphan.returncode == 2 and "--mlflow-run-id is given but mlflow is not in --report-to" in orphan.stderr


def test_report_to_in_the_watches_file_and_the_default_from_the_environment(
        conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    from assayer import watches

    wf = tmp_path / "watches.yaml"
    wf.write_text(f"watches:\n  - name: a\n    directory: {tmp_path}\n    evaluator: tests/evaluators.py:record\n"
                  f"    report_to: [tensorboard, mlflow]\n  - name: b\n    directory: {tmp_path}\n"
                  f"    evaluator: tests/evaluators.py:record\n")
    watches.sync_file(conn, settings.replace(watches_file=wf, report_to="wandb"))
    assert watches.require(conn, "a").report_to == ["tensorboard", "mlflow"]
    assert watches.require(conn, "b").report_to == ["wandb"]
