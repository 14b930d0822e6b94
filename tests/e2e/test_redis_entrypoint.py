"""docker/redis-entrypoint.sh, compose's way of giving Redis its password, run on this machine's own
redis-server: any password works and none reaches a command line. Needs no Docker engine (no e2e mark)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import redis
from e2elib import ROOT, free_port, wait_for

from assayer.stack import redis_binary

ENTRYPOINT = ROOT / "docker" / "redis-entrypoint.sh"
ODD = " d%x \"q\" 's' ,\\ $HOME `id` é\nsecond line "


def entrypoint(tmp_path: Path, password: str | None, *args: str) -> subprocess.Popen[bytes]:
    """The entrypoint, with a ``redis-server`` first on PATH that notes its arguments and execs the real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >"{tmp_path}/argv"\n'
                                          f'exec {redis_binary()} "$@"\n')
    (bin_dir / "redis-server").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", ASSAYER_REDIS_CONF=str(tmp_path / "redis.conf"))
    if password is not None:
        env["ASSAYER_REDIS_PASSWORD"] = password
    return subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.slow
def test_redis_takes_any_password_and_shows_it_on_no_command_line(tmp_path: Path) -> None:
    port = free_port()
    proc = entrypoint(tmp_path, ODD, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "")
    try:
        wait_for(lambda: pings(redis.Redis(port=port, password=ODD)), 15, "redis-server to answer with the password",
                 interval=0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password=ODD.strip()).ping()  # the exact bytes, spaces and newline included
        conf = tmp_path / "redis.conf"
        argv = (tmp_path / "argv").read_text().split("\0")[:-1]
        assert argv == [str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
        # exec'ed: the entrypoint's shell is now redis-server, and the variable is gone from its environment
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "redis-server"
        assert b"d%x" not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and "d%x" not in conf.read_text()
    finally:
        proc.terminate()
        proc.communicate(timeout=15)  # reads and closes both pipes (wait() would leave them to the GC)


@pytest.mark.parametrize(("password", "message"), [
    ("change-me-redis", "ASSAYER_REDIS_PASSWORD is still the placeholder 'change-me-redis'"),
    ("change-me-dashboard", "ASSAYER_REDIS_PASSWORD is still the placeholder 'change-me-dashboard'"),
    ("", "ASSAYER_REDIS_PASSWORD is empty"),
    (None, "ASSAYER_REDIS_PASSWORD is empty"),
])
def test_redis_refuses_to_start_without_a_real_password(tmp_path: Path, password: str | None, message: str) -> None:
    proc = entrypoint(tmp_path, password, "--port", str(free_port()))
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert f"error: {message}" in stderr.decode() and "\n  fix: " in stderr.decode()
    assert not (tmp_path / "redis.conf").exists()
