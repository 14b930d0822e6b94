"""The user's way in, for real: `docker compose up --scale eval=4` on a Docker engine, a watch,
torch checkpoints written from the host, results read back, the dashboard, a stop mid-evaluation.

The tests share one stack (see conftest.py) and run in file order.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from e2elib import (
    ARTIFACTS,
    DASHBOARD_USER,
    EVAL_REPLICAS,
    Stack,
    docker_cli,
    http_status,
    run,
    unavailable,
    wait_for,
    write_checkpoint,
)

# Generous: the first test also brings the stack up, and CI machines are shared.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

WATCH = "e2e"


def by_checkpoint(records: list[dict[str, Any]], watch: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["watch"] == watch:
            grouped.setdefault(record["checkpoint"], []).append(record)
    return grouped


def ok_records(stack: Stack, watch: str, count: int) -> dict[str, list[dict[str, Any]]] | None:
    """The watch's results once ``count`` checkpoints have a final record, else None."""
    grouped = by_checkpoint(stack.compose.results(), watch)
    return grouped if len(grouped) >= count and all(r[-1]["status"] in ("ok", "failed") for r in grouped.values()) \
        else None


def hostnames(stack: Stack) -> set[str]:
    """Hostnames of the eval containers: docker sets each to the first 12 hex digits of its id."""
    return {cid[:12] for cid in stack.compose.container_ids("eval")}


def test_first_up_builds_the_image_once_and_pulls_nothing(stack: Stack) -> None:
    # The image did not exist under the project's tag: `up` built it (the watch service's build,
    # pull_policy: build; the others never build nor pull), without asking a registry first.
    assert "pull access denied" not in stack.up_output and "Pulling" not in stack.up_output, stack.up_output
    ids = [cid for service in ("watch", "eval", "dashboard") for cid in stack.compose.container_ids(service)]
    shown = run([docker_cli(), "inspect", "--format",
                 '{{.Image}} {{index .Config.Labels "com.docker.compose.image"}}', *ids]).stdout.split()
    images = set(shown[0::2])
    assert len(images) == 1, f"the Assayer services run different images: {images}"
    # What compose recorded as each container's image is the image it runs: a later `up` sees
    # nothing changed (it recreates a container whose record differs from the tag's image).
    assert set(shown[1::2]) == images, f"compose recorded other images than the one running: {shown}"


def test_declared_watch_evaluates_the_existing_checkpoint(stack: Stack) -> None:
    grouped = wait_for(lambda: ok_records(stack, "declared", 1), 90, "the declared watch's checkpoint")
    (records,) = grouped.values()
    (record,) = records
    assert record["checkpoint"] == "/checkpoints/declared/step_000001.pt"
    assert record["status"] == "ok", record
    assert record["metrics"]["sum"] == stack.declared_sum


def test_the_redis_password_is_on_no_command_line_and_odd_characters_work(stack: Stack) -> None:
    # The stack is up and healthy with passwords full of odd characters: Redis, its healthcheck,
    # every worker and the dashboard took them as they are.
    (redis_id,) = stack.compose.container_ids("redis")
    shown = run([docker_cli(), "inspect", "--format",
                 "{{json .Path}} {{json .Args}} {{json .Config.Cmd}} {{json .Config.Entrypoint}} "
                 "{{json .Config.Healthcheck}} {{json .State.Health}}", redis_id]).stdout
    unique = stack.redis_password.split()[0]  # "redis-<random hex>": JSON escapes the odd part
    assert unique not in shown, shown
    assert '"Status":"healthy"' in shown and "$ASSAYER_REDIS_PASSWORD" in shown
    processes = run(["ps", "-eo", "args"]).stdout  # the containers' processes, as the host sees them
    assert unique not in processes
    config = stack.compose.exec("redis", "sh", "-c", "stat -c '%a %U' /run/redis/redis.conf").stdout.split()
    assert config == ["600", "redis"]
    assert stack.compose.status()["workers"], "the workers reached Redis with the password"


def test_batch_is_evaluated_exactly_once_by_all_four_eval_containers(stack: Stack) -> None:
    run_dir = stack.checkpoints / "run"
    run_dir.mkdir(mode=0o755)
    added = stack.compose.exec("watch", "assayer", "watch", "add", "/checkpoints/run", "--name", WATCH,
                               "--evaluator", "/evaluators/probe.py:evaluate", "--regex", r"\.pt$", timeout=120)
    assert f"watch {WATCH} added" in added.stdout, added.stdout + added.stderr

    expected: dict[Path, float] = {}
    # Written slowly, in place, while the rest arrives: pauses shorter than the settle time, and
    # one longer than it (only the torch zip's completeness check keeps that half file out).
    slow = [
        (run_dir / "slow" / "step_000900.pt", 900, {"chunks": 8, "pause": 0.5}),
        (run_dir / "step_000950.pt", 950, {"chunks": 4, "pause": 0.2, "long_pause_at": 1, "long_pause": 4.0}),
    ]
    sums: dict[Path, float] = {}
    writers = [threading.Thread(target=lambda p=p, t=t, kw=kw: sums.__setitem__(p, write_checkpoint(p, t, **kw)))
               for p, t, kw in slow]
    for writer in writers:
        writer.start()
    # A burst: top level, a subdirectory, and one nested two deep (all created after the watch).
    for index, rel in enumerate(["step_000100.pt", "step_000200.pt", "step_000300.pt", "step_000400.pt",
                                 "step_000500.pt", "a/step_000600.pt", "a/step_000700.pt", "a/b/step_000800.pt"]):
        path = run_dir / rel
        expected[path] = write_checkpoint(path, tag=100 + index)
    # ... and files the watch must ignore.
    (run_dir / "notes.txt").write_text("not a checkpoint\n")
    for writer in writers:
        writer.join(timeout=60)
    expected.update(sums)
    assert len(expected) == 10

    grouped = wait_for(lambda: ok_records(stack, WATCH, len(expected)), 120, "every checkpoint of the batch")
    want = {stack.container_path(p): total for p, total in expected.items()}
    assert set(grouped) == set(want), "evaluated something else than the batch"
    for checkpoint, records in grouped.items():
        (record,) = records
        assert record["status"] == "ok" and record["attempt"] == 1, record
        assert record["metrics"]["sum"] == want[checkpoint], f"{checkpoint} was evaluated incomplete"
        assert record["worker"], record

    attempts = Counter(line["checkpoint"] for line in stack.compose.jsonl_lines(WATCH))
    assert attempts == Counter(list(want)), "each checkpoint must be evaluated exactly once (one attempt each)"
    used = {records[0]["metrics"]["host"] for records in grouped.values()}
    assert len(hostnames(stack)) == EVAL_REPLICAS
    assert used == hostnames(stack), "all four eval containers should have taken part"


def test_dashboard_requires_login_and_shows_the_eval_queue_and_four_workers(stack: Stack) -> None:
    assert http_status(stack.dashboard_url + "/") == 401
    assert http_status(stack.dashboard_url + "/", (DASHBOARD_USER, "wrong")) == 401
    assert http_status(stack.dashboard_url + "/", (DASHBOARD_USER, stack.dashboard_password)) == 200

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (dev extra)")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        unavailable("Debian chromium is not installed (.ci/install-docker.sh installs it)")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="assayer-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=profile,
            executable_path=str(chromium),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
            http_credentials={"username": DASHBOARD_USER, "password": stack.dashboard_password},
            viewport={"width": 1280, "height": 800},
        )
        try:
            # The dashboard and nothing else: every other request is refused before it leaves.
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(stack.dashboard_url) else route.abort())
            page = context.new_page()
            page.goto(stack.dashboard_url + "/0/view/workers")
            page.wait_for_function(
                """n => [...document.querySelectorAll('tr[data-role=worker]')]
                        .filter(row => row.innerText.includes('assayer-eval')).length === n""",
                arg=EVAL_REPLICAS, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            rows = page.locator("tr[data-role=worker]").all_inner_texts()
            page.goto(stack.dashboard_url + "/0/view/queues")
            page.wait_for_function("() => document.body.innerText.includes('assayer-eval')", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-queues.png"), full_page=True)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
    eval_rows = [row for row in rows if "assayer-eval" in row]
    assert len(eval_rows) == EVAL_REPLICAS, rows
    assert {host for host in hostnames(stack) if any(host in row for row in eval_rows)} == hostnames(stack), rows
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def running_evaluations(stack: Stack) -> int:
    queues = {queue["name"]: queue for queue in stack.compose.status()["queues"]}
    return int(queues["assayer-eval"]["running"])


def finished_at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["finished_at"]).timestamp()


def test_stop_mid_evaluation_loses_nothing_and_up_again_reevaluates_nothing(stack: Stack) -> None:
    compose = stack.compose
    before = by_checkpoint(compose.results(), WATCH)
    assert before, "runs after the batch test"
    lines_before = len(compose.jsonl_lines(WATCH))

    slow_dir = stack.checkpoints / "slow-run"
    slow_dir.mkdir(mode=0o755)
    compose.exec("watch", "assayer", "watch", "add", "/checkpoints/slow-run", "--name", "slow",
                 "--evaluator", "/evaluators/probe.py:evaluate_slow", timeout=120)
    slow_sum = write_checkpoint(slow_dir / "step_001000.pt", tag=1000)
    wait_for(lambda: running_evaluations(stack) >= 1, 60, "the slow evaluation to start", interval=0.5)
    eval_ids = compose.container_ids("eval")
    worker_ids = [*compose.container_ids("watch"), *eval_ids]

    stopped = time.monotonic()
    compose("stop", timeout=900)  # eval's stop_grace_period (10m) applies
    stop_took = time.monotonic() - stopped
    states = run([docker_cli(), "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", *worker_ids]).stdout
    assert states.split("\n")[:-1] == ["false 0"] * len(worker_ids), \
        f"watch and eval workers must stop by themselves after a warm shutdown, not be killed:\n{states}"

    restarted = time.time()
    compose("up", "--detach", "--scale", f"eval={EVAL_REPLICAS}", "--wait", "--wait-timeout", "150",
            "--no-build", "--pull", "never", timeout=240)
    assert compose.container_ids("eval") == eval_ids, "the same eval containers start again"

    slow = wait_for(lambda: ok_records(stack, "slow", 1), 90, "the slow evaluation's result")
    (records,) = slow.values()
    (record,) = records
    assert record["status"] == "ok" and record["metrics"]["sum"] == slow_sum, record
    assert record["attempt"] == 1 and finished_at(record) < restarted, \
        f"the evaluation running at `docker compose stop` should have finished during the stop ({stop_took:.1f}s)"
    assert [line["checkpoint"] for line in compose.jsonl_lines("slow")] == [record["checkpoint"]]

    # Up again re-evaluates nothing: once a new checkpoint is through, the watch has rescanned
    # the whole directory, and every earlier checkpoint still has its one and only attempt.
    fresh = stack.checkpoints / "run" / "step_002000.pt"
    fresh_sum = write_checkpoint(fresh, tag=2000)
    after = wait_for(lambda: ok_records(stack, WATCH, len(before) + 1), 90, "the checkpoint written after the restart")
    assert after[stack.container_path(fresh)][0]["metrics"]["sum"] == fresh_sum
    assert {k: v for k, v in after.items() if k != stack.container_path(fresh)} == before
    assert len(compose.jsonl_lines(WATCH)) == lines_before + 1
    assert len(by_checkpoint(compose.results(), "declared")) == 1


MLFLOW_POINTS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient("http://127.0.0.1:5000")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        if r.data.tags.get("assayer.watch") == sys.argv[1]]
print(json.dumps([[m.step, m.value] for r in runs for m in client.get_metric_history(r.info.run_id, "eval/sum")]))
"""


def test_mlflow_profile_gets_each_result_at_its_step_and_the_exporter_stays_on_the_bundle_network(
        stack: Stack) -> None:
    """`--report-to mlflow` with the mlflow profile and nothing else set up; metrics for Prometheus inside only."""
    tracked = dataclasses.replace(stack.compose, profiles=["mlflow"])
    tracked("up", "--detach", "--no-build", "--pull", "never", "--wait", "mlflow", timeout=300)
    (stack.checkpoints / "tracked").mkdir()
    stack.compose.exec("watch", "assayer", "watch", "add", "/checkpoints/tracked", "-e", "/evaluators/probe.py:evaluate",
                       "--report-to", "mlflow")
    sums = {step: write_checkpoint(stack.checkpoints / "tracked" / f"step_{step:06d}.pt", tag=step) for step in (30, 10)}

    def points() -> list[list[float]] | None:
        out = tracked.exec("mlflow", "python", "-c", MLFLOW_POINTS, "tracked", check=False)
        found = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []
        return found if len(found) >= 2 else None

    found = wait_for(points, 120, "both results in the mlflow profile's server")
    assert sorted((int(s), v) for s, v in found) == sorted((s, pytest.approx(v, rel=1e-5)) for s, v in sums.items())
    sink = next(w for w in stack.compose.status()["watches"] if w["name"] == "tracked")["report_to"]["mlflow"]
    assert sink["delivered"] == 2 and sink["pending"] == 0 and sink["failing"] == 0

    metrics = stack.compose.exec("watch", "python", "-c", "import urllib.request; print(urllib.request.urlopen("
                                 "'http://exporter:9182/metrics', timeout=10).read().decode())").stdout
    assert 'assayer_checkpoints{status="ok",watch="tracked"} 2.0' in metrics
    assert 'assayer_deliveries{sink="mlflow",state="delivered",watch="tracked"} 2.0' in metrics
    published = stack.compose("port", "exporter", "9182", check=False)
    assert published.returncode != 0 or not published.stdout.strip()  # no port on the host


def test_demo_profile_trains_and_every_epoch_is_evaluated(stack: Stack) -> None:
    """The newcomer's path: the demo trainer writes checkpoints, the demo watch evaluates them."""
    demo_dir = stack.checkpoints / "demo"
    demo_dir.mkdir()
    demo_dir.chmod(0o777)  # the trainer runs as uid 10001 (ASSAYER_DEMO_USER)
    demo = dataclasses.replace(stack.compose, profiles=["demo"])
    demo("up", "--detach", "--no-build", "--pull", "never", "demo-trainer", timeout=240)
    (trainer,) = demo.container_ids("demo-trainer")

    def trained() -> bool:
        running, code = run([docker_cli(), "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}",
                             trainer]).stdout.split()
        if running == "false" and code != "0":
            logs = run([docker_cli(), "logs", "--tail", "30", trainer], check=False)
            raise AssertionError(f"the demo trainer exited {code}:\n{logs.stdout}{logs.stderr}")
        return running == "false"

    wait_for(trained, 150, "the demo trainer to finish its epochs")
    epochs = sorted(p for p in demo_dir.rglob("epoch=*.pt"))
    assert len(epochs) == 6, epochs

    def all_epochs() -> dict[str, list[dict[str, Any]]] | None:
        grouped = by_checkpoint(stack.compose.results(), "demo")
        done = {path: records for path, records in grouped.items() if "/epoch=" in path}
        return done if len(done) == len(epochs) else None

    done = wait_for(all_epochs, 90, "a result for every epoch's checkpoint")
    assert set(done) == {stack.container_path(p) for p in epochs}
    for records in done.values():
        assert [r["status"] for r in records] == ["ok"], records
    last = max(done.values(), key=lambda records: records[0]["step"])[0]
    assert last["metrics"]["accuracy"] > 0.5, last  # a trained model, evaluated on held-out digits

    # The plot of the results, written in the results volume and copied out.
    stack.compose.exec("watch", "assayer", "results", "demo", "--best", "accuracy", "--plot", "/results/demo.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stack.compose("cp", "watch:/results/demo.png", str(ARTIFACTS / "demo-results.png"))
    assert (ARTIFACTS / "demo-results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
