"""Test harness: a real redis-server, real worker processes, and a condition waiter (fixtures are in conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from assayer.settings import Settings
from assayer.stack import redis_binary

ROOT = Path(__file__).resolve().parent.parent
EVALUATORS = Path(__file__).resolve().parent / "evaluators.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """A real redis-server with AOF in its own directory; can be restarted on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, what="redis-server to start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(redis.ConnectionError):
                redis.Redis(port=self.port).shutdown(nosave=False)
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update({
        "ASSAYER_REDIS_URL": settings.redis_url, "ASSAYER_HOME": str(settings.home),
        "ASSAYER_POLL_INTERVAL": str(settings.poll_interval), "ASSAYER_SETTLE": str(settings.settle),
        "ASSAYER_RETRIES": str(settings.retries), "ASSAYER_RETRY_BACKOFF": ",".join(map(str, settings.retry_backoff)),
        "ASSAYER_LEASE_TTL": str(settings.lease_ttl), "ASSAYER_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "ASSAYER_REAP_INTERVAL": str(settings.reap_interval), "ASSAYER_EVAL_TIMEOUT": str(settings.eval_timeout),
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
    })
    return env


def run_cli(settings: Settings, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``assayer ARGS`` in a real process, with the environment of ``settings``."""
    return subprocess.run([sys.executable, "-m", "assayer", *args], env=env or env_for(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class Workers:
    """Real ``assayer worker`` processes, each with its own log file."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, role: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{role}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        env = env_for(self.settings) | (extra_env or {})
        proc = subprocess.Popen([sys.executable, "-m", "assayer", "worker", role], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        proc.role = role  # type: ignore[attr-defined]
        self.procs.append(proc)
        conn = redis.Redis.from_url(self.settings.redis_url)
        wait_for(lambda: conn.exists(f"assayer:health:{role}:{socket.gethostname()}:{proc.pid}"), 30,
                 what=f"{role} worker {proc.pid} to report healthy")
        return proc

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
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

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logdir.glob("*.log")))


def final_results(conn: redis.Redis, watch: str) -> list[dict[str, Any]]:
    return [json.loads(v) for v in conn.hvals(f"assayer:results:{watch}")]


def results_by_path(conn: redis.Redis, watch: str = "run") -> dict[str, list[dict[str, Any]]]:
    """Final results of a watch, grouped by checkpoint path (relative to the watch root)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in final_results(conn, watch):
        out.setdefault(rec["relpath"], []).append(rec)
    return out


def attempts(conn: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(v) for v in conn.lrange(f"assayer:attempts:{job_id}", 0, -1)]


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
