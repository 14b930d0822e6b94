# ruff: noqa: F811 -- start_dashboard is a fixture imported from test_dashboard, then named as a parameter
"""The checkpoint pages, their JSON API and the Prometheus metrics, against real workers and a real dashboard.

The pages are also looked at in headless Chromium; screenshots go to tests/artifacts (CI keeps them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import ROOT, Workers, add_watch, env_for, final_results, free_port, wait_for
from test_dashboard import CHROMIUM, PASSWORD, USER, Dashboard, start_dashboard  # noqa: F401 (a fixture)
from writers import torch_bytes, write_atomically

from assayer import keys
from assayer.settings import Settings

ARTIFACTS = ROOT / "tests" / "artifacts"
STEPS = (100, 200, 300)


@pytest.fixture
def evaluated(conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path) -> Path:
    """Watch ``run``: three checkpoints evaluated ok (loss falls with the step) and one that fails."""
    ckpts = tmp_path / "ckpts"
    add_watch(conn, settings, ckpts, fn="curve")
    workers.start("eval")
    workers.start("watch")
    for step in STEPS:
        write_atomically(ckpts / f"model-step{step}.pt", torch_bytes(step))
    write_atomically(ckpts / "bad-step250.pt", torch_bytes(250))
    wait_for(lambda: conn.hlen(keys.results("run")) == 4, 60, what="four final results")
    return ckpts


def test_the_api_lists_watches_and_checkpoints_by_step_with_the_failure_and_the_best(
        evaluated: Path, start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard()
    assert dash.request("/api/watches", auth=None).status == 401
    watches = _json(dash, "/api/watches")["watches"]
    assert [(w["name"], w["outcomes"]) for w in watches] == [("run", {"ok": 3, "failed": 1, "missing": 0, "skipped": 0})]
    view = _json(dash, "/api/watches/run/checkpoints")
    rows = view["checkpoints"]
    assert [(r["step"], r["status"]) for r in rows] == [(100, "ok"), (200, "ok"), (250, "failed"), (300, "ok")]
    failed = rows[2]
    assert "truncated tensor data" in failed["error"] and "ValueError" in failed["traceback"]
    assert failed["attempt"] == 1 and failed["worker"]
    assert view["best"]["loss"]["step"] == 300 and view["best"]["loss"]["mode"] == "min"
    assert view["best"]["accuracy"]["step"] == 300 and view["best"]["accuracy"]["mode"] == "max"
    assert view["counts"]["ok"] == 3 and view["counts"]["failed"] == 1
    assert dash.request("/api/watches/nope/checkpoints").status == 404


def test_the_watch_page_shows_rows_curves_and_the_best_and_links_to_rq_dashboard_both_ways(
        evaluated: Path, start_dashboard: Callable[..., Dashboard]) -> None:
    dash = start_dashboard()
    assert dash.request("/checkpoints/run", auth=None).status == 401
    page = dash.request("/checkpoints/run").body
    assert page.count("<tr") == 5  # a header and four checkpoints
    assert "truncated tensor data" in page and "class='failed'" in page
    curves = dict(re.findall(r"data-metric='(\w+)'>.*?points='([^']+)'", page))
    assert set(curves) == {"accuracy", "loss"}
    loss_y = [float(p.split(",")[1]) for p in curves["loss"].split()]
    assert loss_y == sorted(loss_y)  # SVG y grows downwards: a falling loss draws a rising line of y values
    assert page.count("class=best-point") == 2
    assert "href=\"/\"" in page or "href='/'" in page
    assert 'href="/checkpoints/"' in dash.request("/0/view/queues").body  # rq-dashboard's menu links back


def test_actions_on_the_pages_need_the_flag_and_the_token(
        conn: redis.Redis, evaluated: Path, start_dashboard: Callable[..., Dashboard]) -> None:
    refused = start_dashboard()
    assert refused.request("/api/watches/run/pause", "POST").status == 403
    assert "re-evaluate" not in refused.request("/checkpoints/run").body
    allowed = start_dashboard(ASSAYER_DASHBOARD_ALLOW_ACTIONS="true")
    assert allowed.request("/api/watches/run/pause", "POST").status == 403  # no CSRF token
    assert allowed.request("/api/watches/run/pause", "GET").status == 405
    token = allowed.token()
    headers = {"Cookie": f"_csrf_token={token}", "X-CSRFToken": token, "Accept": "application/json"}
    assert allowed.request("/api/watches/run/pause", "POST", headers=headers).status == 200
    assert _json(allowed, "/api/watches")["watches"][0]["paused"] is True

    def step200_jobs() -> set[str]:  # one final result per job
        return {r["job_id"] for r in final_results(conn, "run") if r["relpath"] == "model-step200.pt"}

    assert len(step200_jobs()) == 1
    reply = allowed.request("/api/watches/run/evaluate", "POST", headers=headers, form={"relpath": "model-step200.pt"})
    assert reply.status == 200
    # Queued again: the watch is paused, the eval worker still runs it (at once: it may be done before we look).
    wait_for(lambda: len(step200_jobs()) == 2, 30, what="model-step200.pt evaluated again by a second job")


def test_metrics_describe_the_watch_whoever_serves_them(
        settings: Settings, evaluated: Path, start_dashboard: Callable[..., Dashboard], tmp_path: Path) -> None:
    dash = start_dashboard()
    assert dash.request("/metrics", auth=None).status == 401
    via_dashboard = dash.request("/metrics").body
    port = free_port()
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "assayer", "exporter"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=env_for(settings) | {"ASSAYER_EXPORTER_PORT": str(port)})
    try:
        exporter = Dashboard(f"http://127.0.0.1:{port}", log)
        wait_for(lambda: exporter.answers() in (200, 404), 20, what="the exporter to answer")
        via_exporter = exporter.request("/metrics", auth=None)
        assert via_exporter.status == 200
    finally:
        proc.terminate()
        proc.wait(10)
    for text in (via_dashboard, via_exporter.body):
        metrics = _samples(text)
        assert metrics['assayer_checkpoints{status="ok",watch="run"}'] == 3
        assert metrics['assayer_checkpoints{status="failed",watch="run"}'] == 1
        assert metrics['assayer_watch_lag{watch="run"}'] == 0
        assert metrics['assayer_evaluation_duration_seconds_count{watch="run"}'] == 4
        assert metrics['assayer_evaluation_failures{watch="run"}'] == 1
        assert metrics['assayer_queue_jobs{queue="assayer-eval",state="queued"}'] == 0
        assert metrics['assayer_workers{role="eval",state="idle"}'] == 1
        assert metrics["assayer_up"] == 1


@pytest.mark.browser
def test_the_pages_in_chromium_show_the_watch_the_failure_and_the_curves(
        evaluated: Path, start_dashboard: Callable[..., Dashboard]) -> None:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("Debian chromium is missing: .ci/run must install it (apt-get install chromium)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    dash = start_dashboard()
    ARTIFACTS.mkdir(exist_ok=True)
    profile = tempfile.mkdtemp(prefix="assayer-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=profile, executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
            http_credentials={"username": USER, "password": PASSWORD})
        try:
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(dash.url) else route.abort())  # nothing from a CDN
            page = context.new_page()
            page.goto(dash.url + "/checkpoints/")
            assert page.inner_text("table tr:nth-child(2) td:first-child") == "run"
            page.screenshot(path=str(ARTIFACTS / "checkpoints-watches.png"), full_page=True)
            page.click("text=run")
            page.wait_for_selector("svg[data-metric='loss']")
            assert page.locator("td.failed").inner_text() == "failed"
            assert page.locator("circle.best-point").count() == 2
            assert page.locator("svg[data-metric='loss'] polyline").get_attribute("points")
            page.screenshot(path=str(ARTIFACTS / "checkpoints-watch.png"), full_page=True)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _json(dash: Dashboard, path: str) -> Any:
    import json

    reply = dash.request(path)
    assert reply.status == 200, reply.body
    return json.loads(reply.body)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out

