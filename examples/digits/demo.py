"""The newcomer's run behind ``make demo``: train a few epochs while Assayer evaluates each checkpoint.

    .venv/bin/python examples/digits/demo.py [--epochs 6] [--pace 2]

Starts the local stack (``assayer up``), registers a watch on a fresh output directory,
trains the digits CNN, prints each evaluation as it lands, then the results table with the
best checkpoint and a plot of the metrics by step, and stops the stack (``assayer down``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ASSAYER = [sys.executable, "-m", "assayer"]


def assayer(*args: str, capture: bool = False, quiet: bool = False) -> str:
    """Run the assayer CLI; ``capture`` returns its stdout, ``quiet`` shows its output only if it fails."""
    piped = subprocess.PIPE if capture or quiet else None
    done = subprocess.run([*ASSAYER, *args], text=True, stdout=piped, stderr=subprocess.PIPE if quiet else None)
    if done.returncode != 0:
        if quiet:
            sys.stderr.write((done.stdout or "") + (done.stderr or ""))
        raise SystemExit(f"demo: `assayer {' '.join(args)}` exited {done.returncode}")
    return done.stdout or ""


def results(watch: str) -> list[dict[str, Any]]:
    return list(json.loads(assayer("results", watch, "--format", "json", capture=True)))


def finished(out: Path, records: list[dict[str, Any]]) -> bool:
    """Every epoch file has a result, and last.ckpt has one too."""
    done = {Path(r["checkpoint"]).resolve() for r in records}
    epochs = {p.resolve() for p in out.rglob("*.pt")}
    return bool(epochs) and epochs <= done and (out / "last.ckpt").resolve() in done


def show(record: dict[str, Any], out: Path) -> None:
    name = Path(record["checkpoint"]).resolve().relative_to(out.resolve())
    metrics = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in (record["metrics"] or {}).items())
    print(f"  evaluated {name}: {record['status']} {metrics or record.get('error') or ''}", flush=True)


def follow(watch: str, out: Path, train: subprocess.Popen[bytes], timeout: float) -> bool:
    """Print each evaluation as it lands; True once training is done and every checkpoint evaluated."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        records = results(watch)
        for record in records:
            if record["job_id"] not in seen:
                seen.add(record["job_id"])
                show(record, out)
        if train.poll() is not None and finished(out, records):
            return True
        if train.returncode not in (None, 0) or time.monotonic() > deadline:
            print(f"demo: training exited {train.returncode} or evaluations took over {timeout:g} s", file=sys.stderr)
            return False
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pace", type=float, default=2.0, help="seconds between epochs")
    parser.add_argument("--dir", type=Path, default=Path(".assayer/demo"), help="where checkpoints and the plot go")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the evaluations")
    parser.add_argument("--keep-up", action="store_true", help="leave the local stack running afterwards")
    args = parser.parse_args(argv)

    watch = "digits-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.dir / watch).resolve()
    out.mkdir(parents=True)
    plot = args.dir.resolve() / f"{watch}.png"
    print("== starting the local stack (assayer up)", flush=True)
    assayer("up")
    train = None
    try:
        print(f"== watching {out} as {watch!r}", flush=True)
        assayer("watch", "add", str(out), "--name", watch, "--evaluator", f"{HERE / 'eval.py'}:evaluate")
        print(f"== training {args.epochs} epochs, {args.pace:g} s apart", flush=True)
        argv = ["--out", str(out), "--epochs", str(args.epochs), "--pace", str(args.pace)]
        train = subprocess.Popen([sys.executable, str(HERE / "train.py"), *argv])
        if not follow(watch, out, train, args.timeout):
            return 1
        print("== results (best by accuracy)", flush=True)
        assayer("results", watch, "--best", "accuracy")
        assayer("results", watch, "--best", "accuracy", "--plot", str(plot), quiet=True)  # table already shown
        print(f"== plot of the metrics by step: {plot}", flush=True)
        return 0
    finally:
        if train is not None and train.poll() is None:
            train.terminate()
            train.wait()
        if not args.keep_up:
            print("== stopping the local stack (assayer down)", flush=True)
            assayer("down")


if __name__ == "__main__":
    sys.exit(main())
