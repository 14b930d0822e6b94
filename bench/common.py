"""What the benchmarks share: a Redis with worker processes in a temp dir, waiting, and the machine's name."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assayer import keys  # noqa: E402
from assayer.settings import Settings  # noqa: E402
from assayer.stack import redis_binary  # noqa: E402

T = TypeVar("T")


def ping(conn: redis.Redis) -> bool:
    """True once the Redis behind ``conn`` answers."""
    try:
        return bool(conn.ping())
    except redis.ConnectionError:
        return False


def wait(cond: Callable[[], T], timeout: float, what: str = "a condition") -> T:
    """Poll ``cond`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


class Stack:
    """A redis-server without persistence and Assayer worker processes at default settings, in a temp dir."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.redis = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.conn = redis.Redis.from_url(self.url)
        wait(lambda: ping(self.conn), 10, "redis-server to answer")
        self.settings = Settings(redis_url=self.url, home=tmp / "home")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
        self.env.update(ASSAYER_REDIS_URL=self.url, ASSAYER_HOME=str(tmp / "home"), ASSAYER_LOG_LEVEL="WARNING",
                        PYTHONPATH=str(ROOT), **(env or {}))
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self, role: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """One ``assayer worker ROLE``, once it reports healthy."""
        log = self.tmp / f"{role}-{len(self.workers)}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", "assayer", "worker", role], env=self.env | (env or {}),
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.workers.append(proc)
        key = keys.health(role, socket.gethostname(), proc.pid)
        wait(lambda: self.conn.exists(key) or proc.poll() is not None, 60, f"{role} worker to start")
        if proc.poll() is not None:
            raise RuntimeError(f"{role} worker exited with {proc.returncode}; see {log}")
        return proc

    def stop_workers(self) -> None:
        for p in self.workers:
            p.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.workers = []

    def close(self) -> None:
        self.stop_workers()
        self.redis.terminate()
        self.redis.wait(10)
