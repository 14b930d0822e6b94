"""Checkpoints written for real, found by real watch workers, evaluated by real eval workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from harness import Workers, add_watch, attempts, evaluator_ref, final_results, quiet, results_by_path, settled, wait_for
from rq.registry import ScheduledJobRegistry
from writers import (
    safetensors_bytes,
    torch_bytes,
    write_atomically,
    write_slowly,
    write_slowly_in_background,
    zip_bytes,
)

from assayer import keys
from assayer.rq_internals import queue_key
from assayer.settings import Settings


def test_every_completeness_path_evaluates_each_file_once_and_whole(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    workers.start("eval")
    writes = {
        "slow-torch.pt": torch_bytes(1, size=50_000),
        "nested/deeper/slow.safetensors": safetensors_bytes(2, size=50_000),
        "slow-unknown.state": b"\x80\x04" + b"legacy" * 5000,
    }
    threads = [write_slowly_in_background(ckpts / rel, data, chunks=6, pause=0.25) for rel, data in writes.items()]
    write_atomically(ckpts / "renamed" / "atomic.ckpt", torch_bytes(3))
    for t in threads:
        t.join()
    expected = {**{rel: len(d) for rel, d in writes.items()}, "renamed/atomic.ckpt": len(torch_bytes(3))}
    wait_for(lambda: len(results_by_path(conn)) == len(expected), 30, what="all four checkpoints evaluated")
    got = results_by_path(conn)
    for rel, size in expected.items():
        assert len(got[rel]) == 1
        rec = got[rel][0]
        assert rec["status"] == "ok", rec
        assert rec["metrics"]["size"] == size, f"{rel} was evaluated before it was complete"
    quiet(conn)  # more scans, every evaluation ended: nothing is evaluated a second time
    assert sum(len(v) for v in results_by_path(conn).values()) == len(expected)


def test_overwrite_in_place_is_a_new_version_and_deletion_triggers_nothing(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    workers.start("eval")
    last = ckpts / "last.ckpt"
    last.write_bytes(torch_bytes(1))
    wait_for(lambda: len(final_results(conn, "run")) == 1, 20, what="first version evaluated")
    write_slowly(last, torch_bytes(2, size=8000), chunks=4, pause=0.2)  # torch.save rewrites in place
    wait_for(lambda: len(final_results(conn, "run")) == 2, 20, what="second version evaluated")
    sizes = sorted(r["metrics"]["size"] for r in final_results(conn, "run"))
    assert sizes == sorted([len(torch_bytes(1)), len(torch_bytes(2, size=8000))])
    last.unlink()
    quiet(conn)  # scans that saw the deletion, and anything they queued ended
    assert len(final_results(conn, "run")) == 2


def test_queued_job_whose_file_vanished_ends_missing(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    (ckpts / "gone.pt").write_bytes(torch_bytes())
    wait_for(lambda: conn.llen(queue_key(settings.eval_queue)) == 1, 10, what="job queued")
    (ckpts / "gone.pt").unlink()
    workers.start("eval")
    rec = wait_for(lambda: final_results(conn, "run"), 10, what="a result")[0]
    assert rec["status"] == "missing" and "deleted" in rec["error"]
    wait_for(lambda: settled(conn), 10, what="the job to leave rq's registries")
    assert len(attempts(conn, rec["job_id"])) == 1  # no retry loop
    assert conn.zcard(ScheduledJobRegistry(settings.eval_queue, connection=conn).key) == 0


def test_existing_checkpoints_only_with_eval_existing(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    old, both = tmp_path / "old", tmp_path / "both"
    for d in (old, both):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "before.pt").write_bytes(torch_bytes(1))
    add_watch(conn, settings, old, name="new-only")
    add_watch(conn, settings, both, name="all", eval_existing=True)
    workers.start("watch")
    workers.start("eval")
    (old / "after.pt").write_bytes(torch_bytes(2))
    wait_for(lambda: len(final_results(conn, "new-only")) == 1 and len(final_results(conn, "all")) == 1, 20,
             what="one result per watch")
    assert final_results(conn, "new-only")[0]["relpath"] == "after.pt"
    assert final_results(conn, "all")[0]["relpath"] == "sub/before.pt"


def test_warm_worker_imports_once_and_passes_context(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    warm, ctx_dir = tmp_path / "warm", tmp_path / "ctx"
    warm.mkdir()
    ctx_dir.mkdir()
    add_watch(conn, settings, warm, name="warm")
    add_watch(conn, settings, ctx_dir, fn="with_context", name="ctx")
    workers.start("watch")
    workers.start("eval")
    for i in range(3):
        (warm / f"step_{i}.pt").write_bytes(torch_bytes(i))
    (ctx_dir / "epoch=2-step=700.ckpt").write_bytes(torch_bytes())
    wait_for(lambda: len(final_results(conn, "warm")) == 3 and final_results(conn, "ctx"), 20, what="results")
    recs = final_results(conn, "warm")
    assert sorted(r["metrics"]["calls"] for r in recs) == [1, 2, 3]  # module state survived between checkpoints
    assert len({r["metrics"]["pid"] for r in recs}) == 1 and len({r["metrics"]["loaded_at"] for r in recs}) == 1
    ctx = final_results(conn, "ctx")[0]
    assert ctx["metrics"] == {"watch": "ctx", "step": 700, "attempt": 1, "same_path": True}
    assert ctx["step"] == 700


def test_checkpoints_written_while_down_are_evaluated_on_restart_and_nothing_twice(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    workers.start("eval")
    (ckpts / "a.pt").write_bytes(torch_bytes(1))
    wait_for(lambda: len(final_results(conn, "run")) == 1, 20, what="a.pt evaluated")
    workers.stop_all()
    (ckpts / "b.pt").write_bytes(torch_bytes(2))
    (ckpts / "sub").mkdir()
    (ckpts / "sub" / "c.state").write_bytes(b"\x80\x04pickle" * 100)
    workers.start("watch")
    workers.start("eval")
    wait_for(lambda: len(final_results(conn, "run")) == 3, 20, what="b and c evaluated after restart")
    quiet(conn)
    assert sorted(r["relpath"] for r in final_results(conn, "run")) == ["a.pt", "b.pt", "sub/c.state"]


@pytest.mark.slow
def test_two_watch_workers_never_enqueue_a_checkpoint_twice(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    for i in range(5):
        add_watch(conn, settings, ckpts, name=f"w{i}")  # five watches on one tree: both workers get work
    workers.start("watch")
    workers.start("watch")
    for i in range(100):
        (ckpts / f"d{i % 7}").mkdir(exist_ok=True)
        (ckpts / f"d{i % 7}" / f"{i}.ckpt").write_bytes(zip_bytes(i))
    workers.start("eval")
    workers.start("eval")
    wait_for(lambda: sum(len(final_results(conn, f"w{i}")) for i in range(5)) == 500, 90, what="500 results")
    for i in range(5):
        quiet(conn, f"w{i}", scans=2)
    for i in range(5):
        recs = final_results(conn, f"w{i}")
        assert len(recs) == 100 and len({r["relpath"] for r in recs}) == 100
        assert all(len(attempts(conn, r["job_id"])) == 1 for r in recs)
    assert sum(conn.hlen(keys.ledger(f"w{i}")) for i in range(5)) == 500


@pytest.mark.slow
def test_burst_of_1000_checkpoints_gives_exactly_1000_results(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "burst"
    ckpts.mkdir()
    add_watch(conn, settings, ckpts)
    workers.start("watch")
    workers.start("eval")
    workers.start("eval")
    for i in range(1000):
        (ckpts / f"part{i % 10}").mkdir(exist_ok=True)
        (ckpts / f"part{i % 10}" / f"step_{i}.pt").write_bytes(zip_bytes(i))
    wait_for(lambda: conn.hlen(keys.results("run")) >= 1000, 180, interval=0.5, what="1000 results")
    quiet(conn)
    recs = final_results(conn, "run")
    assert len(recs) == 1000 and len({r["relpath"] for r in recs}) == 1000
    assert all(r["status"] == "ok" for r in recs)
    lines = (settings.results_path / "run.jsonl").read_text().splitlines()
    assert len(lines) == 1000  # the file copy has every attempt too


def test_checkpoint_rewritten_during_its_evaluation_is_not_scored_as_the_old_version(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts, marker = tmp_path / "ckpts", tmp_path / "started"
    add_watch(conn, settings, ckpts, fn="slow")
    workers.start("watch")
    workers.start("eval", {"EVAL_MARKER": str(marker), "EVAL_SECONDS": "2"})
    last = ckpts / "last.ckpt"
    last.write_bytes(torch_bytes(1))
    wait_for(lambda: marker.exists(), 20, what="the first evaluation to start")
    last.write_bytes(torch_bytes(2, size=5000))  # the trainer saves again mid-evaluation
    wait_for(lambda: len(final_results(conn, "run")) == 2, 30, what="both versions to end")
    by_status = {r["status"]: r for r in final_results(conn, "run")}
    assert set(by_status) == {"missing", "ok"}
    assert "while it was being evaluated" in by_status["missing"]["error"]
    assert by_status["ok"]["metrics"]["size"] == len(torch_bytes(2, size=5000))


def test_watches_file_is_loaded_by_watch_workers_and_a_bad_entry_does_not_block_the_rest(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    good, later = tmp_path / "good", tmp_path / "later"
    good.mkdir()
    (good / "old.pt").write_bytes(torch_bytes(0))
    watches_file = tmp_path / "watches.yaml"
    watches_file.write_text(
        "watches:\n"
        f"  - name: good\n    directory: {good}\n    evaluator: {evaluator_ref('record')}\n"
        f"  - name: broken\n    directory: {good}\n    evaluator: {tmp_path}/missing.py:evaluate\n"
        f"  - name: later\n    directory: {later}\n    evaluator: {evaluator_ref('record')}\n    eval_existing: true\n"
    )
    workers.start("watch", {"ASSAYER_WATCHES_FILE": str(watches_file)})
    workers.start("eval")
    assert sorted(keys.text(n) for n in conn.hkeys(keys.WATCHES)) == ["good", "later"]
    (good / "new.pt").write_bytes(torch_bytes(1))
    later.mkdir()  # training creates its output directory after the watch was declared
    (later / "first.pt").write_bytes(torch_bytes(2))
    wait_for(lambda: final_results(conn, "good") and final_results(conn, "later"), 20, what="both watches evaluated")
    assert [r["relpath"] for r in final_results(conn, "good")] == ["new.pt"]  # old.pt was there before: baseline
    assert "missing.py does not exist" in workers.logs()
