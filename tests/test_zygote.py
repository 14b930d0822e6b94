"""The zygote's processes behave as ``python -m assayer`` does: output, exit status, signals, working directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import redis
import zygote
from harness import ROOT, env_for, run_assayer, wait_for

from assayer import keys
from assayer.settings import Settings


def fresh(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assayer", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_forked_command_prints_and_exits_as_a_fresh_interpreter_does(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")} | {"ASSAYER_HOME": str(tmp_path)}
    for args in (["--version"], ["no-such-command"], ["watch", "add", str(tmp_path / "missing"), "-e", "m.fn"]):
        a, b = fresh(args, env), run_assayer(args, env, timeout=60)
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), args
    assert [fresh(args, env).returncode for args in (["--version"], ["no-such-command"])] == [0, 2]


def test_a_forked_worker_takes_its_environment_and_directory_and_dies_of_the_signal_sent(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    proc = zygote.spawn(["worker", "eval"], env_for(settings), ROOT, tmp_path / "eval.log")
    wait_for(lambda: conn.exists(keys.health("eval", socket.gethostname(), proc.pid)), 20,
             what="the worker to report healthy to the Redis of ASSAYER_REDIS_URL")
    assert os.readlink(f"/proc/{proc.pid}/cwd") == str(ROOT) and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL and proc.poll() == -signal.SIGKILL
    assert "started with PID" in (tmp_path / "eval.log").read_text()
