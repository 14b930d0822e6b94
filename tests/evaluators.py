"""Evaluators the tests hand to real eval workers (referenced as tests/evaluators.py:NAME)."""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: a worker loads this file by its path
    from assayer.evaluator import EvalContext

CALLS = 0
LOADED_AT = time.time()  # set once per import: a warm worker keeps it


def record(path: str) -> dict[str, object]:
    """Checks the file is whole (a zip must open and its members read) and reports who evaluated it."""
    global CALLS
    CALLS += 1
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"corrupt member {bad}")
    log = os.environ.get("EVAL_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"path": path, "size": size, "pid": os.getpid()}) + "\n")
    return {"size": size, "calls": CALLS, "pid": os.getpid(), "loaded_at": LOADED_AT}


def with_context(path: str, ctx: EvalContext) -> dict[str, object]:
    return {"watch": ctx.watch, "step": ctx.step, "attempt": ctx.attempt, "same_path": ctx.checkpoint == path}


def slow(path: str) -> dict[str, object]:
    """Takes EVAL_SECONDS (default 3) and leaves a marker when it starts, for kill and shutdown tests."""
    marker = os.environ.get("EVAL_MARKER")
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()} {path}\n")
    time.sleep(float(os.environ.get("EVAL_SECONDS", "3")))
    return record(path)


def boom(path: str) -> dict[str, object]:
    raise RuntimeError(f"cannot evaluate {os.path.basename(path)}")


def not_json(path: str) -> object:
    return object()


def flaky(path: str) -> dict[str, object]:
    """Fails on the first attempt of each file, then succeeds: counts attempts in a file beside it."""
    counter = os.environ["FLAKY_DIR"] + "/" + os.path.basename(path) + ".count"
    n = int(Path(counter).read_text()) + 1 if os.path.exists(counter) else 1
    with open(counter, "w") as fh:
        fh.write(str(n))
    if n == 1:
        from assayer import Retry

        raise Retry("transient failure")
    return {"tries": n}


def crash(path: str) -> dict[str, object]:
    os._exit(3)


def inspect_dir(path: str, ctx: EvalContext) -> dict[str, object]:
    """Opens every safetensors and torch file of a checkpoint (file or directory) and reports what it saw."""
    import torch
    from safetensors import safe_open

    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    tensors = 0
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                tensors += len(list(st.keys()))
        elif f.suffix in (".pt", ".pth", ".ckpt") and zipfile.is_zipfile(f):
            torch.load(f, weights_only=False)
    log = os.environ.get("EVAL_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"path": path, "pid": os.getpid()}) + "\n")
    marker = os.environ.get("EVAL_MARKER")
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()} {path}\n")
        time.sleep(float(os.environ.get("EVAL_SECONDS", "0")))
    return {"is_dir": root.is_dir(), "files": len(files), "tensors": tensors, "layout": ctx.layout, "ctx_step": ctx.step}


def fork_then_die(path: str) -> dict[str, object]:
    """Starts a process that outlives it holding every inherited descriptor (a leaked worker), then dies."""
    pid = os.fork()
    if pid == 0:
        with open(os.environ["ORPHAN_PIDS"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(3600)
        os._exit(0)
    time.sleep(0.2)
    os._exit(7)


def returns_none(path: str) -> None:
    os.path.getsize(path)  # evaluates, then forgets to return its metrics


BROKEN = False


def breaks_its_process_once(path: str) -> dict[str, object]:
    """The first call ever closes stdout, corrupts a global and fails; a process it broke fails every later call."""
    global BROKEN
    if BROKEN:
        raise RuntimeError("this process was left broken by an earlier failure")
    flag = Path(os.environ["FLAKY_DIR"]) / "broken-once"
    if not flag.exists():
        flag.touch()
        BROKEN = True
        sys.stdout.close()
        from assayer import Retry

        raise Retry("a failure that leaves the process broken")
    return {"pid": os.getpid()}


HELD: list[bytes] = []


def holds_memory(path: str) -> dict[str, object]:
    """Keeps HOLD_MIB more MiB alive in the process with each checkpoint (a leak)."""
    HELD.append(b"\x01" * (int(os.environ.get("HOLD_MIB", "64")) << 20))
    return {"pid": os.getpid()}


def scored(path: str, ctx: EvalContext) -> dict[str, object]:
    """Metrics that depend on the checkpoint's size; the step comes from the evaluator (ctx.step)."""
    size = os.path.getsize(path)
    ctx.step = size % 1000
    return {"val_mse": size / 1000.0, "odd": -size / 1000.0, "accuracy": 1000.0 / size}


scored.directions = {"odd": "min"}  # type: ignore[attr-defined]  # the evaluator API: a function attribute


def reports_step(path: str) -> dict[str, object]:
    return {"loss": 0.5, "_step": 4242}


def always_retry(path: str) -> dict[str, object]:
    from assayer import Retry

    raise Retry(f"GPU busy for {os.path.basename(path)}")


def curve(path: str, ctx: EvalContext) -> dict[str, object]:
    """Loss falls and accuracy rises with the step; a checkpoint named bad-* raises."""
    if os.path.basename(path).startswith("bad-"):
        raise ValueError(f"cannot load {os.path.basename(path)}: truncated tensor data")
    step = ctx.step or 1
    return {"loss": round(10.0 / step, 6), "accuracy": round(step / 1000.0, 6)}

