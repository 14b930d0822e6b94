"""The ``assayer`` command as a person runs it: real Redis, bad input included.

Commands run in process (click's CliRunner through ``assayer.cli.main``: the same exit codes and
messages); workers and the dashboard, whose process is the point, run as real processes.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import ROOT, RedisServer, Workers, burst, env_for, evaluator_ref, free_port, invoke, run_cli, wait_for
from pictures import assert_plotted
from writers import torch_bytes

from assayer import defaults, keys, results
from assayer.errors import ConfigError
from assayer.rq_internals import queue_key
from assayer.settings import Settings

run = invoke


def test_watch_add_list_pause_resume_remove(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    out = run(settings, "watch", "add", str(tmp_path), "--evaluator", evaluator_ref("record"), "--name", "r1")
    assert out.returncode == 0, out.stderr
    assert "watch r1 added" in out.stdout
    again = run(settings, "watch", "add", str(tmp_path), "--evaluator", evaluator_ref("record"), "--name", "r1")
    assert again.returncode == 0 and "unchanged" in again.stdout  # idempotent for the same spec
    listed = json.loads(run(settings, "watch", "list", "--format", "json").stdout)
    assert [w["name"] for w in listed] == ["r1"] and listed[0]["directory"] == str(tmp_path)
    assert run(settings, "watch", "pause", "r1").returncode == 0
    assert conn.zscore(keys.DUE, "r1") is None
    assert "(paused)" in run(settings, "watch", "list").stdout
    assert run(settings, "watch", "resume", "r1").returncode == 0
    assert conn.zscore(keys.DUE, "r1") is not None
    assert run(settings, "watch", "remove", "r1").returncode == 0
    assert run(settings, "watch", "list").stdout.strip() == "no watches"


def test_missing_directory_is_allowed_with_a_warning(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    out = run(settings, "watch", "add", str(tmp_path / "later"), "--evaluator", evaluator_ref("record"))
    assert out.returncode == 0
    assert "does not exist yet" in out.stderr
    assert conn.hexists(keys.WATCHES, "later")


@pytest.mark.parametrize(("args", "message"), [
    (["--regex", "(*bad"], "cannot be used: no argument for repetition operator"),
    (["--regex", r"(a)\1\.pt$"], "invalid escape sequence: \\1"),
    (["--regex", r"(?<=run1/).*\.pt$"], "invalid perl operator: (?<="),
    (["--evaluator", "{tmp}/nope.py:fn"], "does not exist"),
    (["--evaluator", "{tmp}/broken.py:evaluate"], "failed to import: ZeroDivisionError"),
    (["--evaluator", "{tmp}/ok.py:missing"], "has no function 'missing'"),
    (["--evaluator", "no_such_module_xyz.fn"], "cannot be found"),
    (["--evaluator", "{tmp}/ok.py"], "names no function"),
    (["--evaluator", "{tmp}/ok.py:three"], "needs 3 arguments"),
    (["--name", "bad name!"], "is not valid"),
    (["--name", "run1\n"], "is not valid"),
    (["--layout", "pytorch"], "layout 'pytorch' is not known"),
    (["--poll-interval", "0"], "must be positive"),
])
def test_bad_specs_are_refused_clearly_and_leave_nothing(
    conn: redis.Redis, settings: Settings, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "ok.py").write_text("def evaluate(p):\n    return {}\n\ndef three(a, b, c):\n    return {}\n")
    argv = ["watch", "add", str(tmp_path), "--evaluator", f"{tmp_path}/ok.py:evaluate"]
    for flag, value in zip(args[::2], args[1::2]):
        value = value.format(tmp=tmp_path)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    out = run(settings, *argv)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "fix:" in out.stderr
    assert conn.hlen(keys.WATCHES) == 0 and not conn.keys(keys.ledger("*"))


def test_a_second_watch_with_the_same_name_elsewhere_is_refused(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run(settings, "watch", "add", str(tmp_path / "a"), "-e", evaluator_ref("record"), "--name", "x").returncode == 0
    out = run(settings, "watch", "add", str(tmp_path / "b"), "-e", evaluator_ref("record"), "--name", "x")
    assert out.returncode == 2 and "already watches" in out.stderr and "watch remove x" in out.stderr


def test_unknown_watch_names_the_existing_ones(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    run(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "real")
    out = run(settings, "watch", "remove", "ghost")
    assert out.returncode == 2 and "no watch named 'ghost'" in out.stderr and "real" in out.stderr


def test_redis_unreachable_or_wrong_password(settings: Settings, redis_server: RedisServer) -> None:
    env = env_for(settings) | {"ASSAYER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    out = run(settings, "watch", "list", env=env)
    assert out.returncode == 3 and "cannot reach Redis" in out.stderr and "assayer up" in out.stderr
    with redis.Redis.from_url(redis_server.url) as client:
        client.config_set("requirepass", "s3cret")
    try:
        env = env_for(settings) | {"ASSAYER_REDIS_PASSWORD": "wrong"}
        out = run(settings, "status", env=env)
        assert out.returncode == 3 and "refused the password" in out.stderr and "wrong" not in out.stderr
        env["ASSAYER_REDIS_PASSWORD"] = "s3cret"
        assert run(settings, "status", env=env).returncode == 0
    finally:
        with redis.Redis.from_url(redis_server.url, password="s3cret") as client:
            client.config_set("requirepass", "")


def _seed(settings: Settings, conn: redis.Redis) -> None:
    for i, (acc, loss) in enumerate([(0.5, 1.2), (0.9, 0.3), (0.8, 0.4)]):
        results.record(conn, settings.results_path, {
            "watch": "run", "checkpoint": f"/ck/step_{i}.pt", "relpath": f"step_{i}.pt", "step": i * 100,
            "status": "ok", "metrics": {"accuracy": acc, "loss": loss}, "job_id": f"ev-{i}", "attempt": 1,
            "worker": "eval-x", "started_at": "2026-01-01T00:00:00", "finished_at": f"2026-01-01T00:00:0{i}",
            "duration": 0.1, "error": None, "final": True, "version": "v",
        })


def test_results_as_table_json_csv_and_best(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    run(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run")
    _seed(settings, conn)
    records = json.loads(run(settings, "results", "--format", "json").stdout)
    assert [r["step"] for r in records] == [0, 100, 200]
    assert {"watch", "checkpoint", "status", "metrics", "worker", "started_at", "finished_at"} <= set(records[0])
    rows = list(csv.DictReader(io.StringIO(run(settings, "results", "run", "--format", "csv").stdout)))
    assert [r["accuracy"] for r in rows] == ["0.5", "0.9", "0.8"]
    table = run(settings, "results", "--best", "accuracy").stdout
    assert "best accuracy for run: 0.9 at /ck/step_1.pt" in table
    assert next(line for line in table.splitlines() if line.startswith("*")).split()[2] == "100"
    best_loss = json.loads(run(settings, "results", "--best", "loss:min", "--format", "json").stdout)
    assert [r["checkpoint"] for r in best_loss] == ["/ck/step_1.pt"]
    bad = run(settings, "results", "--best", "f1")
    assert bad.returncode == 2 and "metrics present: accuracy, loss" in bad.stderr
    from_files = json.loads(run(settings, "results", "--source", "files", "--format", "json").stdout)
    assert from_files == records  # the file copy answers when Redis is lost


def test_results_plot(conn: redis.Redis, settings: Settings, tmp_path: Path, drawn: list[Any]) -> None:
    run(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run")
    _seed(settings, conn)
    out = run(settings, "results", "--plot", str(tmp_path / "p.png"), "--best", "accuracy")
    assert out.returncode == 0, out.stderr
    assert f"plot written to {tmp_path / 'p.png'}" in out.stderr
    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "accuracy"
    assert_plotted(tmp_path / "p.png", ax, "run", [(0, 0.5), (100, 0.9), (200, 0.8)], best=(100, 0.9))


def test_status_shows_watches_lag_queues_workers_and_errors(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    run(settings, "watch", "add", str(tmp_path / "absent"), "-e", evaluator_ref("record"), "--name", "run")
    workers.start("watch")
    wait_for(lambda: conn.hget(keys.watch_state("run"), "error"), 10, what="the scan to note the missing directory")
    info = json.loads(run(settings, "status", "--format", "json").stdout)
    assert info["watches"][0]["name"] == "run" and "does not exist" in info["watches"][0]["error"]
    assert [q["name"] for q in info["queues"]] == ["assayer-watch", "assayer-eval", "assayer-eval-backfill"]
    assert len(info["workers"]) == 1
    text = run(settings, "status").stdout
    assert "lag 0" in text and "last error" in text and "workers: 1" in text
    assert run(settings, "health", "watch").returncode == 0
    assert run(settings, "health", "eval").returncode == 1


def test_evaluate_existing_on_request(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "old.pt").write_bytes(torch_bytes())
    run(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run")
    assert conn.llen(queue_key(settings.eval_queue)) == 0  # existing: baseline only
    out = run(settings, "evaluate", "--watch", "run")
    assert out.returncode == 0 and "queued 1" in out.stdout
    assert "queued 0" in run(settings, "evaluate", "--watch", "run").stdout  # already queued: not twice
    burst(settings, conn)
    assert conn.hlen(keys.results("run")) == 1
    assert "queued 0" in run(settings, "evaluate", "--watch", "run").stdout  # already evaluated
    assert "queued 1" in run(settings, "evaluate", "--watch", "run", "--force").stdout
    bad = run(settings, "evaluate", str(tmp_path / "other.pt"), "--watch", "run")
    assert bad.returncode == 2 and "not a complete checkpoint" in bad.stderr


def test_settings_from_env_merge_password_and_redact() -> None:
    s = Settings.from_env({"ASSAYER_REDIS_URL": "redis://redis:6379/0", "ASSAYER_REDIS_PASSWORD": "p@ss/word",
                           "ASSAYER_RETRY_BACKOFF": "5,30", "ASSAYER_EVAL_TIMEOUT": "7200"})
    assert s.effective_redis_url == "redis://:p%40ss%2Fword@redis:6379/0"
    assert "p@ss" not in repr(s) and "p%40ss" not in s.redacted_redis_url
    assert s.retry_backoff == (5, 30) and s.eval_timeout == 7200
    with pytest.raises(ConfigError, match="ASSAYER_RETRIES='many'"):
        Settings.from_env({"ASSAYER_RETRIES": "many"})


def test_the_scan_lease_and_the_quiet_time_are_settings() -> None:
    s = Settings.from_env({"ASSAYER_SCAN_LEASE": "45", "ASSAYER_QUIET_AFTER": "2.5"})
    assert (s.scan_lease, s.quiet_after) == (45, 2.5)
    assert (Settings().scan_lease, Settings().quiet_after) == (defaults.SCAN_LEASE, defaults.QUIET_AFTER)
    with pytest.raises(ConfigError, match=r"(?s)scan lease must be positive, got 0\b.*fix: set ASSAYER_SCAN_LEASE"):
        Settings.from_env({"ASSAYER_SCAN_LEASE": "0"})


def test_dashboard_requires_a_password_then_answers_401_and_200(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    import urllib.error
    import urllib.request
    from base64 import b64encode

    (tmp_path / "a.pt").write_bytes(torch_bytes())
    run(settings, "watch", "add", str(tmp_path), "-e", evaluator_ref("record"), "--name", "run", "--eval-existing")
    run(settings, "evaluate", "--watch", "run")  # one queued eval job, no worker
    refused = run_cli(settings, "dashboard", timeout=60)  # a process: were the check gone, it would serve on
    assert refused.returncode == 2 and "ASSAYER_DASHBOARD_PASSWORD" in refused.stderr
    port = free_port()
    env = env_for(settings) | {"ASSAYER_DASHBOARD_PASSWORD": "pw", "ASSAYER_DASHBOARD_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "assayer", "dashboard"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"

        def status(auth: str | None) -> int:
            req = urllib.request.Request(url + "0/data/queues.json")
            if auth:
                req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                exc.close()
                return exc.code
            except OSError:
                return 0

        wait_for(lambda: status(None) == 401, 20, what="the dashboard to answer")
        assert status("assayer:wrong") == 401
        assert status("assayer:pw") == 200
        req = urllib.request.Request(url + "0/data/queues.json")
        req.add_header("Authorization", "Basic " + b64encode(b"assayer:pw").decode())
        with urllib.request.urlopen(req, timeout=5) as resp:
            queues = {q["name"]: q["count"] for q in json.load(resp)["queues"]}
        assert queues["assayer-eval-backfill"] == 1  # `assayer evaluate`: after new checkpoints
    finally:
        proc.terminate()
        proc.wait(10)
