"""Warm eval worker vs fork-per-job worker, on the same series of digits checkpoints.

    .venv/bin/python bench/warm_eval.py [--n 20] [--device cpu|cuda]

fork: a plain ``rq worker --serializer json`` (rq's forking Worker) runs :func:`fork_job`
      per checkpoint, which imports the evaluator from its file inside the job, as the
      original amoudgl/assayer does: every checkpoint pays for importing torch and
      scikit-learn and for building the dataset and the model.
warm: ``assayer worker watch`` + ``assayer worker eval`` over a watch added with
      ``--eval-existing``: the evaluator stays imported in the eval worker's child process.

Seconds per checkpoint = (last evaluation finished - first evaluation started) / N, from
rq's job timestamps (fork) and from ``assayer results --format json`` (warm). The warm
figure includes its one cold start; "warm, after the first" leaves it out. The bench
starts its own redis-server and never imports torch itself (nor initialises CUDA).
Figures go to stdout and to bench/out/warm_eval.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVALUATOR = ROOT / "examples" / "digits" / "eval.py"
TRAIN = ROOT / "examples" / "digits" / "train.py"
OUT = ROOT / "bench" / "out" / "warm_eval.json"
FORK_QUEUE = "bench-fork"
WATCH = "bench-digits"
TARGETS = {"cpu": 10.0, "cuda": 20.0}
"""Warm must be at least this many times faster per checkpoint than fork-per-job."""


def fork_job(evaluator_file: str, func: str, checkpoint: str) -> Any:
    """The rq job of the fork-per-job mode: import the evaluator afresh, then call it."""
    spec = importlib.util.spec_from_file_location("user_module", evaluator_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func)(checkpoint)


# --- set-up -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*argv, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server ({binary}) did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_checkpoints(folder: Path, n: int) -> list[Path]:
    """N checkpoints from examples/digits/train.py (one per epoch; trained on CPU, as saved)."""
    subprocess.run(
        [sys.executable, str(TRAIN), "--out", str(folder), "--epochs", str(n), "--device", "cpu"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    checkpoints = sorted(folder.rglob("*.pt"))
    assert len(checkpoints) == n, f"train.py wrote {len(checkpoints)} .pt files, expected {n}"
    return checkpoints


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": importlib.metadata.version("torch")}
    info.update(device=device, load_avg_1m=round(os.getloadavg()[0], 2))  # other work on the box skews figures
    if device == "cuda":
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            info["gpu"] = subprocess.run(query, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return info


def check_cuda() -> None:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    if subprocess.run([sys.executable, "-c", probe], check=False).returncode != 0:
        raise SystemExit("--device cuda: torch sees no CUDA device here (is this a CPU build of torch?)")


def span(starts: list[datetime], ends: list[datetime]) -> float:
    return (max(ends) - min(starts)).total_seconds()


def timeline(starts: list[datetime], ends: list[datetime]) -> list[list[float]]:
    """[start, end] of each evaluation in seconds since the first start (for the JSON figures)."""
    t0 = min(starts)
    return [[round((a - t0).total_seconds(), 3), round((b - t0).total_seconds(), 3)] for a, b in zip(starts, ends)]


# --- the two modes ----------------------------------------------------------------------------


def run_fork(url: str, checkpoints: list[Path], env: dict[str, str], timeout: float) -> dict[str, Any]:
    from redis import Redis
    from rq import Queue
    from rq.job import Job, JobStatus

    conn = Redis.from_url(url)
    queue = Queue(FORK_QUEUE, connection=conn, serializer="json")
    jobs = [
        queue.enqueue("warm_eval.fork_job", str(EVALUATOR), "evaluate", str(p), job_timeout=600, result_ttl=-1)
        for p in checkpoints
    ]
    worker_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), env.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "rq.cli", "worker", "--serializer", "json", "--url", url, "--burst", FORK_QUEUE]
    subprocess.run(argv, env=worker_env, cwd=ROOT, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    fetched = Job.fetch_many([j.id for j in jobs], connection=conn, serializer="json")
    done = [j for j in fetched if j is not None and j.get_status() == JobStatus.FINISHED]
    if len(done) < len(jobs):
        raise SystemExit(f"fork mode: {len(jobs) - len(done)} job(s) did not finish; see `rq info --url {url}`")
    times = [(j.started_at, j.ended_at) for j in done]
    starts = sorted(start for start, _ in times if start is not None)
    ends = sorted(end for _, end in times if end is not None)
    if len(starts) < len(done) or len(ends) < len(done):
        raise SystemExit(f"fork mode: rq recorded no start or end time for a finished job; see `rq info --url {url}`")
    seconds = span(starts, ends)
    return {
        "checkpoints": len(done),
        "span_s": seconds,
        "s_per_checkpoint": seconds / len(done),
        "timeline_s": timeline(starts, ends),
        "metrics": {str(p): j.return_value() for p, j in zip(checkpoints, done, strict=True)},
    }


def run_warm(url: str, folder: Path, n: int, env: dict[str, str], timeout: float) -> dict[str, Any]:
    assayer = [sys.executable, "-m", "assayer"]
    add = ["watch", "add", str(folder), "--name", WATCH, "--evaluator", f"{EVALUATOR}:evaluate"]
    subprocess.run([*assayer, *add, "--regex", r"\.pt$", "--eval-existing"], env=env, check=True)
    logs = {role: folder.parent / f"{role}-worker.log" for role in ("eval", "watch")}
    workers = [
        subprocess.Popen([*assayer, "worker", role], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        for role, log in logs.items()
    ]
    try:
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run([*assayer, "results", WATCH, "--format", "json"], env=env, check=True, stdout=subprocess.PIPE)
            records = json.loads(out.stdout)
            if len(records) >= n or time.monotonic() > deadline:
                break
            for (role, log), worker in zip(logs.items(), workers, strict=True):
                if worker.poll() is not None:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise SystemExit(f"warm mode: assayer worker {role} exited {worker.returncode}:\n{tail}")
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.terminate()  # warm shutdown: a running evaluation finishes first
        for worker in workers:
            worker.wait(timeout=60)
    bad = [r for r in records if r.get("status") != "ok"]
    if len(records) < n or bad:
        raise SystemExit(f"warm mode: {len(records)} results of {n}, {len(bad)} not ok: {bad[:1]}")
    starts = sorted(datetime.fromisoformat(r["started_at"]) for r in records)
    ends = sorted(datetime.fromisoformat(r["finished_at"]) for r in records)
    seconds = span(starts, ends)
    after_first = (ends[-1] - ends[0]).total_seconds() / (n - 1) if n > 1 else float("nan")
    return {
        "checkpoints": len(records),
        "span_s": seconds,
        "s_per_checkpoint": seconds / n,
        "first_s": (ends[0] - starts[0]).total_seconds(),
        "s_per_checkpoint_after_first": after_first,
        "timeline_s": timeline(starts, ends),
        "metrics": {r["checkpoint"]: r["metrics"] for r in records},
    }


# --- report ----------------------------------------------------------------------------------


def agree(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    """Both modes ran the same evaluator on the same files: the metrics must match."""
    a = {os.path.realpath(k): v for k, v in a.items()}
    b = {os.path.realpath(k): v for k, v in b.items()}
    return a.keys() == b.keys() and all(abs(a[k][m] - b[k][m]) < 1e-5 for k in a for m in a[k])


def report(fork: dict[str, Any], warm: dict[str, Any], info: dict[str, Any], command: str) -> dict[str, Any]:
    ratio = fork["s_per_checkpoint"] / warm["s_per_checkpoint"]
    ratio_after_first = fork["s_per_checkpoint"] / warm["s_per_checkpoint_after_first"]
    rows = [
        ("fork-per-job", fork["checkpoints"], fork["s_per_checkpoint"], "1.0x"),
        ("warm", warm["checkpoints"], warm["s_per_checkpoint"], f"{ratio:.1f}x"),
        (
            "warm, after the first",
            warm["checkpoints"] - 1,
            warm["s_per_checkpoint_after_first"],
            f"{ratio_after_first:.1f}x",
        ),
    ]
    print(f"\n{'mode':<24}{'checkpoints':>12}{'s/checkpoint':>14}{'ratio':>9}")
    for mode, count, seconds, times in rows:
        print(f"{mode:<24}{count:>12}{seconds:>14.3f}{times:>9}")
    target = TARGETS[info["device"]]
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    print(f"\nmachine: {info['cpu']} ({info['cores']} cores){gpu}, torch {info['torch']}, device {info['device']}")
    print(f"load average (1 min) when the run ended: {info['load_avg_1m']}")
    print(f"target: warm >= {target:.0f}x faster per checkpoint: {'met' if ratio >= target else 'NOT met'}")
    metrics_agree = agree(fork["metrics"], warm["metrics"])
    print(f"metrics of both modes agree: {'yes' if metrics_agree else 'NO'}")
    summary = {k: {key: v for key, v in d.items() if key != "metrics"} for k, d in (("fork", fork), ("warm", warm))}
    return {
        **summary,
        "ratio": ratio,
        "ratio_after_first": ratio_after_first,
        "target": target,
        "target_met": ratio >= target,
        "metrics_agree": metrics_agree,
        "machine": info,
        "command": command,
        "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="checkpoints to evaluate in each mode (default 20)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the evaluator runs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each mode may take")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON figures (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2")
    if args.device == "cuda":
        check_cuda()
    command = " ".join(["python", "bench/warm_eval.py", "--n", str(args.n), "--device", args.device])

    with tempfile.TemporaryDirectory(prefix="assayer-bench-") as tmp:
        work = Path(tmp)
        print(f"training {args.n} digits checkpoints ...", flush=True)
        checkpoints = make_checkpoints(work / "checkpoints", args.n)
        with redis_server(work / "redis") as url:
            env = {
                **os.environ,
                "ASSAYER_REDIS_URL": url,
                "ASSAYER_HOME": str(work / "home"),
                "ASSAYER_LOG_LEVEL": "WARNING",
                "DIGITS_DEVICE": args.device,
            }
            print("fork-per-job: rq worker, evaluator imported in every job ...", flush=True)
            fork = run_fork(url, checkpoints, env, args.timeout)
            print("warm: assayer worker eval, evaluator kept in a warm child ...", flush=True)
            warm = run_warm(url, work / "checkpoints", args.n, env, args.timeout)
        figures = report(fork, warm, machine(args.device), command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 0 if figures["metrics_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
