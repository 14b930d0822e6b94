"""Directory checkpoints written by real trainers while real watch and eval workers run."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import redis
from harness import Workers, add_watch, attempts, evaluator_ref, final_results, quiet, results_by_path, wait_for
from layout_writers import deepspeed_latest, write_deepspeed
from writers import save_dcp, save_pretrained_sharded, train_hf

from assayer import status
from assayer.cli import main as cli_main
from assayer.settings import Settings


@pytest.mark.slow
def test_trainer_run_with_rotation_evaluates_each_checkpoint_directory_once(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    add_watch(conn, settings, runs, fn="inspect_dir")
    workers.start("watch")
    workers.start("eval")
    train_hf(runs / "exp1", max_steps=16, save_steps=4, save_total_limit=2)  # nested: runs/exp1/checkpoint-N/
    expected = {f"exp1/checkpoint-{n}" for n in (4, 8, 12, 16)}
    wait_for(lambda: set(results_by_path(conn)) >= {"exp1/checkpoint-12", "exp1/checkpoint-16"}, 60,
             what="the kept checkpoints evaluated")
    quiet(conn, after=settings.settle)  # later scans, every evaluation ended: nothing twice, no file on its own
    got = results_by_path(conn)
    assert set(got) <= expected, f"files inside a checkpoint were evaluated: {set(got) - expected}"
    for rel, recs in got.items():
        assert len(recs) == 1, rel
        rec = recs[0]
        if rec["status"] == "missing":  # rotated away by save_total_limit before its turn: only old ones
            assert rel in {"exp1/checkpoint-4", "exp1/checkpoint-8"} and "deleted" in rec["error"]
            continue
        assert rec["status"] == "ok", rec
        step = int(rel.rsplit("-", 1)[1])
        assert rec["step"] == step and rec["layout"] == "hf"
        assert rec["metrics"]["is_dir"] and rec["metrics"]["ctx_step"] == step and rec["metrics"]["layout"] == "hf"
        assert rec["metrics"]["tensors"] > 0 and rec["checkpoint"] == str(runs / rel)


@pytest.mark.slow
def test_a_late_shard_is_waited_for_and_status_says_which(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    staging, run = tmp_path / "staging", tmp_path / "run"
    shards = save_pretrained_sharded(staging / "export", max_shard_size="100KB")
    add_watch(conn, settings, run, fn="inspect_dir")
    workers.start("watch")
    workers.start("eval")
    late = shards[-1]
    shutil.copytree(staging / "export", run / "export", ignore=lambda _d, names: [n for n in names if n == late])
    waiting = f"export: {len(shards) - 1} of {len(shards)} shards"
    info = wait_for(lambda: next((w for w in status.collect(conn, settings)["watches"] if w["waiting"]), None), 20,
                    what="status to say what the checkpoint waits for")
    assert info["waiting"] == waiting and info["incomplete"] == 1
    quiet(conn, after=settings.settle)
    assert final_results(conn, "run") == []  # however long it waits: never evaluated without its shard
    shutil.copy(staging / "export" / late, run / "export" / late)
    rec = wait_for(lambda: final_results(conn, "run"), 20, what="the export evaluated")[0]
    assert rec["status"] == "ok" and rec["metrics"]["files"] == len(shards) + 3  # shards, index, config, generation
    assert not any(w["waiting"] for w in status.collect(conn, settings)["watches"])


@pytest.mark.slow
def test_rewritten_directory_is_evaluated_again_and_a_deleted_one_ends_missing(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    run, marker = tmp_path / "run", tmp_path / "started"
    add_watch(conn, settings, run, fn="inspect_dir")
    workers.start("watch")
    workers.start("eval", {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "1.5"})
    save_dcp(run / "step-10", seed=1)
    wait_for(lambda: len(final_results(conn, "run")) == 1, 20, what="step-10 evaluated")
    shutil.rmtree(run / "step-10")
    save_dcp(run / "step-10", seed=2)  # saved again under the same name
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="the new version evaluated")
    assert {r["version"] for r in final_results(conn, "run")} and all(r["status"] == "ok" for r in final_results(conn, "run"))
    marker.unlink()
    save_dcp(run / "step-20")
    wait_for(marker.exists, 20, what="step-20's evaluation to start")
    shutil.rmtree(run / "step-20")  # deleted during its evaluation
    rec = wait_for(lambda: results_by_path(conn).get("step-20"), 20, what="step-20's result")[0]
    assert rec["status"] == "missing" and "while it was being evaluated" in rec["error"]
    assert len(attempts(conn, rec["job_id"])) == 1


def test_deepspeed_tag_is_evaluated_after_latest_and_existing_directories_on_request(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ds"
    save_dcp(run / "old" / "step-1")  # already there (an hour ago) when the watch is added: baseline
    for f in (run / "old" / "step-1").iterdir():
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    add_watch(conn, settings, run, fn="inspect_dir")
    workers.start("watch")
    workers.start("eval")
    tag = write_deepspeed(run, 300, write_latest=False)
    quiet(conn, after=settings.settle)  # past the settle time too: a tag without `latest` is never complete
    assert final_results(conn, "run") == []
    deepspeed_latest(run, tag.name)
    rec = wait_for(lambda: final_results(conn, "run"), 20, what="global_step300 evaluated")[0]
    assert (rec["relpath"], rec["step"], rec["layout"]) == ("global_step300", 300, "deepspeed")
    cli_main(["--redis-url", settings.redis_url, "evaluate", "--watch", "run"])
    assert "queued 1 evaluation" in capsys.readouterr().out
    wait_for(lambda: "old/step-1" in results_by_path(conn), 20, what="the existing directory evaluated on request")
    assert results_by_path(conn)["old/step-1"][0]["layout"] == "dcp"


def test_watch_add_takes_layout_and_ready_markers_and_refuses_bad_ones(
    conn: redis.Redis, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pytest

    base = ["--redis-url", settings.redis_url, "watch", "add", str(tmp_path), "-e", evaluator_ref("record")]
    cli_main([*base, "--name", "m", "--ready-marker", "COMMITTED", "--ready-marker", "STABLE"])
    spec = __import__("assayer.watches", fromlist=["get"]).get(conn, "m")
    assert (spec.layout, spec.ready_markers) == ("auto", ["COMMITTED", "STABLE"])
    for bad, message in ((["--ready-marker", "../x"], "is not a file name"),
                         (["--layout", "file", "--ready-marker", "DONE"], "has no effect with --layout file")):
        with pytest.raises(SystemExit) as exc:
            cli_main([*base, "--name", "bad", *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err
    assert __import__("assayer.watches", fromlist=["get"]).get(conn, "bad") is None


@pytest.mark.slow
def test_the_hugging_face_example_evaluates_trainer_checkpoints_and_results_pick_the_best(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness import ROOT

    run = tmp_path / "llm"
    run.mkdir()
    from assayer import watches

    spec, _ = watches.build_spec(str(run), str(ROOT / "examples" / "hf" / "eval.py") + ":evaluate", name="llm")
    watches.register(conn, settings, spec)
    workers.start("watch")
    workers.start("eval")
    train_hf(run, max_steps=8, save_steps=4, save_total_limit=None)
    wait_for(lambda: len(final_results(conn, "llm")) == 2, 90, what="both Trainer checkpoints evaluated")
    recs = sorted(final_results(conn, "llm"), key=lambda r: r["step"])
    assert [(r["relpath"], r["step"], r["status"]) for r in recs] == [("checkpoint-4", 4, "ok"), ("checkpoint-8", 8, "ok")]
    assert all(r["metrics"]["perplexity"] > 1 for r in recs)
    cli_main(["--redis-url", settings.redis_url, "results", "llm", "--best", "loss"])
    best = min(recs, key=lambda r: r["metrics"]["loss"])
    assert f"at {best['checkpoint']}" in capsys.readouterr().out


def test_eval_existing_takes_the_directories_already_there(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    save_dcp(run / "a" / "step-1")
    save_dcp(run / "b" / "step-2")
    (run / "b" / "tmp-step-3").mkdir()  # an unfinished save, renamed into place later
    add_watch(conn, settings, run, fn="inspect_dir", eval_existing=True)
    workers.start("watch")
    workers.start("eval")
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="both existing directories evaluated")
    save_dcp(run / "b" / "tmp-step-3")
    quiet(conn, after=settings.settle)
    assert len(final_results(conn, "run")) == 2
    os.rename(run / "b" / "tmp-step-3", run / "b" / "step-3")
    wait_for(lambda: "b/step-3" in results_by_path(conn), 20, what="the renamed directory evaluated")
    assert sorted(results_by_path(conn)) == ["a/step-1", "b/step-2", "b/step-3"]
