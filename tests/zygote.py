"""``python -m assayer ARGS`` processes for the tests, forked from one Python that has Assayer imported.

On 2 cores most of a worker's start is importing redis-py, rq, click and Assayer (about 0.25 s of
CPU), and the tests start a few hundred workers. The zygote, one per pytest-xdist worker, imports
them once; each process it forks is then the same as ``python -m assayer ARGS``: its own pid, the
environment, working directory and output files it was asked for, default signal handlers,
``sys.argv`` and ``sys.path[0]`` as ``-m`` sets them, ``assayer.__main__`` run as ``__main__``, and an
interpreter that exits as Python does (atexit, flushing, the exit status of ``SystemExit`` or of
the signal that killed it). What only a fresh interpreter shows (``python -m assayer`` found on the
path, supervisor's and compose's commands) stays covered by the tests that start the stack
(test_stack, test_compat, e2e).

Run as a script, this file is the zygote: it reads one JSON request per line on stdin, forks, and
writes ``{"id": ..., "pid": ...}`` when it forked and ``{"pid": ..., "status": ...}`` when a child
ended (``status`` as ``subprocess.Popen.returncode`` gives it). Imported, :func:`spawn` asks this
pytest process's zygote (started on first use) for a process and returns a :class:`Forked`, which
has the part of ``subprocess.Popen`` the tests use.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import runpy
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PRELOAD = ("assayer.cli", "assayer.workers", "assayer.jobs", "assayer.evaluator", "assayer.evalhost",
           "rq.worker", "rq.job", "rq.registry", "rq.serializers")
"""What every worker and command imports: the CLI, both kinds of worker and rq's parts they use."""


# --- the zygote (this file run as a script) ----------------------------------------------------

def _serve(requests: int, replies: int) -> dict[str, Any]:
    """Fork a child per request and report its pid, then its end; returns only in a child, its request."""
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD writes to the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in the terminal: pytest ends, then so does this (EOF)
    out = os.fdopen(replies, "w", buffering=1)
    sel = selectors.DefaultSelector()
    sel.register(requests, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    buf, children = b"", set[int]()
    while True:
        for key, _ in sel.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                continue
            chunk = os.read(requests, 65536)
            if not chunk:  # the pytest process ended: end what it left running, as its own exit would not
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                os._exit(0)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
                    out.close()  # the replies pipe: closed through its file object, which would close it again later
                    for fd in (wake_r, wake_w, requests):
                        os.close(fd)
                    return req  # type: ignore[no-any-return]
                children.add(pid)
                out.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            out.write(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}) + "\n")


def _become(req: dict[str, Any]) -> None:
    """Turn this fresh child into ``python -m assayer ARGS`` as ``req`` describes it."""
    with open("/proc/self/comm", "w") as comm:  # what ps shows (15 bytes): "worker eval", not the zygote's "python"
        comm.write(" ".join(req["args"])[:15])
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    stderr = stdout if req["stderr"] is None else os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd, to in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, to)
    for fd in {stdin, stdout, stderr}:
        os.close(fd)
    sys.argv = ["-m", *req["args"]]  # runpy puts the module's path in argv[0], as -m does
    sys.path[0] = os.getcwd()  # -m puts the working directory first, where this script put its own
    runpy.run_module("assayer", run_name="__main__", alter_sys=True)


def _main() -> None:
    for name in PRELOAD:
        __import__(name)
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # nothing but replies on the pipe: a stray print goes to stderr
    os.close(devnull)
    _become(_serve(requests, replies))


# --- the pytest side ---------------------------------------------------------------------------

class Forked:
    """A ``python -m assayer ARGS`` process the zygote forked; what the tests use of ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.status(self.pid)
            if self.returncode is None and self._zygote.gone:
                raise RuntimeError(f"the zygote that forked pid {self.pid} exited: nobody can tell how {self.pid} ends")
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._zygote.changed:
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                self._zygote.changed.wait(left)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never signal a pid that may already be someone else's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """This pytest process's zygote and what it said: the pids it forked and the statuses they ended with."""

    def __init__(self, root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
        env.update({"PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=root)
        self.changed = threading.Condition()
        self._ids = itertools.count()
        self._forked: dict[int, int] = {}
        self._ended: dict[int, int] = {}
        self.gone = False
        self._reader = threading.Thread(target=self._read, name="zygote-replies", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.changed:
                if "id" in reply:
                    self._forked[reply["id"]] = reply["pid"]
                else:
                    self._ended[reply["pid"]] = reply["status"]
                self.changed.notify_all()
        with self.changed:
            self.gone = True  # wake whoever waits on it
            self.changed.notify_all()

    def status(self, pid: int) -> int | None:
        with self.changed:
            return self._ended.pop(pid, None)

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path | None = None,
              timeout: float = 60) -> Forked:
        assert self.proc.stdin is not None
        with self.changed:
            req_id = next(self._ids)
            self.proc.stdin.write(json.dumps({"id": req_id, "args": args, "env": env, "cwd": str(cwd),
                                              "stdout": str(stdout),
                                              "stderr": None if stderr is None else str(stderr)}).encode() + b"\n")
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: req_id in self._forked or self.gone, timeout):
                raise RuntimeError(f"the zygote forked nothing in {timeout} s")
            if req_id not in self._forked:
                raise RuntimeError(f"the zygote exited with {self.proc.wait()}")
            return Forked(self, self._forked.pop(req_id), ["python", "-m", "assayer", *args])

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # it kills what is left and exits
        self.proc.wait(10)
        self._reader.join(10)
        self.proc.stdout.close()


_zygote: Zygote | None = None
_lock = threading.Lock()


def spawn(args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path | None = None) -> Forked:
    """``python -m assayer ARGS``, forked by this pytest process's zygote (started on first use).

    ``stdout`` and ``stderr`` are files the process appends to; without ``stderr``, both go to ``stdout``.
    """
    global _zygote
    with _lock:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = Zygote(cwd)
            atexit.register(_zygote.close)
    return _zygote.spawn(args, env, cwd, stdout, stderr)


if __name__ == "__main__":
    _main()
