"""Rotation vs a slow evaluator: does every saved checkpoint get evaluated? (printed figures, not a test)

    python bench/rotation_bench.py [--saves 12] [--eval-seconds 4] [--save-every 1]

A real ``transformers.Trainer`` on CPU (a GPT-2 of two layers built from a tiny config, a synthetic
dataset) saves a ``checkpoint-N`` directory every step, paced to one save per ``--save-every``
seconds, for ``--saves`` steps. An evaluator (a file in the temp directory) reads the checkpoint's
files, sleeps ``--eval-seconds`` and returns a metric: evaluation is slower than saving. Each
scenario has its own redis-server, one real ``assayer worker watch`` and one real ``assayer worker
eval`` process (default settings):

* ``today``: no snapshot; the Trainer rotates itself with ``save_total_limit=2``.
* ``snapshot``: the same Trainer; the watch has ``--snapshot auto`` (the snapshot directory is in
  the same temp directory, so ``auto`` links). The pins (Redis records) and the snapshot directory
  are sampled every 0.2 s for the cache's peak size.
* ``callback``: ``save_total_limit=None`` and ``AssayerRotationCallback(keep_last=2, final_wait_s=...)``.

After training, the bench waits until no evaluation of the watch lacks a final result (the watch's
pending set stayed empty for 3 s) or a timeout, then counts, per saved checkpoint, its final result.
Writes bench/out/rotation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
import redis
from common import ROOT

from assayer import keys, watches
from assayer.snapshots import Pin

OUT = ROOT / "bench" / "out"
WATCH = "rot"
RUN = "exp1"
EVALUATOR = '''"""Reads the checkpoint's files, then takes EVAL_SECONDS: slower than the Trainer saves."""

import os
import time


def evaluate(path):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    time.sleep(float(os.environ.get("EVAL_SECONDS", "4")))
    return {"bytes": size}
'''


class Stack(common.Stack):
    """One watch and one eval worker evaluating with an evaluator of ``eval_seconds``."""

    def __init__(self, tmp: Path, eval_seconds: float) -> None:
        super().__init__(tmp, {"EVAL_SECONDS": str(eval_seconds)})


def train(output_dir: Path, saves: int, save_every: float, save_total_limit: int | None,
          callbacks: list[Any]) -> list[str]:
    """A real Trainer on CPU saving ``checkpoint-N`` every step, one save per ``save_every`` s; the relpaths saved."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(8) * (i + 1) % 16
            return {"input_ids": ids, "labels": ids}

    saved: list[str] = []

    class Pace(TrainerCallback):
        """Each step lasts ``save_every`` seconds (the save follows on_step_end); records what was saved."""

        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            time.sleep(max(0.0, save_every - (time.monotonic() - self.last)))
            self.last = time.monotonic()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            saved.append(f"{RUN}/checkpoint-{state.global_step}")

    config = GPT2Config(n_layer=2, n_head=2, n_embd=4, vocab_size=16, n_positions=8, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=saves, save_steps=1,
                             save_total_limit=save_total_limit, report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, logging_strategy="no", disable_tqdm=True)
    # Pace first: the step's pause comes before the Trainer saves, and before a rotation callback prunes.
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[Pace(), *callbacks]).train()
    return saved


class Sampler(threading.Thread):
    """Every 0.2 s: the watch's pins (count, recorded bytes) and the snapshot directory's files."""

    def __init__(self, conn: redis.Redis, folder: Path) -> None:
        super().__init__(daemon=True)
        self.conn, self.folder = conn, folder
        self.stop = threading.Event()
        self.peak: dict[str, int] = {"pins": 0, "pins_recorded_bytes": 0, "dir_bytes": 0, "dir_bytes_only_here": 0}
        self.modes: set[str] = set()
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            pins = [Pin.from_json(v) for v in self.conn.hvals(keys.pins(WATCH))]
            self.modes.update(p.mode for p in pins)
            seen: set[int] = set()
            total = only = 0
            for d, _, files in os.walk(self.folder):
                for f in files:
                    try:
                        st = os.lstat(os.path.join(d, f))
                    except FileNotFoundError:
                        continue
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                    total += st.st_size
                    if st.st_nlink == 1:  # the original is gone: only the snapshot keeps these bytes
                        only += st.st_size
            now = {"pins": len(pins), "pins_recorded_bytes": sum(p.size for p in pins), "dir_bytes": total,
                   "dir_bytes_only_here": only}
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            self.samples += 1


def settled(conn: redis.Redis, quiet: float, timeout: float) -> bool:
    """True once no evaluation of the watch lacked a final result for ``quiet`` s; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    empty_since: float | None = None
    while time.monotonic() < deadline:
        if conn.scard(keys.pending(WATCH)) == 0:
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= quiet:
                return True
        else:
            empty_since = None
        time.sleep(0.1)
    return False


def scenario(kind: str, base: Path, saves: int, save_every: float, eval_seconds: float) -> dict[str, Any]:
    tmp = base / kind
    tmp.mkdir()
    (tmp / "evals.py").write_text(EVALUATOR)
    runs = tmp / "runs"
    runs.mkdir()
    snap_dir = tmp / "snapshots"
    stack = Stack(tmp, eval_seconds)
    sampler: Sampler | None = None
    try:
        snapshot = watches.Snapshot("auto", directory=str(snap_dir)) if kind == "snapshot" else None
        spec, _ = watches.build_spec(str(runs), f"{tmp / 'evals.py'}:evaluate", name=WATCH, snapshot=snapshot)
        watches.register(stack.conn, stack.settings, spec)
        stack.start("watch")
        stack.start("eval")
        if kind == "snapshot":
            sampler = Sampler(stack.conn, snap_dir)
            sampler.start()
        callbacks: list[Any] = []
        limit: int | None = 2
        final_wait = saves * eval_seconds + 60
        if kind == "callback":
            from assayer.integrations.hf import AssayerRotationCallback

            callbacks, limit = [AssayerRotationCallback(keep_last=2, final_wait_s=final_wait,
                                                        settings=stack.settings)], None
        t0 = time.monotonic()
        saved = train(runs / RUN, saves, save_every, limit, callbacks)
        train_s = time.monotonic() - t0
        complete = settled(stack.conn, quiet=3.0, timeout=final_wait)
        wall = time.monotonic() - t0
        if sampler:
            sampler.stop.set()
            sampler.join()
        recs = [json.loads(v) for v in stack.conn.hvals(keys.results(WATCH))]
        by_path: dict[str, list[str]] = {}
        for r in recs:
            by_path.setdefault(r["relpath"], []).append(r["status"])
        queued = {keys.text(k) for k in stack.conn.hkeys(keys.ledger(WATCH))}
        ok = [p for p in saved if "ok" in by_path.get(p, [])]
        statuses: dict[str, int] = {}
        for p in saved:
            for s in by_path.get(p, ["(no result)" if p in queued else "(never queued)"]):
                statuses[s] = statuses.get(s, 0) + 1
        left = sorted(os.listdir(runs / RUN)) if (runs / RUN).exists() else []
        out: dict[str, Any] = {
            "scenario": kind, "saved": len(saved), "evaluated_ok": len(ok),
            "ok_pct": round(100 * len(ok) / len(saved), 1) if saved else 0.0,
            "missing": sum(1 for p in saved if "missing" in by_path.get(p, [])),
            "not_ok": len(saved) - len(ok), "statuses": statuses, "all_final": complete,
            "train_s": round(train_s, 1), "wall_s": round(wall, 1),
            "checkpoints_left": [n for n in left if n.startswith("checkpoint-")],
        }
        if sampler:
            out["snapshot"] = {"modes": sorted(sampler.modes), "samples": sampler.samples, "peak": sampler.peak,
                               "pins_left": stack.conn.hlen(keys.pins(WATCH))}
        return out
    finally:
        if sampler and sampler.is_alive():
            sampler.stop.set()
        stack.close()


def show(r: dict[str, Any]) -> None:
    print(f"{r['scenario']:9s} saved {r['saved']:3d}  evaluated ok {r['evaluated_ok']:3d}/{r['saved']} "
          f"({r['ok_pct']:.1f}%)  missing {r['missing']}  statuses {r['statuses']}  "
          f"train {r['train_s']:.1f} s  wall {r['wall_s']:.1f} s  all final: {r['all_final']}")
    if "snapshot" in r:
        s, p = r["snapshot"], r["snapshot"]["peak"]
        print(f"{'':9s} snapshot mode {','.join(s['modes']) or '-'}: peak {p['pins']} pins, "
              f"{p['pins_recorded_bytes']} bytes recorded (links cost none), snapshot dir peak "
              f"{p['dir_bytes'] / 1e6:.2f} MB of which {p['dir_bytes_only_here'] / 1e6:.2f} MB held only by snapshots "
              f"(originals rotated away); {s['pins_left']} pins left at the end ({s['samples']} samples)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=12)
    parser.add_argument("--save-every", type=float, default=1.0)
    parser.add_argument("--eval-seconds", type=float, default=4.0)
    parser.add_argument("--only", choices=("today", "snapshot", "callback"), action="append")
    a = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="assayer-rotation-") as tmp:
        for kind in a.only or ["today", "snapshot", "callback"]:
            r = scenario(kind, Path(tmp), a.saves, a.save_every, a.eval_seconds)
            show(r)
            results.append(r)
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"saves": a.saves, "save_every_s": a.save_every, "eval_seconds": a.eval_seconds, "eval_workers": 1,
           "python": platform.python_version(), "cpus": os.cpu_count(), "scenarios": results}
    (OUT / "rotation.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT / 'rotation.json'}")


if __name__ == "__main__":
    main()
