"""Holds: a trainer deletes a rotated checkpoint only once Assayer evaluated it, never on doubt.

The rules run on ledgers and results the real code writes (``watches.register``, ``ledger.enqueue_new``,
an in-process burst worker); the callbacks run inside a real transformers Trainer and a real
Lightning Trainer, with real watch and eval worker processes and an evaluator slower than saving.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import writers
from harness import Workers, add_watch, burst, evaluator_ref, free_port, results_by_path, scan_now, wait_for
from writers import tiny_gpt2, write_atomically, zip_bytes

from assayer import holds, watches
from assayer.errors import AssayerError, ConfigError, RedisUnavailable
from assayer.integrations import Rotation
from assayer.settings import Settings


def write(path: Path, seed: int = 0) -> Path:
    """A complete checkpoint (a whole zip archive), renamed into place."""
    write_atomically(path, zip_bytes(seed))
    return path


def add_suite(conn: redis.Redis, settings: Settings, directory: Path, evaluators: list[str],
              suite: watches.Suite | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    spec, _ = watches.build_spec(str(directory), [f"{n}={evaluator_ref(fn)}" for n, fn in
                                                  (e.split("=") for e in evaluators)], name="run", suite=suite)
    watches.register(conn, settings, spec)


def dead_settings(tmp_path: Path) -> Settings:
    """Settings naming a Redis nobody listens on."""
    return Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path / "dead-home")


# -- the rules ------------------------------------------------------------------------------------


def test_a_checkpoint_under_no_watch_may_be_deleted(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    beside = write(tmp_path / "run2" / "step_1.pt")  # shares the watch's name as a prefix, not its directory
    hold = holds.why(beside, conn=conn)
    assert hold.deletable and hold.rule == "no-watch" and hold.watch is None
    gone = holds.why(tmp_path / "run" / "step_9.pt", conn=conn)
    assert gone.deletable and gone.rule == "gone"
    write(tmp_path / "run" / "step_1.pt")
    os.symlink(tmp_path / "run", tmp_path / "link")  # a trainer writing through a link is still watched
    hold = holds.why(tmp_path / "link" / "step_1.pt", conn=conn)
    assert not hold.deletable and (hold.watch, hold.checkpoint) == ("run", "step_1.pt")


def test_a_new_checkpoint_is_kept_until_its_evaluation_ended(conn: redis.Redis, settings: Settings,
                                                             tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    ckpt = write(tmp_path / "run" / "step_1.pt")
    hold = holds.why(ckpt, conn=conn)
    assert not hold.deletable and hold.rule == "unqueued" and (hold.watch, hold.checkpoint) == ("run", "step_1.pt")
    scan_now(conn, settings)
    hold = holds.why(ckpt, conn=conn)
    assert not hold.deletable and hold.rule == "evaluating" and hold.pending == ("record",) and not hold.done
    burst(settings, conn)
    hold = holds.why(ckpt, conn=conn)
    assert hold.deletable and hold.rule == "evaluated" and hold.done == {"record": "ok"} and not hold.pending
    assert holds.may_delete(ckpt, conn=conn)


def test_a_rewritten_checkpoint_is_kept_for_its_new_version(conn: redis.Redis, settings: Settings,
                                                           tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    ckpt = write(tmp_path / "run" / "last.ckpt")
    scan_now(conn, settings)
    burst(settings, conn)
    assert holds.may_delete(ckpt, conn=conn)
    os.utime(ckpt, (1, 1))  # rewritten in place: a version the watch has not queued yet
    hold = holds.why(ckpt, conn=conn)
    assert not hold.deletable and hold.rule == "unqueued" and "rewritten" in hold.reason


def test_baseline_checkpoints_may_be_deleted_but_not_those_the_watch_takes_on(conn: redis.Redis, settings: Settings,
                                                                              tmp_path: Path) -> None:
    old = write(tmp_path / "run" / "step_1.pt")
    add_watch(conn, settings, tmp_path / "run")
    hold = holds.why(old, conn=conn)
    assert hold.deletable and hold.rule == "baseline"
    watches.remove(conn, "run")
    add_watch(conn, settings, tmp_path / "run", eval_existing=True)  # existing checkpoints are evaluated too
    assert holds.why(old, conn=conn).rule == "unqueued"


def test_a_paused_watch_lets_unqueued_checkpoints_go_but_not_queued_ones(conn: redis.Redis, settings: Settings,
                                                                         tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    queued = write(tmp_path / "run" / "step_1.pt")
    scan_now(conn, settings)
    later = write(tmp_path / "run" / "step_2.pt", 2)
    watches.set_paused(conn, "run", True)
    assert holds.why(later, conn=conn).rule == "paused" and holds.may_delete(later, conn=conn)
    hold = holds.why(queued, conn=conn)  # its job is queued: an eval worker still runs it
    assert not hold.deletable and hold.rule == "evaluating"
    watches.remove(conn, "run")
    assert holds.why(queued, conn=conn).rule == "no-watch"


def test_every_evaluator_needs_a_final_result_of_any_status(conn: redis.Redis, settings: Settings,
                                                            tmp_path: Path) -> None:
    add_suite(conn, settings, tmp_path / "run", ["acc=record", "judge=boom"])
    ckpt = write(tmp_path / "run" / "step_1.pt")
    scan_now(conn, settings, only=["acc"])
    burst(settings, conn)
    hold = holds.why(ckpt, conn=conn)  # judge has no job yet: the watch backfills it
    assert not hold.deletable and hold.done == {"acc": "ok"} and hold.pending == ("judge",)
    scan_now(conn, settings)
    assert holds.why(ckpt, conn=conn).pending == ("judge",)
    burst(settings, conn)
    hold = holds.why(ckpt, conn=conn)
    assert hold.deletable and hold.done == {"acc": "ok", "judge": "failed"}

    moved = write(tmp_path / "run" / "step_2.pt", 2)
    scan_now(conn, settings)
    os.rename(moved, tmp_path / "aside.pt")  # gone while queued: both evaluations end missing
    burst(settings, conn)
    os.rename(tmp_path / "aside.pt", moved)  # back, the same inode, size and mtime: the same version
    hold = holds.why(moved, conn=conn)
    assert hold.deletable and hold.done == {"acc": "missing", "judge": "missing"}


def test_without_backfill_an_evaluator_added_later_is_not_waited_for(conn: redis.Redis, settings: Settings,
                                                                    tmp_path: Path) -> None:
    add_suite(conn, settings, tmp_path / "run", ["acc=record", "judge=boom"], watches.Suite(backfill=False))
    ckpt = write(tmp_path / "run" / "step_1.pt")
    scan_now(conn, settings, only=["acc"])
    burst(settings, conn)
    hold = holds.why(ckpt, conn=conn)
    assert hold.deletable and hold.done == {"acc": "ok"}


def test_what_the_watch_never_evaluates_may_be_deleted(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    run = tmp_path / "run"
    add_suite(conn, settings, run, ["acc=record"], watches.Suite(every=2))
    (run / "config.json").write_text("{}")
    temp = write(run / "step_4.pt.tmp")
    (run / "tmp-checkpoint-5").mkdir()
    write(run / "tmp-checkpoint-5" / "model.safetensors.pt")
    odd, even = write(run / "step_3.pt", 3), write(run / "step_4.pt", 4)
    for path in (run / "config.json", temp, run / "tmp-checkpoint-5"):
        hold = holds.why(path, conn=conn)
        assert hold.deletable and hold.rule == "not-a-checkpoint", (path, hold)
    assert holds.why(odd, conn=conn).rule == "skipped"  # --every 2 skips step 3
    assert holds.why(even, conn=conn).rule == "unqueued"


def test_a_folder_is_kept_while_a_checkpoint_inside_is_and_deletable_filters_a_list(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    add_watch(conn, settings, run)
    first = write(run / "sub" / "step_1.pt", 1)
    scan_now(conn, settings)
    burst(settings, conn)
    second = write(run / "sub" / "step_2.pt", 2)
    hold = holds.why(run / "sub", conn=conn)
    assert not hold.deletable and hold.checkpoint == "sub/step_2.pt" and hold.rule == "unqueued"
    wanted = [str(first), str(second), str(run / "sub"), str(tmp_path / "elsewhere.pt")]
    assert holds.deletable(wanted, conn=conn) == [str(first), str(tmp_path / "elsewhere.pt")]


def test_wait_returns_once_a_real_worker_evaluated_the_checkpoint(conn: redis.Redis, settings: Settings,
                                                                  workers: Workers, tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    ckpt = write(tmp_path / "run" / "step_1.pt")
    scan_now(conn, settings)
    early = holds.wait(ckpt, 0.3, conn=conn, interval=0.1)  # no worker yet: the timeout answers, still held
    assert not early.deletable and early.rule == "evaluating"
    workers.start("eval")
    hold = holds.wait(ckpt, 60, settings=settings, interval=0.1)  # its own connection, from the settings
    assert hold.deletable and hold.done == {"record": "ok"}


def test_redis_unreachable_raises_a_clear_error_and_nothing_is_deleted(
    conn: redis.Redis, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = dead_settings(tmp_path)
    ckpts = [write(tmp_path / "run" / f"step_{i}.pt", i) for i in range(3)]
    with pytest.raises(holds.HoldUnknown) as err:
        holds.may_delete(ckpts[0], settings=dead)
    assert isinstance(err.value, RedisUnavailable) and isinstance(err.value, AssayerError)
    assert "cannot tell whether checkpoints may be deleted" in str(err.value) and "fix:" in str(err.value)
    with redis.Redis.from_url(dead.redis_url) as lost, pytest.raises(holds.HoldUnknown):  # a client given, Redis gone
        holds.deletable([str(p) for p in ckpts], conn=lost)
    rotation = Rotation(keep_last=1, max_wait_s=0, settings=dead)  # even past its timeout: never on doubt
    with caplog.at_level(logging.WARNING, "assayer.integrations"):
        assert rotation.prune([str(p) for p in ckpts]) == []
    assert all(p.exists() for p in ckpts)
    assert "keeping every checkpoint" in caplog.text


def test_after_max_wait_an_unevaluated_checkpoint_is_deleted_with_a_warning(
    conn: redis.Redis, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_watch(conn, settings, tmp_path / "run")
    ckpts = [write(tmp_path / "run" / f"step_{i}.pt", i) for i in range(1, 4)]
    scan_now(conn, settings)  # queued, and no worker evaluates them
    rotation = Rotation(keep_last=2, max_wait_s=0.5, conn=conn)
    paths = [str(p) for p in ckpts]
    assert rotation.prune(paths) == [] and list(rotation.kept) == [paths[0]]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "assayer.integrations"):
        deleted = wait_for(lambda: rotation.prune(paths), 10, interval=0.1, what="the timeout to delete step_1.pt")
    assert deleted == [paths[0]] and time.monotonic() - started >= 0.4
    assert not ckpts[0].exists() and ckpts[1].exists() and ckpts[2].exists()
    assert "after waiting" in caplog.text and "will end missing" in caplog.text
    burst(settings, conn)  # the price of the timeout: that evaluation found nothing
    assert results_by_path(conn)["step_1.pt"][0]["status"] == "missing"


def test_a_rotation_keeps_at_least_one_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Rotation(keep_last=0, settings=dead_settings(tmp_path))
    with pytest.raises(ConfigError):
        Rotation(keep_last=2, max_wait_s=-1, settings=dead_settings(tmp_path))


# -- real trainers ------------------------------------------------------------------------------------


def train_hf(output_dir: Path, callbacks: list[Any], max_steps: int = 6, save_total_limit: int | None = None) -> None:
    """transformers' Trainer on CPU, a checkpoint-N directory every step (trainer_state.json written last)."""
    import torch
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(16) * (i + 1) % 100
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=1,
                             save_total_limit=save_total_limit, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, logging_strategy="no", disable_tqdm=True)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=callbacks).train()


def train_lightning(dirpath: Path, callbacks: list[Any], max_steps: int = 6, save_top_k: int = -1) -> None:
    """Lightning on CPU, ModelCheckpoint writing ``epoch=E-step=S.ckpt`` every step into ``dirpath``."""
    writers.train_lightning(dirpath.parent, max_steps, 1, callbacks=callbacks, save_top_k=save_top_k, dirpath=dirpath)


def check_rotation(conn: redis.Redis, rotation: Rotation, relpaths: list[str], listing: Any, kept: int = 2) -> None:
    """Every saved checkpoint ends with one final ok result (none missing), and once they all have one,
    a last prune leaves the newest ``kept`` only."""
    wait_for(lambda: set(results_by_path(conn)) >= set(relpaths), 90, what="every checkpoint evaluated")
    got = results_by_path(conn)
    assert set(got) == set(relpaths)
    for rel in relpaths:
        assert [r["status"] for r in got[rel]] == ["ok"], (rel, got[rel])
    rotation.prune(listing())
    assert [os.path.basename(p) for p in listing()] == [os.path.basename(r) for r in relpaths[-kept:]]


@pytest.mark.slow
def test_hf_trainer_rotation_waits_for_every_evaluation(conn: redis.Redis, settings: Settings, workers: Workers,
                                                        tmp_path: Path) -> None:
    from assayer.integrations.hf import AssayerRotationCallback, checkpoints

    out = tmp_path / "runs" / "exp1"
    add_watch(conn, settings, tmp_path / "runs", fn="slow")
    workers.start("watch")
    workers.start("eval", {"EVAL_SECONDS": "1"})  # a second per checkpoint: slower than the Trainer saves
    callback = AssayerRotationCallback(keep_last=2, settings=settings)
    train_hf(out, [callback], max_steps=6)
    left = {os.path.basename(p) for p in checkpoints(str(out))}
    held = {os.path.basename(p) for p in callback.rotation.kept}
    # At the end: the newest two, plus the older ones whose evaluation had not ended (held, never lost).
    assert left == {"checkpoint-5", "checkpoint-6"} | held
    done = {rel for rel, recs in results_by_path(conn).items() if recs[0]["status"] == "ok"}
    assert {f"exp1/checkpoint-{n}" for n in range(1, 7)} - {f"exp1/{n}" for n in left} <= done
    check_rotation(conn, callback.rotation, [f"exp1/checkpoint-{n}" for n in range(1, 7)],
                   lambda: checkpoints(str(out)))


@pytest.mark.slow
def test_hf_final_wait_ends_the_run_with_the_newest_only(conn: redis.Redis, settings: Settings, workers: Workers,
                                                         tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from assayer.integrations.hf import AssayerRotationCallback, checkpoints

    class EvalWorkerAtTheEnd(TrainerCallback):
        """Nothing is evaluated while training runs: the rotation has to wait at the end for every evaluation."""

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            assert not results_by_path(conn)
            workers.start("eval")

    out = tmp_path / "runs" / "exp1"
    add_watch(conn, settings, tmp_path / "runs")
    workers.start("watch")
    train_hf(out, [EvalWorkerAtTheEnd(), AssayerRotationCallback(keep_last=2, final_wait_s=90, settings=settings)],
             max_steps=4)
    assert [os.path.basename(p) for p in checkpoints(str(out))] == ["checkpoint-3", "checkpoint-4"]
    got = results_by_path(conn)
    assert all([r["status"] for r in got[f"exp1/checkpoint-{n}"]] == ["ok"] for n in (1, 2)), got


@pytest.mark.slow
def test_lightning_rotation_waits_for_every_evaluation(conn: redis.Redis, settings: Settings, workers: Workers,
                                                       tmp_path: Path) -> None:
    from assayer.integrations.lightning import AssayerRotation, checkpoints

    folder = tmp_path / "runs" / "checkpoints"
    add_watch(conn, settings, tmp_path / "runs", fn="slow")
    workers.start("watch")
    workers.start("eval", {"EVAL_SECONDS": "1"})
    callback = AssayerRotation(keep_last=2, settings=settings)
    train_lightning(folder, [callback], max_steps=6)
    names = [f"checkpoints/epoch=0-step={n}.ckpt" for n in range(1, 7)]
    left = {os.path.basename(p) for p in checkpoints(str(folder))}
    held = {os.path.basename(p) for p in callback.rotation.kept}
    assert left == {"epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt"} | held
    check_rotation(conn, callback.rotation, names, lambda: checkpoints(str(folder)))


def test_trainers_own_rotation_is_refused_before_training(tmp_path: Path) -> None:
    from assayer.integrations.hf import AssayerRotationCallback
    from assayer.integrations.lightning import AssayerRotation

    dead = dead_settings(tmp_path)
    with pytest.raises(ConfigError, match="save_total_limit=None"):
        train_hf(tmp_path / "hf", [AssayerRotationCallback(keep_last=2, settings=dead)], save_total_limit=2)
    assert not (tmp_path / "hf" / "checkpoint-1").exists()
    with pytest.raises(ConfigError, match="save_top_k=-1"):
        train_lightning(tmp_path / "pl" / "checkpoints", [AssayerRotation(keep_last=2, settings=dead)], save_top_k=1)
    assert not (tmp_path / "pl" / "checkpoints").exists()


def test_a_trainer_keeps_every_checkpoint_while_redis_is_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from assayer.integrations.hf import AssayerRotationCallback, checkpoints

    with caplog.at_level(logging.WARNING, "assayer.integrations"):
        train_hf(tmp_path / "out", [AssayerRotationCallback(keep_last=1, max_wait_s=0, settings=dead_settings(tmp_path))],
                 max_steps=3)
    assert [os.path.basename(p) for p in checkpoints(str(tmp_path / "out"))] == [f"checkpoint-{n}" for n in (1, 2, 3)]
    assert "keeping every checkpoint" in caplog.text


@pytest.mark.slow
def test_hf_trainers_own_rotation_with_snapshots_loses_no_evaluation(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    """No callback: the Trainer deletes with save_total_limit=2, and ``--snapshot auto`` pinned each checkpoint."""
    runs = tmp_path / "runs"
    runs.mkdir()
    spec, _ = watches.build_spec(str(runs), evaluator_ref("slow"), name="run", snapshot=watches.Snapshot("auto"))
    watches.register(conn, settings, spec)
    workers.start("watch")
    workers.start("eval", {"EVAL_SECONDS": "3"})  # slower than the Trainer saves: today most would end missing
    from transformers import TrainerCallback

    class Pace(TrainerCallback):
        """A save every 1.5 s, so each checkpoint lives about 3 s before the rotation deletes it: time for
        the watch to see it complete (and pin it), not for the 3 s evaluation of the ones before it."""

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(1.5)

    train_hf(runs / "exp1", [Pace()], max_steps=6, save_total_limit=2)
    wait_for(lambda: len(results_by_path(conn)) == 6, 60, what="all six checkpoints evaluated")
    statuses = {rel: [r["status"] for r in recs] for rel, recs in results_by_path(conn).items()}
    assert statuses == {f"exp1/checkpoint-{n}": ["ok"] for n in range(1, 7)}
    assert sorted(os.listdir(runs / "exp1")) == ["checkpoint-5", "checkpoint-6"]  # the Trainer's rotation ran
