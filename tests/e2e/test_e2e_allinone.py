"""All-in-one mode: `assayer up --foreground` in one container runs Redis, the workers and the
dashboard under supervisor (a single GPU node, a SLURM allocation); `docker stop` lets the
running evaluation finish."""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from e2elib import (
    ARTIFACTS,
    HERE,
    IMAGE,
    docker_cli,
    engine_running,
    free_port,
    http_status,
    image_present,
    project_name,
    run,
    wait_for,
    write_checkpoint,
)

pytestmark = pytest.mark.e2e

READABLE_DIR = stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def docker_exec(name: str, *cmd: str, check: bool = True) -> str:
    return run([docker_cli(), "exec", name, *cmd], timeout=60, check=check).stdout


def status(name: str) -> dict[str, Any] | None:
    out = run([docker_cli(), "exec", name, "assayer", "status", "--format", "json"], timeout=60, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_all_in_one_container_evaluates_and_stop_lets_the_evaluation_finish() -> None:
    engine_running()
    image_present(IMAGE)
    workdir = Path(tempfile.mkdtemp(prefix="assayer-aio-"))
    checkpoints, results = workdir / "checkpoints", workdir / "results"
    checkpoints.mkdir()
    results.mkdir()
    workdir.chmod(READABLE_DIR)
    checkpoints.chmod(READABLE_DIR)
    results.chmod(0o777)  # the container's uid 10001 writes the JSONL files
    name = project_name() + "-aio"
    port = free_port()
    try:
        run([docker_cli(), "run", "--detach", "--name", name,
             # docker/e2e.sh removes leftovers by this label, like the compose projects.
             "--label", f"com.docker.compose.project={name}",
             "--stop-timeout", "120",
             "-e", "ASSAYER_DASHBOARD_BIND=0.0.0.0", "-e", "ASSAYER_DASHBOARD_PASSWORD=aio-secret",
             "-p", f"127.0.0.1:{port}:9181",
             "-v", f"{checkpoints}:/checkpoints:ro", "-v", f"{HERE / 'evaluators'}:/evaluators:ro",
             "-v", f"{results}:/results",
             IMAGE, "up", "--foreground", "--eval-workers", "2"])

        def ready() -> bool:
            info = status(name)
            queues = [tuple(worker["queues"]) for worker in (info or {}).get("workers", [])]
            # an eval worker takes new work first, then backfill
            return (queues.count(("assayer-eval", "assayer-eval-backfill")) == 2
                    and queues.count(("assayer-watch",)) == 1)

        wait_for(ready, 90, "Redis, one watch and two eval workers in the container")
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/") == 401, 30, "the dashboard (401 without login)")
        assert http_status(f"http://127.0.0.1:{port}/", ("assayer", "aio-secret")) == 200

        docker_exec(name, "assayer", "watch", "add", "/checkpoints", "--name", "aio",
                    "--evaluator", "/evaluators/probe.py:evaluate_slow")
        expected = write_checkpoint(checkpoints / "step_000001.pt", tag=7)
        wait_for(lambda: any(q["name"] == "assayer-eval" and q["running"] for q in (status(name) or {"queues": []})
                             ["queues"]), 60, "the evaluation to start", interval=0.5)

        stopping = time.monotonic()
        run([docker_cli(), "stop", name], timeout=180)  # --stop-timeout 120 applies
        took = time.monotonic() - stopping
        state = run([docker_cli(), "inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name]).stdout
        assert state.split() == ["0", "false"], f"supervisord should exit 0 after stopping everything ({took:.0f}s)"

        supervisord = run([docker_cli(), "logs", name], check=False)
        killed = [line for line in (supervisord.stdout + supervisord.stderr).splitlines() if "SIGKILL" in line]
        assert not killed, f"every program must stop warmly, none be killed by supervisor ({took:.0f}s): {killed}"

        lines = [json.loads(line) for line in (results / "aio.jsonl").read_text().splitlines()]
        assert [(r["status"], r["checkpoint"], r["metrics"]["sum"]) for r in lines] == \
            [("ok", "/checkpoints/step_000001.pt", expected)], f"the running evaluation must finish on stop: {lines}"
    finally:
        logs = run([docker_cli(), "logs", name], check=False)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.log").write_text(logs.stdout + logs.stderr)
        # The programs' own logs (supervisor writes them in the stack directory).
        run([docker_cli(), "cp", f"{name}:/home/assayer/.assayer/stack/logs", str(ARTIFACTS / f"{name}-logs")],
            check=False)
        run([docker_cli(), "rm", "--force", "--volumes", name], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
