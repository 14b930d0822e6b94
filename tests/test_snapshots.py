"""Snapshots (``--snapshot``): a checkpoint pinned before it is queued survives the trainer's rotation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
from harness import RedisServer, Workers, burst, final_results, invoke, wait_for
from writers import torch_bytes

from assayer import jobs, keys, ledger, snapshots, watches
from assayer.settings import Settings

EVALUATOR = '''
import json, os, time

def evaluate(path, ctx):
    time.sleep(float(os.environ.get("SNAP_SECONDS", "0")))
    with open(os.environ["SNAP_LOG"], "a") as fh:
        fh.write(json.dumps({"path": path, "original": ctx.original_path}) + "\\n")
    return {"size": os.path.getsize(path)}
'''


def evaluator(tmp_path: Path) -> str:
    path = tmp_path / "snap_eval.py"
    path.write_text(EVALUATOR)
    return f"{path}:evaluate"


def add(conn: redis.Redis, settings: Settings, ckpts: Path, refs: list[str], mode: str = "auto",
        snapshot_dir: Path | None = None, when_full: str = "wait") -> watches.WatchSpec:
    ckpts.mkdir(parents=True, exist_ok=True)
    spec, _ = watches.build_spec(str(ckpts), refs, name="run", snapshot=watches.Snapshot(
        mode, str(snapshot_dir) if snapshot_dir else None, when_full))
    watches.register(conn, settings, spec)
    return spec


def pinned_dirs(settings: Settings, snapshot_dir: Path | None = None) -> list[str]:
    folder = snapshots.root(settings, "run", str(snapshot_dir) if snapshot_dir else None)
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_link_pins_without_copying_and_copy_is_bounded(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpts" / "step-1.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(torch_bytes(1, size=50_000))
    version = f"{os.stat(ckpt).st_ino:x}-{os.stat(ckpt).st_size:x}-{os.stat(ckpt).st_mtime_ns:x}"
    pin = snapshots.make(conn, settings, "run", str(ckpt), "step-1.pt", version, "link")
    assert pin.mode == "link" and pin.size == 0 and os.stat(pin.path).st_ino == os.stat(ckpt).st_ino
    ckpt.unlink()  # the trainer's rotation: the data stays alive through the link
    assert os.path.getsize(pin.path) > 100_000 and pin.pinned_version == version

    ckpt.write_bytes(torch_bytes(2, size=50_000))
    st = os.stat(ckpt)
    version = f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
    tight = Settings(redis_url=settings.redis_url, home=settings.home, snapshot_max_gb=st.st_size / 2 / 1024**3)
    with pytest.raises(snapshots.CacheFull, match="ASSAYER_SNAPSHOT_MAX_GB"):
        snapshots.make(conn, tight, "run", str(ckpt), "step-1.pt", version, "copy")
    assert [n for n in pinned_dirs(settings) if n.startswith(snapshots.TMP_PREFIX)] == []  # nothing half-made
    copied = snapshots.make(conn, settings, "run", str(ckpt), "step-1.pt", version, "copy")
    assert copied.mode == "copy" and copied.size == st.st_size and os.stat(copied.path).st_ino != st.st_ino
    with pytest.raises(FileNotFoundError):  # rewritten since it was seen: never pinned under the old version
        snapshots.make(conn, settings, "run", str(ckpt), "step-1.pt", "0-0-0", "copy")


def test_link_across_filesystems_falls_back_to_copy_in_auto_and_is_refused_in_link(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(other).st_dev != os.stat(tmp_path).st_dev, "needs /dev/shm on another filesystem"
        ckpt = tmp_path / "step-1.pt"
        ckpt.write_bytes(torch_bytes(1))
        st = os.stat(ckpt)
        version = f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
        pin = snapshots.make(conn, settings, "run", str(ckpt), "step-1.pt", version, "auto", str(other))
        assert pin.mode == "copy" and Path(pin.path).read_bytes() == ckpt.read_bytes()
        with pytest.raises(snapshots.SnapshotError, match="--snapshot copy"):
            snapshots.make(conn, settings, "run", str(ckpt), "step-1.pt", version, "link", str(other))
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.slow
def test_a_rotated_checkpoint_is_evaluated_from_its_snapshot_and_the_pin_released_after_the_last_evaluator(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, ckpts = tmp_path / "evals.jsonl", tmp_path / "ckpts"
    second = tmp_path / "second.py"
    second.write_text(EVALUATOR)
    add(conn, settings, ckpts, [f"first={evaluator(tmp_path)}", f"second={second}:evaluate"])
    env = {"SNAP_LOG": str(log), "SNAP_SECONDS": "1"}
    workers.start("watch", env)
    for step in (1, 2, 3):
        (ckpts / f"step-{step}.pt").write_bytes(torch_bytes(step))
    wait_for(lambda: conn.hlen(keys.pins("run")) == 3, 20, what="three checkpoints pinned")
    for step in (1, 2):
        (ckpts / f"step-{step}.pt").unlink()  # rotated away before any evaluation started
    workers.start("eval", env)
    wait_for(lambda: len(final_results(conn, "run")) == 6, 60, what="3 checkpoints x 2 evaluators")
    recs = final_results(conn, "run")
    assert all(r["status"] == "ok" for r in recs), [(r["relpath"], r["error"]) for r in recs]
    assert {r["checkpoint"] for r in recs} == {str(ckpts / f"step-{s}.pt") for s in (1, 2, 3)}  # the originals
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(c["path"] != c["original"] and c["original"].startswith(str(ckpts)) for c in calls)
    wait_for(lambda: conn.hlen(keys.pins("run")) == 0 and pinned_dirs(settings) == [], 20,
             what="every pin released once both evaluators ended")


def test_a_checkpoint_deleted_before_pinning_ends_missing_and_pins_nothing(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    spec = add(conn, settings, ckpts, [evaluator(tmp_path)])
    (ckpts / "step-1.pt").write_bytes(torch_bytes(1))
    ready = spec.scanner(settings).scan(time.time() + 60).ready
    (ckpts / "step-1.pt").unlink()  # between the scan that found it and its pinning
    rt = jobs.Runtime(settings, conn)
    current = ledger.versions(spec)
    pinned = jobs._pin(rt, spec, ready, current)
    assert pinned.pins == {} and pinned.waiting == set()
    ledger.enqueue_new(conn, settings, spec, ready, current=current, pins=pinned.pins)
    burst(settings, conn)  # an in-process eval worker
    (rec,) = final_results(conn, "run")
    assert rec["status"] == "missing" and conn.hlen(keys.pins("run")) == 0 and pinned_dirs(settings) == []


def test_checkpoints_pinned_by_one_scan_count_together_against_the_cache_limit(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """Two checkpoints found by the same scan: the second is refused when both would pass the limit."""
    from assayer.dirs import version_of_path
    from assayer.scan import Candidate

    ckpts = tmp_path / "ckpts"
    spec = add(conn, settings, ckpts, [evaluator(tmp_path)], mode="copy", when_full="skip")
    ready = []
    for n in (1, 2):
        (ckpts / f"step-{n}.pt").write_bytes(torch_bytes(n))
        path = str(ckpts / f"step-{n}.pt")
        ready.append(Candidate(path, f"step-{n}.pt", version_of_path(path), n))
    size = (ckpts / "step-1.pt").stat().st_size
    limited = dataclasses.replace(settings, snapshot_max_gb=1.5 * size / 1024**3)
    pinned = jobs._pin(jobs.Runtime(limited, conn), spec, ready, ledger.versions(spec))
    assert list(pinned.pins) == ["step-1.pt"] and list(pinned.skipped) == ["step-2.pt"]
    assert "ASSAYER_SNAPSHOT_MAX_GB" in pinned.skipped["step-2.pt"]
    for pin in pinned.pins.values():
        snapshots.discard(pin)


@pytest.mark.slow
def test_a_full_cache_makes_new_checkpoints_wait_or_be_skipped_and_status_says_so(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    size = len(torch_bytes(1))
    add(conn, settings, ckpts, [evaluator(tmp_path)], mode="copy")
    env = {"SNAP_LOG": str(tmp_path / "evals.jsonl"), "ASSAYER_SNAPSHOT_MAX_GB": str(1.5 * size / 1024**3)}
    workers.start("watch", env)
    (ckpts / "step-1.pt").write_bytes(torch_bytes(1))
    wait_for(lambda: conn.hlen(keys.pins("run")) == 1, 20, what="step-1 pinned")
    (ckpts / "step-2.pt").write_bytes(torch_bytes(2))  # no room: waits, unqueued
    wait_for(lambda: keys.text(conn.hget(keys.watch_state("run"), "snapshot_waiting") or b"").startswith(
        "snapshot cache full"), 20, what="status to say step-2 waits for room")
    status = invoke(settings, "status").stdout
    assert "snapshot cache full: waiting step-2.pt" in status and "1 pinned" in status
    assert conn.hlen(keys.pins("run")) == 1 and len(conn.hkeys(keys.ledger("run"))) == 1
    fast = workers.start("eval", env)  # step-1 evaluated, its pin released: room for step-2
    wait_for(lambda: len([r for r in final_results(conn, "run") if r["status"] == "ok"]) == 2, 60,
             what="both evaluated, step-2 once there was room")

    # --when-full skip: recorded at once as skipped, never waiting
    out = invoke(settings, "watch", "add", str(ckpts), "--name", "run", "-e", evaluator(tmp_path), "--snapshot",
                 "copy", "--when-full", "skip")
    assert out.returncode == 0, out.stderr
    fast.send_signal(signal.SIGTERM)  # only a slow worker from here: step-3's pin holds while step-4 comes
    fast.wait(30)
    slow_env = env | {"SNAP_SECONDS": "5"}
    workers.start("eval", slow_env)
    # The watch releases a pin at its next sweep after the evaluation: until then step-2's would pass for step-3's.
    wait_for(lambda: conn.hlen(keys.pins("run")) == 0, 20, what="step-1's and step-2's pins released")
    (ckpts / "step-3.pt").write_bytes(torch_bytes(3))
    wait_for(lambda: conn.hlen(keys.pins("run")) == 1, 20, what="step-3 pinned")
    (ckpts / "step-4.pt").write_bytes(torch_bytes(4))
    wait_for(lambda: any(r["relpath"] == "step-4.pt" for r in final_results(conn, "run")), 30, what="step-4 recorded")
    (rec,) = [r for r in final_results(conn, "run") if r["relpath"] == "step-4.pt"]
    assert rec["status"] == "skipped" and "ASSAYER_SNAPSHOT_MAX_GB" in rec["error"]


def test_debris_of_a_killed_pinning_and_of_a_removed_watch_is_cleaned_up(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    ckpts = tmp_path / "ckpts"
    spec = add(conn, settings, ckpts, [evaluator(tmp_path)], mode="copy")
    (ckpts / "step-1.pt").write_bytes(torch_bytes(1))
    ready = spec.scanner(settings).scan(time.time() + 60).ready
    rt = jobs.Runtime(settings, conn)
    pinned = jobs._pin(rt, spec, ready, ledger.versions(spec))
    ledger.enqueue_new(conn, settings, spec, ready, pins=pinned.pins)  # a recorded pin, its job queued
    folder = snapshots.root(settings, "run")
    # A watch worker killed -9 mid-copy leaves its temporary directory, and one killed after the copy but
    # before its queueing transaction leaves a finished directory that no record names.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = folder / f"{snapshots.TMP_PREFIX}{os.uname().nodename}-{dead.pid}-0123456789ab-abcdef"
    half.mkdir()
    orphan = folder / "0123456789ab-fedcba"
    orphan.mkdir()
    old = time.time() - snapshots.DEBRIS_AFTER - 5
    os.utime(orphan, (old, old))
    snapshots.release_done(conn, settings)
    assert os.listdir(folder) == [pinned.pins["step-1.pt"].name]  # the live pin stays
    invoke(settings, "watch", "remove", "run")
    snapshots.release_done(conn, settings)
    assert not folder.exists() and conn.exists(keys.pins("run")) == 0  # no pin outlives its watch


@pytest.mark.slow
def test_kill_9_of_the_watch_worker_mid_pin_leaks_nothing_and_evaluates_once(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    log, ckpts = tmp_path / "evals.jsonl", tmp_path / "ckpts"
    ckpts.mkdir()
    spec, _ = watches.build_spec(str(ckpts), [evaluator(tmp_path)], name="run", ready_markers=["COMMITTED"],
                                 snapshot=watches.Snapshot("copy"))
    watches.register(conn, settings, spec)
    step = ckpts / "step-1"
    step.mkdir()
    for i in range(3000):  # many members: the copy takes long enough to be caught in the middle
        (step / f"shard-{i:05d}.bin").write_bytes(os.urandom(2048))
    (step / "COMMITTED").write_text("")
    env = {"SNAP_LOG": str(log)}
    folder = snapshots.root(settings, "run")
    watch = workers.start("watch", env)

    def pinning() -> bool:
        return folder.exists() and any(n.startswith(snapshots.TMP_PREFIX) for n in os.listdir(folder))

    wait_for(pinning, 30, interval=0.005, what="the copy under way")
    workers.kill9(watch)  # mid-copy: a half-made snapshot, no record, nothing queued
    assert conn.hlen(keys.pins("run")) == 0 and conn.scard(keys.pending("run")) == 0
    workers.start("watch", env)  # cleans the debris up, pins again, queues once
    workers.start("eval", env)
    wait_for(lambda: len(final_results(conn, "run")) == 1, 60, what="step-1 evaluated")
    (rec,) = final_results(conn, "run")
    assert rec["status"] == "ok" and rec["checkpoint"] == str(step)
    wait_for(lambda: conn.hlen(keys.pins("run")) == 0 and os.listdir(folder) == [], 30,
             what="the pin released and the killed worker's half copy removed")
    assert len(log.read_text().splitlines()) == 1  # evaluated once


@pytest.mark.slow
def test_pins_survive_a_redis_restart_and_each_checkpoint_is_evaluated_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    settings = Settings(redis_url=server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.5, lease_ttl=6,
                        heartbeat_interval=1.0, reap_interval=0.5)
    conn = redis.Redis.from_url(server.url)
    logs = tmp_path / "logs"
    logs.mkdir()
    w = Workers(settings, logs)
    log, ckpts = tmp_path / "evals.jsonl", tmp_path / "ckpts"
    env = {"SNAP_LOG": str(log)}
    try:
        add(conn, settings, ckpts, [evaluator(tmp_path)], mode="copy")
        w.start("watch", env)
        for step in (1, 2, 3):
            (ckpts / f"step-{step}.pt").write_bytes(torch_bytes(step))
        wait_for(lambda: conn.hlen(keys.pins("run")) == 3, 20, what="three checkpoints pinned")
        for step in (1, 2, 3):
            (ckpts / f"step-{step}.pt").unlink()  # rotated away: only the pins hold them now
        server.restart()  # AOF: the pins' records and their queued jobs come back
        conn = redis.Redis.from_url(server.url)
        assert conn.hlen(keys.pins("run")) == 3 and len(pinned_dirs(settings)) == 3
        w.start("eval", env)
        wait_for(lambda: len(final_results(conn, "run")) == 3, 60, what="the three evaluated from their pins")
        assert all(r["status"] == "ok" for r in final_results(conn, "run"))
        wait_for(lambda: conn.hlen(keys.pins("run")) == 0 and pinned_dirs(settings) == [], 30,
                 what="every pin released, none leaked")
        assert len(log.read_text().splitlines()) == 3  # nothing evaluated twice
    except BaseException:
        print(w.logs())
        raise
    finally:
        w.kill_all()
        server.stop()
