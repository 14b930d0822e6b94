"""Test harness: a real redis-server, real worker processes, the CLI in or out of process, and condition waiters.

Fixtures are in conftest. Everything here is safe under pytest-xdist: ports are probed, never fixed,
and every path a test writes lies under its own tmp_path.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import zygote
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from assayer import defaults, keys
from assayer.rq_internals import queue_key
from assayer.settings import Settings
from assayer.stack import redis_binary

ROOT = Path(__file__).resolve().parent.parent
EVALUATORS = Path(__file__).resolve().parent / "evaluators.py"


PORTS = range(20_000, 32_000)
"""Where free_port looks: below Linux's ephemeral range (32768-60999), so no outgoing connection of
any process takes the port between the probe and the server's bind."""

PORTS_PER_WORKER = 500
"""Each pytest-xdist worker (gw0, gw1, ...) probes its own slice of PORTS: a port one worker handed
out cannot be handed out by another before its server binds it."""


def _own_ports() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = PORTS.start + index % (len(PORTS) // PORTS_PER_WORKER) * PORTS_PER_WORKER
    return range(start, start + PORTS_PER_WORKER)


_next_port = itertools.count(random.randrange(PORTS_PER_WORKER))  # round robin: not the same port twice in a row


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, from this worker's slice, in turn."""
    ports = _own_ports()
    for _ in range(len(ports)):
        port = ports[next(_next_port) % len(ports)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that ``build`` fills once per test run, shared by every pytest-xdist worker.

    For expensive, read-only material (a real training run): the first worker that asks builds it
    under a lock, the others wait for it and reuse it. Tests read it and never change it (copy it
    to change it). pytest-xdist's docs advise this for data a session fixture would build per worker.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own directory, above each worker's basetemp
    path, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # left half-built by a worker whose build failed
            path.mkdir(parents=True)
            build(path)
            done.touch()
    return path


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


class RedisServer:
    """A real redis-server in its own directory, on a free port; can be restarted on the same port.

    With ``aof`` (the default) every write is in its append-only file before Redis answers (``appendfsync
    always``), so a restart loses nothing. Without it, nothing is written to disk: for the test session's
    shared server, which is never restarted, where an fsync per write cost about 0.2 ms
    (redis-benchmark: 0.21 ms a SET, against 0.045 without).
    """

    def __init__(self, workdir: Path, aof: bool = True) -> None:
        self.dir = workdir
        self.aof = aof
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # another process may bind the probed port first: probe again
            self.port = free_port()
            if self.start(must=False):
                return
        raise RuntimeError(f"redis-server did not start in 5 tries; see {self.dir / 'redis.log'}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, must: bool = True) -> bool:
        """Start on ``self.port``; False (or, with ``must``, an error) when the port was taken meanwhile."""
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             *(["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]),
             "--save", "", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with redis.Redis(port=self.port, socket_connect_timeout=2) as client:
            # Ours answers with our pid: a ping alone would also be answered by a server someone else started there.
            state = wait_for(lambda: self._state(client), 20, what=f"redis-server to start on port {self.port}")
        if state == "ours":
            return True
        self.proc.wait(10)
        if must:
            raise RuntimeError(f"redis-server could not bind port {self.port} again; see {self.dir / 'redis.log'}")
        return False

    def _state(self, client: redis.Redis) -> str | None:
        assert self.proc is not None
        with contextlib.suppress(redis.RedisError):  # not up yet, or something else answers on the port
            if int(client.info("server")["process_id"]) == self.proc.pid:
                return "ours"
        if self.proc.poll() is not None:
            return "exited"
        return None

    def stop(self) -> None:
        """A clean shutdown, as an init system asks for one: SIGTERM (the append-only file is synced first).

        Not the SHUTDOWN command: redis-py takes the closed connection for a failure and retries it with
        backoff, 3-4 s before it gives up on a server that is long gone.
        """
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


def tcp_ends(pid: int) -> set[str]:
    """The local ends (``ip:port``, as Redis's CLIENT LIST shows its peers) of process ``pid``'s IPv4 TCP sockets."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    ends = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ip, port = fields[1].split(":")
            ends.add(f"{socket.inet_ntoa(struct.pack('<I', int(ip, 16)))}:{int(port, 16)}")
    return ends


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update({
        "ASSAYER_REDIS_URL": settings.redis_url, "ASSAYER_HOME": str(settings.home),
        "ASSAYER_POLL_INTERVAL": str(settings.poll_interval), "ASSAYER_SETTLE": str(settings.settle),
        "ASSAYER_RETRIES": str(settings.retries), "ASSAYER_RETRY_BACKOFF": ",".join(map(str, settings.retry_backoff)),
        "ASSAYER_LEASE_TTL": str(settings.lease_ttl), "ASSAYER_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "ASSAYER_REAP_INTERVAL": str(settings.reap_interval), "ASSAYER_EVAL_TIMEOUT": str(settings.eval_timeout),
        "ASSAYER_SCAN_LEASE": str(settings.scan_lease), "ASSAYER_QUIET_AFTER": str(settings.quiet_after),
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
    })
    return env


def run_assayer(args: Sequence[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m assayer ARGS`` in a real process (forked by :mod:`zygote`), as ``subprocess.run`` with
    ``capture_output=True, text=True`` would run it in ROOT."""
    with tempfile.TemporaryDirectory(prefix="assayer-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = zygote.spawn(list(args), env, ROOT, out, err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, code, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def run_cli(settings: Settings, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``assayer ARGS`` in a real process, with the environment of ``settings``.

    For what only a process shows: exit codes set by signals, logging as configured at start, a
    server that must listen. Everything else runs in process, with :func:`invoke` (much cheaper).
    """
    return run_assayer(args, env or env_for(settings), timeout)


@dataclass(frozen=True)
class CliResult:
    """What :func:`invoke` saw; the same fields as the ``subprocess.CompletedProcess`` of :func:`run_cli`."""

    returncode: int
    stdout: str
    stderr: str


def invoke(settings: Settings, *args: str, env: dict[str, str] | None = None) -> CliResult:
    """``assayer ARGS`` in this process (click's CliRunner), with the environment of ``settings``.

    It goes through ``assayer.cli.main``, so errors map to exit codes and ``fix:`` lines as in a
    real run; only ``ASSAYER_*`` variables of ``env`` (default: ``env_for(settings)``) are set,
    and any other ``ASSAYER_*`` variable is unset for the call.
    """
    from click.testing import CliRunner

    from assayer.cli import main

    wanted = {k: v for k, v in (env or env_for(settings)).items() if k.startswith("ASSAYER_")}
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ASSAYER_") and k not in wanted}
    with CliRunner().isolation(env={**unset, **wanted}) as (out, err, _):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


class Workers:
    """Real ``assayer worker`` processes (forked by :mod:`zygote`), each with its own log file."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: list[zygote.Forked] = []

    def start(self, role: str, extra_env: dict[str, str] | None = None) -> zygote.Forked:
        env = env_for(self.settings) | (extra_env or {})
        proc = zygote.spawn(["worker", role], env, ROOT, self.logdir / f"{role}-{len(self.procs)}.log")
        self.procs.append(proc)
        with redis.Redis.from_url(self.settings.redis_url) as conn:
            wait_for(lambda: conn.exists(keys.health(role, socket.gethostname(), proc.pid)) or proc.poll(),
                     60, what=f"{role} worker {proc.pid} to report healthy")
        assert proc.poll() is None, f"{role} worker {proc.pid} exited with {proc.returncode}:\n{self.logs()}"
        return proc

    def kill9(self, proc: zygote.Forked) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout: float = 30) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill_all(self) -> None:
        """Cleanup after a test: kill -9 what is left (its evaluator processes die with it, PR_SET_PDEATHSIG).

        A warm stop of an idle eval worker takes up to half a second, and longer under load, after every test.
        The warm stop itself is what :meth:`stop_all` and the shutdown tests (test_failures, test_compat,
        test_stack, test_warm_limit) exercise; kill -9 is what test_failures and test_races exercise.
        """
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logdir.glob("*.log")))


def completed_scans(conn: redis.Redis, watch: str, since: float, queue: str = defaults.WATCH_QUEUE) -> int:
    """Scan jobs that covered ``watch``, started at or after ``since`` (unix time) and completed.

    Read from rq's finished-job registry of the watch queue, which keeps scan jobs for a minute
    (SCAN_RESULT_TTL): Assayer itself counts no scans (its watch state is written on change only).
    """
    from rq.job import Job
    from rq.registry import FinishedJobRegistry
    from rq.serializers import JSONSerializer

    ids = FinishedJobRegistry(queue, connection=conn, serializer=JSONSerializer).get_job_ids(cleanup=False)
    jobs = Job.fetch_many(ids, connection=conn, serializer=JSONSerializer)
    return sum(1 for job in jobs if job is not None and watch in (job.kwargs or {}).get("names", ())
               and job.started_at is not None and job.started_at.timestamp() >= since)


def wait_for_scans(conn: redis.Redis, watch: str = "run", count: int = 3, timeout: float = 30.0,
                   after: float = 0.0) -> None:
    """Wait until ``count`` scans of ``watch`` that started ``after`` seconds from now or later have completed.

    What a test waits for before it asserts that nothing (more) happened: each of those scans saw
    the directory as it is now and enqueued, in the same job, whatever it found. ``after`` is for
    time-based rules: ``settings.settle`` makes the scans counted ones that came after the settle time.
    Needs a running watch worker.
    """
    since = time.time() + after

    def done() -> bool:
        # A quiet watch is scanned every 30 s, or when inotify reports a change: make it due now, as a
        # change notification does (never later than it was, never re-added once removed).
        conn.zadd(keys.DUE, {watch: time.time()}, xx=True, lt=True)
        return completed_scans(conn, watch, since) >= count

    wait_for(done, timeout + after, interval=0.2, what=f"{count} completed scans of watch {watch}")


def settled(conn: redis.Redis, watch: str = "run", queue: str = defaults.EVAL_QUEUE) -> bool:
    """No evaluation of ``watch`` is queued, running, waiting for a retry or without its final result
    (in ``queue`` or its backfill queue)."""
    return conn.scard(keys.pending(watch)) == 0 and all(
        conn.llen(queue_key(q)) == 0 and conn.zcard(StartedJobRegistry(q, connection=conn).key) == 0
        and conn.zcard(ScheduledJobRegistry(q, connection=conn).key) == 0 for q in (queue, queue + "-backfill"))


def quiet(conn: redis.Redis, watch: str = "run", scans: int = 3, timeout: float = 30.0, after: float = 0.0) -> None:
    """Nothing more will happen to ``watch`` on its own: ``scans`` more scans completed (see
    :func:`wait_for_scans` for ``after``) and every evaluation they could have queued ended."""
    wait_for_scans(conn, watch, scans, timeout, after)
    wait_for(lambda: settled(conn, watch), timeout, what=f"every evaluation of watch {watch} to end")


def burst(settings: Settings, conn: redis.Redis, role: str = "eval", worker_class: type[Any] | None = None) -> bool:
    """Run an Assayer worker of ``role`` (or of ``worker_class``) in this process until its queue is empty (rq's
    burst mode).

    For tests about what an evaluation leaves behind (results, status, the CLI's answers). Kill -9,
    warm shutdown, timeouts and Redis restarts keep real processes (:class:`Workers`). rq installs
    its own SIGINT, SIGTERM and SIGALRM handlers and alarm; they are put back afterwards, so Ctrl-C
    and pytest-timeout still work for the rest of the test.
    """
    from assayer.workers import WORKERS

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    timer, started = signal.getitimer(signal.ITIMER_REAL), time.monotonic()
    try:
        return bool((worker_class or WORKERS[role])(settings, conn).work(burst=True))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(timer[0] - (time.monotonic() - started), 0.001), timer[1])


def scan_now(conn: redis.Redis, settings: Settings, name: str = "run", only: list[str] | None = None) -> list[str]:
    """What a scan of the watch queues, in this process: every complete checkpoint the ledger lacks (``only``:
    these evaluators). Returns the new job ids."""
    from assayer import ledger, watches

    spec = watches.require(conn, name)
    return ledger.enqueue_new(conn, settings, spec, spec.scanner(settings).scan(time.time() + 3600).ready, only=only)


def final_results(conn: redis.Redis, watch: str) -> list[dict[str, Any]]:
    return [json.loads(v) for v in conn.hvals(keys.results(watch))]


def results_by_path(conn: redis.Redis, watch: str = "run") -> dict[str, list[dict[str, Any]]]:
    """Final results of a watch, grouped by checkpoint path (relative to the watch root)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in final_results(conn, watch):
        out.setdefault(rec["relpath"], []).append(rec)
    return out


def hash_json(conn: redis.Redis, key: str, field: str) -> Any:
    """The JSON value of ``field`` in the hash ``key``; fails when the field is not there."""
    raw = conn.hget(key, field)
    assert raw is not None, f"no {field!r} in {key}"
    return json.loads(raw)


def attempts(conn: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(v) for v in conn.lrange(keys.attempts(job_id), 0, -1)]


def evaluator_ref(name: str) -> str:
    return f"{EVALUATORS}:{name}"


def add_watch(conn: redis.Redis, settings: Settings, directory: Path, fn: str = "record", name: str = "run",
              **options: Any) -> str:
    """Register a watch the way ``assayer watch add`` does (validated, baseline taken), creating the directory."""
    from assayer import watches

    directory.mkdir(parents=True, exist_ok=True)
    spec, _ = watches.build_spec(str(directory), evaluator_ref(fn), name=name, **options)
    watches.register(conn, settings, spec)
    return spec.name
