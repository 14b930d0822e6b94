"""Warm evaluator processes.

An eval worker never runs the user's evaluator in its own process: it starts one long-lived
child per evaluator reference (``python -m assayer.evalhost``), which imports the evaluator
once and then serves checkpoint after checkpoint. Module-level caches (a loaded dataset, a
CUDA context) survive from one checkpoint to the next, the worker itself never initialises
CUDA, and a crash, OOM kill or timeout of the evaluator kills only the child: the worker
records the attempt, retries the job, and starts a fresh child for the next one.

Parent and child talk JSON lines over two dedicated pipes (never stdout, which the evaluator
may print to, and never pickle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("assayer.evalhost")


@dataclass
class Outcome:
    ok: bool
    metrics: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    duration: float = 0.0
    directions: dict[str, str] | None = None  # what the evaluator declared: {metric: "min" | "max"}
    retryable: bool = True  # False for an exception the evaluator raised (unless assayer.Retry)
    step: int | None = None  # what the evaluator reported (ctx.step = ..., or a "_step" metric)


class EvaluatorProcess:
    """One warm child serving one evaluator reference."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.file_mtime = _ref_mtime(ref)
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "assayer.evalhost", ref, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C and supervisor signals go to the worker, which decides
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._beat: Callable[[], None] | None = None
        self.ready: Outcome | None = None
        self.calls = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stale(self) -> bool:
        """True when the evaluator's file changed since this child imported it."""
        return _ref_mtime(self.ref) != self.file_mtime

    def call(self, request: dict[str, Any], timeout: float | None, beat: Callable[[], None] | None = None) -> Outcome:
        """Send ``request`` and wait for the reply, calling ``beat`` every second; kill the child on timeout or death."""
        started = time.monotonic()
        self._beat = beat
        if self.ready is None:
            self.ready = self._read(started, timeout, what="importing the evaluator")
            if not self.ready.ok:
                self.close()
                return self.ready
        try:
            os.write(self._to_child, (json.dumps(request) + "\n").encode())
        except BrokenPipeError:
            return self._died("before the evaluation started")
        outcome = self._read(started, timeout, what="evaluating")
        outcome.duration = time.monotonic() - started
        return outcome

    def _read(self, started: float, timeout: float | None, what: str) -> Outcome:
        while b"\n" not in self._buffer:
            wait = 0.5 if not timeout else max(0.0, min(0.5, started + timeout - time.monotonic()))
            if timeout and time.monotonic() - started >= timeout:
                self.close()
                return Outcome(False, error=f"timed out after {timeout:g} s {what}; the evaluator process was killed")
            if self._beat is not None:
                self._beat()
            readable, _, _ = select.select([self._from_child], [], [], wait)
            if readable:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    return self._died(what)
                self._buffer += chunk
            elif self.proc.poll() is not None:
                # Dead, though a process it started may still hold the reply pipe open: say so now.
                return self._died(what)
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
            step = reply.get("step")
            return Outcome(bool(reply["ok"]), reply.get("metrics"), reply.get("error"), reply.get("traceback"),
                           directions=reply.get("directions") or None, retryable=bool(reply.get("retryable", True)),
                           step=step if isinstance(step, int) and not isinstance(step, bool) else None)
        except (ValueError, KeyError, TypeError):
            self.close()
            return Outcome(False, error=f"the evaluator process sent an unreadable reply while {what}: {line[:200]!r}")

    def _died(self, what: str) -> Outcome:
        code = self.proc.wait()
        self.close()
        if code < 0:
            name = signal.Signals(-code).name
            why = " (SIGKILL: often the kernel's OOM killer)" if -code == signal.SIGKILL else ""
            return Outcome(False, error=f"evaluator process died from {name}{why} while {what}")
        return Outcome(False, error=f"evaluator process exited with code {code} while {what}")

    def rss_mib(self) -> float:
        """Resident memory of the evaluator process (not of processes it started), in MiB."""
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0  # gone, or not Linux: no recycling by memory

    def close(self) -> None:
        """Kill the evaluator and every process of its group, on every exit path (orphans included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives its leader while members remain
        self.proc.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to_child = self._from_child = -1


class EvaluatorPool:
    """Warm children by evaluator reference, at most ``size`` at once (least recently used goes)."""

    def __init__(self, size: int, max_calls: int = 0, max_rss_mib: float = 0) -> None:
        self.size = max(1, size)
        self.max_calls = max_calls
        self.max_rss_mib = max_rss_mib
        self._procs: OrderedDict[str, EvaluatorProcess] = OrderedDict()

    def evaluate(
        self, ref: str, checkpoint: str, context: dict[str, Any], timeout: float | None,
        beat: Callable[[], None] | None = None,
    ) -> Outcome:
        proc = self._procs.pop(ref, None)
        if proc is not None and (not proc.alive() or proc.stale()):
            log.info("restarting evaluator %s (%s)", ref, "changed on disk" if proc.alive() else "process gone")
            proc.close()
            proc = None
        if proc is None:
            while len(self._procs) >= self.size:
                _, oldest = self._procs.popitem(last=False)
                oldest.close()
            proc = EvaluatorProcess(ref)
        outcome = proc.call({"checkpoint": checkpoint, "context": context}, timeout, beat)
        proc.calls += 1
        recycle = self._recycle_reason(proc, outcome)
        if recycle:
            log.info("starting a fresh process for evaluator %s: %s", ref, recycle)
            proc.close()
        elif proc.alive():
            self._procs[ref] = proc
        return outcome

    def _recycle_reason(self, proc: EvaluatorProcess, outcome: Outcome) -> str | None:
        """Why the next checkpoint should get a fresh child, if it should."""
        if not proc.alive():
            return None
        if not outcome.ok:  # a failure may have left broken state (closed stdout, corrupted globals)
            return "the last attempt failed"
        if self.max_calls and proc.calls >= self.max_calls:
            return f"it served {proc.calls} checkpoints (ASSAYER_EVAL_MAX_CALLS)"
        rss = proc.rss_mib() if self.max_rss_mib else 0.0
        if self.max_rss_mib and rss > self.max_rss_mib:
            return f"it holds {rss:.0f} MiB (ASSAYER_EVAL_MAX_RSS {self.max_rss_mib:g})"
        return None

    def prestart(self, ref: str) -> None:
        """Start importing ``ref`` now, so the first checkpoint does not pay for it (while there is room)."""
        if ref not in self._procs and len(self._procs) < self.size:
            self._procs[ref] = EvaluatorProcess(ref)

    def close(self) -> None:
        while self._procs:
            self._procs.popitem()[1].close()


def _ref_mtime(ref: str) -> int | None:
    from .evaluator import parse_ref

    path = parse_ref(ref).file
    try:
        return os.stat(path).st_mtime_ns if path else None  # a float of seconds loses the last few hundred ns
    except OSError:
        return None


# -- the child ----------------------------------------------------------------------------


def to_metrics(value: Any) -> dict[str, Any]:
    """What the evaluator returned, as a JSON object; raise TypeError naming what is wrong."""
    if value is None:
        raise TypeError("the evaluator returned None (a forgotten `return`?); return a dict of metrics, "
                        "e.g. {'accuracy': 0.93}, or {} when there is nothing to report")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": value}
    if not isinstance(value, dict):
        raise TypeError(
            f"the evaluator returned a {type(value).__name__}, not a dict of metrics; "
            "return e.g. {'accuracy': 0.93, 'loss': 0.21}"
        )

    def plain(v: Any, where: str) -> Any:
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
            v = v.item()  # numpy and torch scalars
        if v is None or isinstance(v, (str, bool, int)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            return {str(k): plain(x, f"{where}.{k}") for k, x in v.items()}
        raise TypeError(f"metric {where} is a {type(v).__name__}, which is not JSON; return numbers or strings")

    return {str(k): plain(v, str(k)) for k, v in value.items()}


def _serve(ref: str, inp: int, out: int) -> int:
    from .directions import check_declared
    from .errors import Retry
    from .evaluator import EvalContext, load, takes_context

    def send(message: dict[str, Any]) -> None:
        os.write(out, (json.dumps(message) + "\n").encode())

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        fn = load(ref)
        with_context = takes_context(fn)
        declared = check_declared(getattr(fn, "directions", None))
    except BaseException as exc:
        send({"ok": False, "error": f"evaluator {ref} failed to import: {type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc(), "retryable": False})
        return 1
    send({"ok": True})
    with os.fdopen(inp, "rb") as requests:
        for line in requests:
            request = json.loads(line)
            path = request["checkpoint"]
            try:
                ctx = EvalContext(**request["context"])
                result = fn(path, ctx) if with_context else fn(path)
                metrics = to_metrics(result)
                step = metrics.pop("_step", None)
                if ctx.step != request["context"].get("step"):
                    step = ctx.step  # the evaluator set ctx.step
                if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
                    raise TypeError(f"the reported step must be an integer, not {step!r}")
                send({"ok": True, "metrics": metrics, "directions": declared, "step": step})
            except BaseException as exc:  # the evaluator's error is the job's outcome, not ours
                send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                      "retryable": isinstance(exc, Retry)})
    return 0


def _die_with_parent() -> None:
    """If the worker is SIGKILLed, take the evaluation down too (it would hold a GPU for nothing)."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the child still exits when its request pipe closes
    if os.getppid() != parent:
        os._exit(1)


def main() -> None:
    ref, inp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.exit(_serve(ref, inp, out))



if __name__ == "__main__":
    main()
