"""Results delivered to real trackers and read back with the trackers' own readers.

TensorBoard: EventAccumulator. MLflow: a real ``mlflow server`` (SQLite store), read back with
``MlflowClient`` and the store's own table. W&B: offline runs, read back from the run's own
protobuf records. No network: everything stays on 127.0.0.1 and in tmp_path.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT
from trackers import (
    MlflowServer,
    TcpProxy,
    tensorboard_scalars,
    wandb_history,
    wandb_metric_definitions,
)

from assayer.errors import ConfigError
from assayer.sinks import (
    SINKS,
    Delivery,
    MlflowSink,
    SinkUnavailable,
    TensorBoardSink,
    WandbSink,
    build,
    deliver_once,
    parse_report_to,
    run_id_for,
)

CLOCK = itertools.count(1_800_000_000)


def approx_points(*points: tuple[int, float]) -> list[tuple[int, object]]:
    """Expected ``(step, value)`` points: steps exact, values by pytest.approx (TensorBoard keeps float32)."""
    return [(step, pytest.approx(value)) for step, value in points]


def result(step: int | None, acc: float, watch: str = "run", **options: Any) -> Delivery:
    """A final result as the job queue hands it to a sink; each one finishes a second after the last."""
    metrics = {"acc": acc, "loss": 1 - acc, "note": "bf16", "passed": True, "per_class": [0.1, 0.2]}
    return Delivery(watch=watch, sink=options.pop("sink", "test"), result_key=f"{watch}:ckpt-{step}:{acc}",
                    path=f"/ckpt/{watch}/checkpoint-{step}", version=f"v{step}", step=step, metrics=metrics,
                    evaluator="tests.evaluators:record", finished_at=next(CLOCK) + 0.25, **options)


# --- the API ---------------------------------------------------------------------------------------

def test_a_delivery_survives_a_json_round_trip() -> None:
    d = result(12, 0.5, tensorboard_dir="/tb", mlflow_run_id="abc", wandb_run_id="xyz")
    assert Delivery.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert Delivery.from_dict({**d.to_dict(), "added_later": 1}) == d
    assert d.numeric() == {"acc": 0.5, "loss": 0.5}  # strings, bools and lists are skipped


def test_report_to_names_the_bad_sink_and_the_valid_ones() -> None:
    assert parse_report_to(" tensorboard, MLflow,tensorboard ") == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError) as err:
        parse_report_to("tensorboard,neptune")
    assert "'neptune'" in str(err.value)
    assert "tensorboard, mlflow, wandb" in str(err.value)
    assert set(SINKS) == {"tensorboard", "mlflow", "wandb"}


def test_a_missing_tracker_package_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ConfigError) as err:
        build("mlflow", Path("/unused"), env={})
    assert "checkpoint-assayer[mlflow]" in str(err.value)


# --- TensorBoard -----------------------------------------------------------------------------------

def test_tensorboard_keeps_out_of_order_steps_and_the_checkpoint_text(tmp_path: Path) -> None:
    sink = build("tensorboard", tmp_path, env={})
    for step, acc in ((30, 0.3), (10, 0.1), (20, 0.2)):  # a late evaluation of an earlier checkpoint
        sink.deliver(result(step, acc))
    logdir = tmp_path / "tensorboard" / "run"
    assert tensorboard_scalars(logdir, "eval/acc") == approx_points((10, 0.1), (20, 0.2), (30, 0.3))
    assert [s for s, _ in tensorboard_scalars(logdir, "eval/loss")] == [10, 20, 30]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("eval/") and t not in ("eval/acc", "eval/loss")]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("assayer/checkpoint")}
    assert "/ckpt/run/checkpoint-10" in texts[10] and "v10" in texts[10]


def test_tensorboard_redelivery_after_a_kill_keeps_one_point_per_step(tmp_path: Path) -> None:
    first, second = result(5, 0.5), result(10, 0.6)
    TensorBoardSink(tmp_path).deliver(first)  # ... and the worker dies before recording it

    retry = TensorBoardSink(tmp_path)
    assert retry.delivered(first) and not retry.delivered(second)
    retry.deliver(first)  # a blind redelivery replaces the file
    assert deliver_once(retry, first) is False
    assert deliver_once(retry, second) is True
    assert tensorboard_scalars(tmp_path / "tensorboard" / "run", "eval/acc") == approx_points((5, 0.5), (10, 0.6))
    assert not list((tmp_path / "tensorboard" / "run").glob(".*tmp"))


def test_tensorboard_writes_where_the_watch_says(tmp_path: Path) -> None:
    TensorBoardSink(None).deliver(result(7, 0.7, tensorboard_dir=str(tmp_path / "runs" / "train")))
    assert tensorboard_scalars(tmp_path / "runs" / "train", "eval/acc") == approx_points((7, 0.7))
    with pytest.raises(ConfigError):
        TensorBoardSink(None).deliver(result(8, 0.8))


# --- MLflow ----------------------------------------------------------------------------------------

# One mlflow server for the whole run (conftest.py): each test below has watches and experiments of its own names.

@pytest.fixture
def mlflow_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's URL; MLflow's client reports a refused connection at once instead of retrying for minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a loaded CI machine is slow, not down
    return mlflow_server.url


def history(url: str, run_id: str, key: str = "eval/acc") -> list[tuple[int, float]]:
    from mlflow import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(url).get_metric_history(run_id, key))


def watch_runs(url: str, watch: str) -> list[Any]:
    from mlflow import MlflowClient
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(watch)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], filter_string=f"tags.`assayer.watch` = '{watch}'"))


def test_mlflow_logs_into_the_training_run_it_is_given(mlflow_env: str) -> None:
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_env)
    exp_id = client.create_experiment("training-into-run")
    train = client.create_run(exp_id, run_name="train").info.run_id
    sink = build("mlflow", Path("/unused"), env={"MLFLOW_TRACKING_URI": mlflow_env})
    d = result(40, 0.4, watch="into-run", mlflow_run_id=train)
    sink.deliver(d)
    sink.deliver(Delivery.from_dict({**result(20, 0.2, mlflow_run_id=train).to_dict(), "metrics": {"acc@1": 0.9}}))

    assert history(mlflow_env, train) == approx_points((40, 0.4))
    assert history(mlflow_env, train, "eval/acc_1") == approx_points((20, 0.9))
    tags = client.get_run(train).data.tags
    marker = json.loads(tags[f"assayer.result.step-40.{d.digest}"])
    assert (marker["path"], marker["version"], marker["step"]) == ("/ckpt/into-run/checkpoint-40", "v40", 40)
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [train]  # no run of its own
    assert watch_runs(mlflow_env, "into-run") == []


def test_mlflow_makes_one_run_per_watch_across_sinks_and_keeps_out_of_order_steps(mlflow_env: str) -> None:
    first, second = MlflowSink(mlflow_env), MlflowSink(mlflow_env)  # two workers
    first.deliver(result(300, 0.3, watch="per-watch"))
    second.deliver(result(100, 0.1, watch="per-watch"))
    first.deliver(result(200, 0.2, watch="per-watch"))

    runs = watch_runs(mlflow_env, "per-watch")
    assert len(runs) == 1 and runs[0].info.run_name == "per-watch"
    assert history(mlflow_env, runs[0].info.run_id) == approx_points((100, 0.1), (200, 0.2), (300, 0.3))


def test_mlflow_workers_making_the_watch_run_at_the_same_moment_end_with_one(mlflow_env: str) -> None:
    deliveries = [(MlflowSink(mlflow_env), result(step, step / 100, watch="race")) for step in (10, 20, 30, 40)]
    with ThreadPoolExecutor(len(deliveries)) as pool:
        list(pool.map(lambda job: job[0].deliver(job[1]), deliveries))
    runs = watch_runs(mlflow_env, "race")
    assert len(runs) == 1
    assert [s for s, _ in history(mlflow_env, runs[0].info.run_id)] == [10, 20, 30, 40]


def test_mlflow_redelivery_after_a_kill_logs_each_point_once(mlflow_env: str, mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    logged, torn = result(1, 0.5, watch="killed"), result(2, 0.75, watch="killed")
    MlflowSink(mlflow_env).deliver(logged)  # the worker dies before recording the delivery
    run_id = watch_runs(mlflow_env, "killed")[0].info.run_id
    # A kill inside log_batch: MLflow's SQL store commits the metrics, then the marker tag.
    MlflowClient(mlflow_env).log_batch(run_id, metrics=[Metric("eval/acc", 0.75, int(torn.finished_at * 1000), 2)])

    retry = MlflowSink(mlflow_env)
    assert retry.delivered(logged) and not retry.delivered(torn)
    assert deliver_once(retry, logged) is False
    assert deliver_once(retry, torn) is True
    retry.deliver(logged)
    assert retry.delivered(torn)
    with sqlite3.connect(mlflow_server.dir / "mlflow.db") as db:  # the store itself: one row per point
        rows = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'eval/acc' ORDER BY step",
                          (run_id,)).fetchall()
    assert rows == [(1, 0.5), (2, 0.75)]


def test_mlflow_down_is_a_retryable_error_and_the_retry_lands_once(mlflow_env: str, mlflow_proxy: TcpProxy) -> None:
    url = mlflow_proxy.url  # the server as this test reaches it: down and back, while other tests keep using it
    sink = MlflowSink(url)
    sink.deliver(result(1, 0.1, watch="down"))
    d = result(2, 0.2, watch="down")
    mlflow_proxy.stop()
    try:
        with pytest.raises(SinkUnavailable) as err:
            sink.deliver(d)
        assert url in str(err.value)
        with pytest.raises(SinkUnavailable):
            MlflowSink(url).delivered(d)
    finally:
        mlflow_proxy.start()
    assert deliver_once(sink, d) is True
    assert deliver_once(MlflowSink(url), d) is False
    assert history(mlflow_env, watch_runs(mlflow_env, "down")[0].info.run_id) == approx_points((1, 0.1), (2, 0.2))


# --- W&B (offline) ---------------------------------------------------------------------------------

@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return dict(os.environ)


@pytest.fixture
def wandb_sink(wandb_env: dict[str, str], tmp_path: Path) -> Iterator[WandbSink]:
    sink = build("wandb", tmp_path, env=wandb_env)
    assert isinstance(sink, WandbSink)
    yield sink
    sink.close()


def test_wandb_keeps_out_of_order_steps_on_the_step_metric(wandb_sink: WandbSink, tmp_path: Path) -> None:
    for step, acc in ((30, 0.3), (10, 0.1), (20, 0.2)):
        wandb_sink.deliver(result(step, acc, watch="wb"))
    wandb_sink.close()

    rows = [r for r in wandb_history(tmp_path, run_id_for("wb")) if "eval/acc" in r]
    assert sorted((r["train/global_step"], r["eval/acc"]) for r in rows) == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert {r["assayer/checkpoint"] for r in rows} == {f"/ckpt/wb/checkpoint-{s}" for s in (10, 20, 30)}
    assert not [k for r in rows for k in r if k.startswith("eval/") and k not in ("eval/acc", "eval/loss")]
    defs = {(m.glob_name or m.name): m.step_metric for m in wandb_metric_definitions(tmp_path, run_id_for("wb"))}
    assert defs["eval/*"] == "train/global_step" and "train/global_step" in defs


def test_wandb_writes_into_the_run_it_is_given(wandb_sink: WandbSink, tmp_path: Path) -> None:
    wandb_sink.deliver(result(3, 0.3, watch="wb", wandb_run_id="trainrun1"))
    wandb_sink.close()
    assert [r["eval/acc"] for r in wandb_history(tmp_path, "trainrun1") if "eval/acc" in r] == [0.3]
    assert wandb_history(tmp_path, run_id_for("wb")) == []


def test_wandb_redelivery_after_a_kill_is_not_duplicated(wandb_env: dict[str, str], tmp_path: Path) -> None:
    logged, other = result(8, 0.8, watch="wb"), result(9, 0.9, watch="wb")
    # The worker and its W&B service die together right after deliver() returned, as in an OOM kill of the container.
    script = ("import json, os, signal, sys\nfrom pathlib import Path\nfrom assayer.sinks import Delivery, build\n"
              "build('wandb', Path(sys.argv[1])).deliver(Delivery.from_dict(json.loads(sys.argv[2])))\n"
              "me = str(os.getpid())\n"
              "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
              "    try:\n"
              "        if open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1] == me:\n"
              "            os.kill(int(pid), signal.SIGKILL)\n"
              "    except OSError:\n"
              "        pass\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_SERVICE"}  # its own W&B service, as a worker has
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(logged.to_dict())],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    retry = build("wandb", tmp_path, env=wandb_env)
    try:
        assert retry.delivered(logged) and not retry.delivered(other)
        assert deliver_once(retry, logged) is False
        assert deliver_once(retry, other) is True
    finally:
        retry.close()
    marks = [r["assayer/result"] for r in wandb_history(tmp_path, run_id_for("wb")) if "assayer/result" in r]
    assert sorted(marks) == sorted([logged.digest, other.digest])


def test_wandb_sinks_in_one_process_share_the_open_run(wandb_sink: WandbSink, wandb_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    wandb_sink.deliver(result(1, 0.1, watch="shared"))
    build("wandb", tmp_path, env=wandb_env).deliver(result(2, 0.2, watch="shared"))  # a second job, same worker
    wandb_sink.close()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert sorted(r["eval/acc"] for r in wandb_history(tmp_path, run_id_for("shared")) if "eval/acc" in r) == [0.1, 0.2]


def test_a_result_without_a_step_goes_to_each_tools_default_step(wandb_sink: WandbSink, tmp_path: Path) -> None:
    TensorBoardSink(tmp_path).deliver(result(None, 0.4, watch="nostep"))
    assert tensorboard_scalars(tmp_path / "tensorboard" / "nostep", "eval/acc") == approx_points((0, 0.4))
    wandb_sink.deliver(result(500, 0.5, watch="nostep"))
    wandb_sink.deliver(result(None, 0.4, watch="nostep"))
    wandb_sink.close()
    rows = [r for r in wandb_history(tmp_path, run_id_for("nostep")) if "eval/acc" in r]
    assert [r.get("train/global_step") for r in rows] == [500, None]  # not the step of the row before


def test_wandb_finds_a_result_beyond_the_first_32k_block(wandb_env: dict[str, str], tmp_path: Path) -> None:
    import wandb
    results = [result(i, 0.5, watch="big") for i in range(120)]
    run = wandb.init(project="big", id=run_id_for("big"), dir=tmp_path, mode="offline", reinit="create_new")
    for d in results:
        run.log({"assayer/result": d.digest, "padding": "x" * 600})  # 120 rows of ~700 bytes: three blocks
    run.finish()
    assert [p.stat().st_size > 2 * 32 * 1024 for p in (tmp_path / "wandb").glob("offline-run-*/*.wandb")] == [True]
    sink = build("wandb", tmp_path, env=wandb_env)
    assert [d.step for d in results if not sink.delivered(d)] == []  # rows cut across blocks included
    assert not sink.delivered(result(999, 0.5, watch="big"))
    assert len([r for r in wandb_history(tmp_path, run_id_for("big")) if "padding" in r]) == 120
