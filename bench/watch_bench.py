"""Watch-side benchmarks at default settings, printing figures (not pass/fail tests).

    python bench/watch_bench.py latency    # checkpoint complete -> eval started, per completeness path
    python bench/watch_bench.py many       # 100 watched directories served by one watch worker
    python bench/watch_bench.py idle       # CPU of one watch worker over 100 idle watches, 100,000 files
    python bench/watch_bench.py idle300    # CPU of one watch worker over 300 idle watches (inotify on, then off)
    python bench/watch_bench.py dirs       # CPU over one run of 1,000 idle checkpoint directories of 12 files
    python bench/watch_bench.py dirlatency # marker written / last shard complete -> eval started, per layout
    python bench/watch_bench.py fresh      # CPU over 20,000 checkpoints written in the last minutes, handed over
    python bench/watch_bench.py all

Each run starts its own redis-server and real worker processes in a temp directory, and writes
its figures to bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import redis
from common import ROOT, machine, wait

from assayer import keys, watches

NOOP = f"{ROOT / 'bench' / 'evaluators.py'}:noop"
OUT = ROOT / "bench" / "out"
TICKS = os.sysconf("SC_CLK_TCK")


class Stack(common.Stack):
    def add_watch(self, directory: Path, name: str) -> None:
        spec, _ = watches.build_spec(str(directory), NOOP, name=name)
        watches.register(self.conn, self.settings, spec)


def _torch_bytes(seed: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.randn(20_000, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def _safetensors_bytes(seed: int) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.randn(20_000, generator=torch.Generator().manual_seed(seed))})


def _write_slowly(path: Path, data: bytes, chunks: int = 4, pause: float = 0.2) -> float:
    step = len(data) // chunks + 1
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            if i + step < len(data):
                time.sleep(pause)
    return time.time()


def _write_atomically(path: Path, data: bytes) -> float:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return time.time()


WRITERS = {
    "torch zip, written in place": lambda p, i: _write_slowly(p.with_suffix(".pt"), _torch_bytes(i)),
    "safetensors, written in place": lambda p, i: _write_slowly(p.with_suffix(".safetensors"), _safetensors_bytes(i)),
    "torch zip, renamed into place": lambda p, i: _write_atomically(p.with_suffix(".ckpt"), _torch_bytes(i)),
    "unknown format (settle window)": lambda p, i: _write_slowly(p.with_suffix(".state"), os.urandom(200_000)),
}


def _started(conn: redis.Redis, watch: str) -> dict[str, float]:
    return {json.loads(v)["checkpoint"]: datetime.fromisoformat(json.loads(v)["started_at"]).timestamp()
            for v in conn.hvals(keys.results(watch))}


def _summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"n": len(values), "p50": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
            "max": values[-1]}


def bench_latency(tmp: Path, per_kind: int) -> dict[str, Any]:
    stack = Stack(tmp)
    try:
        root = tmp / "ckpts"
        root.mkdir()
        stack.add_watch(root, "latency")
        stack.start("watch")
        stack.start("eval")
        stack.start("eval")
        completed: dict[str, tuple[str, float]] = {}
        jobs = [(kind, i) for kind in WRITERS for i in range(per_kind)]
        random.Random(0).shuffle(jobs)
        for n, (kind, i) in enumerate(jobs):
            path = root / f"sub{n % 3}" / f"step_{n}"
            path.parent.mkdir(exist_ok=True)
            done_at = WRITERS[kind](path, i)
            written = next(p for p in path.parent.iterdir() if p.stem == path.name)
            completed[str(written)] = (kind, done_at)
            time.sleep(random.Random(n).uniform(0.05, 0.6))  # random phase against the poll interval
        wait(lambda: len(_started(stack.conn, "latency")) >= len(completed), 60)
        started = _started(stack.conn, "latency")
        by_kind: dict[str, list[float]] = {}
        for written_path, (kind, done_at) in completed.items():
            by_kind.setdefault(kind, []).append(started[written_path] - done_at)
        result = {kind: _summary(v) for kind, v in by_kind.items()}
        result["all"] = _summary([x for v in by_kind.values() for x in v])
        return result
    finally:
        stack.close()


def bench_many(tmp: Path, n_watches: int = 100) -> dict[str, Any]:
    stack = Stack(tmp)
    try:
        dirs = []
        for i in range(n_watches):
            d = tmp / "runs" / f"run{i:03d}"
            d.mkdir(parents=True)
            stack.add_watch(d, f"run{i:03d}")
            dirs.append(d)
        stack.start("watch")
        stack.start("eval")
        stack.start("eval")
        data = _torch_bytes(0)
        completed = {}
        order = list(range(n_watches))
        random.Random(1).shuffle(order)
        for i in order:
            path = dirs[i] / "step_100.pt"
            completed[str(path)] = _write_atomically(path, data)
            time.sleep(random.Random(i).uniform(0.05, 0.3))
        def all_started() -> dict[str, float]:
            got: dict[str, float] = {}
            for i in range(n_watches):
                got.update(_started(stack.conn, f"run{i:03d}"))
            return got if len(got) >= n_watches else {}
        started = wait(all_started, 60)
        return {"watches": n_watches, "watch_workers": 1,
                **_summary([started[p] - t for p, t in completed.items()])}
    finally:
        stack.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def bench_idle(tmp: Path, seconds: float, n_watches: int = 100, dirs_per_watch: int = 10,
               files_per_dir: int = 100) -> dict[str, Any]:
    stack = Stack(tmp)
    try:
        old = time.time() - 3600
        t0 = time.time()
        for w in range(n_watches):
            root = tmp / "runs" / f"run{w:03d}"
            for d in range(dirs_per_watch):
                folder = root / f"epoch{d:02d}"
                folder.mkdir(parents=True)
                for f in range(files_per_dir):
                    p = folder / f"step_{f:04d}.pt"
                    p.write_bytes(b"\x80\x04checkpoint")
                    os.utime(p, (old, old))
            stack.add_watch(root, f"run{w:03d}")
        setup = time.time() - t0
        watcher = stack.start("watch")
        def all_scanned() -> bool:
            return all(stack.conn.hget(keys.watch_state(f"run{w:03d}"), "last_scan") for w in range(n_watches))
        wait(all_scanned, 120)
        time.sleep(stack.settings.full_scan_interval)  # past the first (cold) full scan of every watch
        w0, r0, t0 = _cpu_seconds(watcher.pid), _cpu_seconds(stack.redis.pid), time.monotonic()
        time.sleep(seconds)
        w1, r1, t1 = _cpu_seconds(watcher.pid), _cpu_seconds(stack.redis.pid), time.monotonic()
        elapsed = t1 - t0
        return {"watches": n_watches, "directories": n_watches * dirs_per_watch,
                "files": n_watches * dirs_per_watch * files_per_dir, "measured_seconds": round(elapsed, 1),
                "watch_worker_cpu_percent": round(100 * (w1 - w0) / elapsed, 2),
                "redis_cpu_percent": round(100 * (r1 - r0) / elapsed, 2), "setup_seconds": round(setup, 1),
                "poll_interval": stack.settings.poll_interval, "full_scan_interval": stack.settings.full_scan_interval}
    finally:
        stack.close()


def _measure_watch_worker(stack: Stack, names: list[str], seconds: float) -> dict[str, Any]:
    """CPU of the watch worker and redis-server over ``seconds``, once every watch had its first full scan."""
    watcher = stack.start("watch")
    wait(lambda: all(stack.conn.hget(keys.watch_state(n), "last_scan") for n in names), 300)
    time.sleep(max(stack.settings.full_scan_interval, 12.0))  # past the first (cold) full scan, and quiet
    w0, r0, t0 = _cpu_seconds(watcher.pid), _cpu_seconds(stack.redis.pid), time.monotonic()
    time.sleep(seconds)
    w1, r1, t1 = _cpu_seconds(watcher.pid), _cpu_seconds(stack.redis.pid), time.monotonic()
    elapsed = t1 - t0
    return {"measured_seconds": round(elapsed, 1), "watch_worker_cpu_percent": round(100 * (w1 - w0) / elapsed, 2),
            "redis_cpu_percent": round(100 * (r1 - r0) / elapsed, 2)}


def bench_idle300(tmp: Path, seconds: float, n_watches: int = 300, files: int = 10) -> dict[str, Any]:
    """300 quiet watches of 10 checkpoints each: change notification (the default), polling only, and as before
    (quiet watches polled at the full poll interval)."""
    old = time.time() - 3600
    names = []
    for w in range(n_watches):
        root = tmp / "runs" / f"run{w:03d}"
        root.mkdir(parents=True)
        for f in range(files):
            p = root / f"step_{f:04d}.pt"
            p.write_bytes(b"\x80\x04checkpoint")
            os.utime(p, (old, old))
        names.append(f"run{w:03d}")
    out: dict[str, Any] = {"watches": n_watches, "files": n_watches * files}
    phases: tuple[tuple[str, dict[str, str]], ...] = (("inotify", {}), ("polling", {"ASSAYER_INOTIFY": "false"}),
              ("every_poll_interval", {"ASSAYER_INOTIFY": "false", "ASSAYER_IDLE_POLL_INTERVAL": "0.5"}))
    for label, env in phases:
        (tmp / label).mkdir()
        stack = Stack(tmp / label, env)
        try:
            for name in names:
                stack.add_watch(tmp / "runs" / name, name)
            out[label] = _measure_watch_worker(stack, names, seconds)
        finally:
            stack.close()
    return out


def bench_fresh(tmp: Path, seconds: float, n_files: int = 20_000, per_dir: int = 100) -> dict[str, Any]:
    """20,000 checkpoints written a minute ago (inside the hot window), already handed over, one watch."""
    recent = time.time() - 60
    run = tmp / "run"
    for i in range(n_files):
        folder = run / f"epoch{i // per_dir:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"step_{i:06d}.pt"
        p.write_bytes(b"\x80\x04checkpoint")
        os.utime(p, (recent, recent))
    stack = Stack(tmp)
    try:
        stack.add_watch(run, "run")
        return {"files": n_files, "directories": n_files // per_dir, **_measure_watch_worker(stack, ["run"], seconds)}
    finally:
        stack.close()


HF_MEMBERS = ("config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
              "rng_state.pth", "training_args.bin", "trainer_state.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json")


def bench_dirs(tmp: Path, seconds: float, n_dirs: int = 1000) -> dict[str, Any]:
    """One run of 1,000 Hugging Face checkpoint directories of 12 files each, all an hour old."""
    weights, state = _safetensors_bytes(0), _torch_bytes(0)
    old = time.time() - 3600
    run = tmp / "run"
    for i in range(n_dirs):
        ckpt = run / f"checkpoint-{(i + 1) * 100}"
        ckpt.mkdir(parents=True)
        for name in HF_MEMBERS:
            data = weights if name.endswith(".safetensors") else state if name.endswith((".pt", ".pth", ".bin")) else b"{}"
            (ckpt / name).write_bytes(data)
            os.utime(ckpt / name, (old, old))
    stack = Stack(tmp)
    try:
        stack.add_watch(run, "run")
        return {"checkpoint_directories": n_dirs, "files": n_dirs * len(HF_MEMBERS),
                **_measure_watch_worker(stack, ["run"], seconds)}
    finally:
        stack.close()


def _dcp_marker(ckpt: Path, seed: int) -> float:
    """torch DCP: every rank's .distcp, then the coordinator's .metadata (written to a temp name, renamed)."""
    ckpt.mkdir(parents=True)
    for rank in range(2):
        _write_slowly(ckpt / f"__{rank}_0.distcp", os.urandom(100_000), chunks=2, pause=0.05)
    return _write_atomically(ckpt / ".metadata", os.urandom(2000))


def _hf_last_shard(ckpt: Path, seed: int) -> float:
    """save_pretrained with shards: the index, the shards, the last one written in place (the one waited for)."""
    ckpt.mkdir(parents=True)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = {"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards[:-1]:
        (ckpt / shard).write_bytes(_safetensors_bytes(seed))
    return _write_slowly(ckpt / shards[-1], _safetensors_bytes(seed + 1))


def _deepspeed_latest(ckpt: Path, seed: int) -> float:
    """DeepSpeed: the tag's model and optimizer states, then ``latest`` naming the tag beside it."""
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(_torch_bytes(seed))
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(_torch_bytes(seed + 1))
    with open(ckpt.parent / "latest", "w") as fh:
        fh.write(ckpt.name)
    return time.time()


DIR_WRITERS = {"dcp (.metadata written last)": ("dcp", "step-{n}", _dcp_marker),
               "hf save_pretrained (last shard complete)": ("hf", "export-{n}", _hf_last_shard),
               "deepspeed (latest written)": ("ds", "global_step{n}", _deepspeed_latest)}


def bench_dirlatency(tmp: Path, per_kind: int) -> dict[str, Any]:
    stack = Stack(tmp)
    try:
        for sub, _, _ in DIR_WRITERS.values():
            (tmp / "runs" / sub).mkdir(parents=True)
            stack.add_watch(tmp / "runs" / sub, sub)
        stack.start("watch")
        stack.start("eval")
        stack.start("eval")
        completed: dict[str, tuple[str, float]] = {}
        order = [(kind, i) for kind in DIR_WRITERS for i in range(per_kind)]
        random.Random(2).shuffle(order)
        for n, (kind, _i) in enumerate(order):
            sub, pattern, write = DIR_WRITERS[kind]
            ckpt = tmp / "runs" / sub / pattern.format(n=(n + 1) * 10)
            completed[str(ckpt)] = (kind, write(ckpt, n))
            time.sleep(random.Random(n).uniform(0.3, 1.0))  # random phase against the poll interval
        def started() -> dict[str, float]:
            got: dict[str, float] = {}
            for sub, _, _ in DIR_WRITERS.values():
                got.update(_started(stack.conn, sub))
            return got if len(got) >= len(completed) else {}
        got = wait(started, 60)
        by_kind: dict[str, list[float]] = {}
        for path, (kind, done_at) in completed.items():
            by_kind.setdefault(kind, []).append(got[path] - done_at)
        result = {kind: _summary(v) for kind, v in by_kind.items()}
        result["all"] = _summary([x for v in by_kind.values() for x in v])
        return result
    finally:
        stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["latency", "many", "idle", "idle300", "dirs", "dirlatency", "fresh", "all"])
    parser.add_argument("--per-kind", type=int, default=15, help="checkpoints per completeness path (latency)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="CPU measuring window (idle)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    runs = ["latency", "dirlatency", "many", "idle", "idle300", "dirs", "fresh"] if args.which == "all" else [args.which]
    for name in runs:
        with tempfile.TemporaryDirectory(prefix=f"assayer-bench-{name}-") as tmp:
            if name in ("latency", "dirlatency"):
                figures = (bench_latency if name == "latency" else bench_dirlatency)(Path(tmp), args.per_kind)
                what = "checkpoint complete" if name == "latency" else "directory checkpoint complete (marker, last shard)"
                print(f"\n{what} -> eval started (seconds; target p50 <= 0.5, max <= 3)")
                print(f"  {'path':42} {'n':>3} {'p50':>6} {'p90':>6} {'max':>6}")
                for kind, f in figures.items():
                    print(f"  {kind:42} {f['n']:>3} {f['p50']:>6.3f} {f['p90']:>6.3f} {f['max']:>6.3f}")
            elif name == "many":
                figures = bench_many(Path(tmp))
                print(f"\n{figures['watches']} watched directories, 1 watch worker: complete -> eval started "
                      f"p50 {figures['p50']:.3f}s, p90 {figures['p90']:.3f}s, max {figures['max']:.3f}s (target p50 <= 1)")
            elif name == "idle300":
                figures = bench_idle300(Path(tmp), args.idle_seconds)
                print(f"\n{figures['watches']} quiet watches ({figures['files']:,} files), one watch worker: "
                      f"{figures['inotify']['watch_worker_cpu_percent']}% of one core with change notification, "
                      f"{figures['polling']['watch_worker_cpu_percent']}% polling only, "
                      f"{figures['every_poll_interval']['watch_worker_cpu_percent']}% when quiet watches are still "
                      f"polled every 0.5 s as before (target < 3%)")
            elif name == "fresh":
                figures = bench_fresh(Path(tmp), args.idle_seconds)
                print(f"\n{figures['files']:,} checkpoints written a minute ago, handed over: watch worker "
                      f"{figures['watch_worker_cpu_percent']}% of one core, redis-server {figures['redis_cpu_percent']}% "
                      "(target < 10%)")
            elif name == "dirs":
                figures = bench_dirs(Path(tmp), args.idle_seconds)
                print(f"\n{figures['checkpoint_directories']:,} idle checkpoint directories ({figures['files']:,} files): "
                      f"watch worker {figures['watch_worker_cpu_percent']}% of one core, redis-server "
                      f"{figures['redis_cpu_percent']}% (target <= 5%)")
            else:
                figures = bench_idle(Path(tmp), args.idle_seconds)
                print(f"\n{figures['watches']} idle watches over {figures['files']:,} files in "
                      f"{figures['directories']:,} directories, {figures['measured_seconds']}s: watch worker "
                      f"{figures['watch_worker_cpu_percent']}% of one core, redis-server "
                      f"{figures['redis_cpu_percent']}% (target <= 10%)")
            (OUT / f"{name}.json").write_text(json.dumps({"machine": machine(), **figures}, indent=2))


if __name__ == "__main__":
    main()
