"""The original command line keeps working: ``python -m assayer.watch`` and ``python -m assayer.shutdown``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from harness import ROOT, RedisServer, evaluator_ref, final_results, wait_for
from rq import Worker
from rq.registry import FinishedJobRegistry
from writers import torch_bytes

from assayer import defaults


@pytest.mark.slow
def test_original_flags_start_workers_and_shutdown_stops_them(conn: redis.Redis, redis_server: RedisServer,
                                                             tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    ckpts = tmp_path / "run"
    (ckpts / "sub").mkdir(parents=True)
    (ckpts / "sub" / "existing.pt").write_bytes(torch_bytes(0))
    out = subprocess.run(
        [sys.executable, "-m", "assayer.watch", "--directory", str(ckpts), "--evaluator", evaluator_ref("record"),
         "--regex_filter", r"^.*\.(pt|pth|ckpt|model|state)$", "--num_eval_workers", "2", "--num_watch_workers", "1",
         "--polling_interval", "0.2", "--watch_queue_name", "watch", "--eval_queue_name", "evaluation",
         "--eval_existing", "--redis_host", "127.0.0.1", "--redis_port", str(redis_server.port)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    pids = [int(line.split("pid ")[1].split()[0]) for line in out.stdout.splitlines() if "worker pid" in line]
    assert len(pids) == 3
    try:
        (ckpts / "sub" / "new.pt").write_bytes(torch_bytes(1))  # recursion, unlike the original
        wait_for(lambda: len(final_results(conn, "run")) == 2, 30, what="existing and new checkpoints evaluated")
        # Both evaluations ran from the queue named on the command line (rq files a job as finished
        # just after its result is stored), none from Assayer's default queue.
        ids = sorted(r["job_id"] for r in final_results(conn, "run"))
        wait_for(lambda: sorted(FinishedJobRegistry("evaluation", connection=conn).get_job_ids()) == ids, 10,
                 what="both jobs finished in the queue named evaluation")
        assert FinishedJobRegistry(defaults.EVAL_QUEUE, connection=conn).get_job_ids() == []
        # one eval worker may have done both while the other was still starting (under load): all three up first
        wait_for(lambda: len(Worker.all(connection=conn)) == 3, 30, what="the three workers registered")
        stop = subprocess.run([sys.executable, "-m", "assayer.shutdown", "--redis_host", "127.0.0.1",
                               "--redis_port", str(redis_server.port), "--watch_queue_name", "watch",
                               "--eval_queue_name", "evaluation"], env=env, cwd=ROOT, capture_output=True, text=True)
        assert stop.returncode == 0 and "3 worker(s)" in stop.stdout
        wait_for(lambda: not any(_alive(p) for p in pids), 30, what="the workers to exit")
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
