"""`assayer dashboard` as an operator and an attacker meet it: a real server process, a real Redis, a
failed job that only an allowed POST carrying the CSRF token may requeue, and the real page in chromium."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
from harness import ROOT, env_for, free_port, wait_for
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from assayer.dashboard import CSRF_COOKIE, CSRF_HEADER, action_endpoints, make_app
from assayer.settings import Settings

QUEUE = "assayer-eval"
USER, PASSWORD = "assayer", "dash-pw-7Q"
CHROMIUM = Path("/usr/bin/chromium")

# Every state-changing route of rq-dashboard 0.9.0 (it has no cancel route), as a path template.
ACTIONS = {
    "requeue": "/job/{job}/requeue",
    "delete": "/job/{job}/delete",
    "requeue all": "/requeue/{queue}",
    "empty failed": "/queue/{queue}/failed/empty",
    "compact": "/queue/{queue}/compact",
}

# Assayer's own state-changing routes beside them (assayer/pages.py).
OUR_ACTIONS = {"/api/watches/<name>/pause", "/api/watches/<name>/resume", "/api/watches/<name>/evaluate"}


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: str


@dataclass(frozen=True)
class Dashboard:
    url: str
    log: Path

    def request(self, path: str, method: str = "GET", *, auth: str | None = f"{USER}:{PASSWORD}",
                headers: dict[str, str] | None = None, form: dict[str, str] | None = None) -> Reply:
        data = urlencode(form).encode() if form is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if auth:
            req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return Reply(resp.status, resp.headers, resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read().decode())

    def token(self) -> str:
        """The CSRF token a page load hands the browser in its cookie."""
        cookie = self.request("/").headers.get("Set-Cookie", "")
        name, _, rest = cookie.partition("=")
        assert name == CSRF_COOKIE and "SameSite=Strict" in cookie, cookie
        return rest.split(";")[0]

    def answers(self) -> int:
        try:
            return self.request("/", auth=None).status
        except OSError:
            return 0


@pytest.fixture
def start_dashboard(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> Dashboard:
        port = free_port()
        full_env = env_for(settings) | {"ASSAYER_DASHBOARD_PASSWORD": PASSWORD, "ASSAYER_DASHBOARD_PORT": str(port)} | env
        log = tmp_path / f"dashboard-{port}.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "assayer", "dashboard"], env=full_env, cwd=ROOT,
                                          stdout=out, stderr=subprocess.STDOUT))
        dashboard = Dashboard(f"http://127.0.0.1:{port}", log)
        wait_for(lambda: dashboard.answers() == 401, 20, what="the dashboard to answer")
        return dashboard

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def failed_job(conn: redis.Redis) -> Job:
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    job = queue.enqueue("evaluators.boom", "/checkpoints/a.pt")
    SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    return job


def where(conn: redis.Redis, job: Job) -> str:
    """Where the job is now: 'failed', 'queued', 'gone', or 'between' while a requeue moves it."""
    if not Job.exists(job.id, connection=conn):
        return "gone"
    if job.id in FailedJobRegistry(QUEUE, connection=conn).get_job_ids(cleanup=False):
        return "failed"
    return "queued" if job.id in Queue(QUEUE, connection=conn, serializer=JSONSerializer).get_job_ids() else "between"


def paths(job: Job) -> dict[str, str]:
    return {name: path.format(job=job.id, queue=QUEUE) for name, path in ACTIONS.items()}


def test_the_tests_cover_every_state_changing_route_of_rq_dashboard(settings: Settings) -> None:
    app = make_app(settings.replace(dashboard_password=PASSWORD))
    guarded = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint in action_endpoints(app)}
    assert guarded == {path.replace("{job}", "<job_id>").replace("{queue}", "<queue_name>")
                       .replace("/failed/", "/<registry_name>/") for path in ACTIONS.values()} | OUR_ACTIONS


def test_dashboard_runs_on_waitress_behind_basic_auth(start_dashboard: Callable[..., Dashboard]) -> None:
    dashboard = start_dashboard()
    assert dashboard.request("/", auth=None).status == 401
    assert dashboard.request("/", auth=f"{USER}:wrong").status == 401
    assert dashboard.request("/", auth=f"nobody:{PASSWORD}").status == 401
    page = dashboard.request("/")
    assert page.status == 200 and "RQ dashboard" in page.body
    assert page.headers["Server"] == "waitress"
    assert page.headers["X-Frame-Options"] == "DENY"
    port = dashboard.url.rsplit(":", 1)[1]
    assert f"Serving on http://127.0.0.1:{port}" in dashboard.log.read_text()


def test_actions_are_refused_with_403_unless_allowed(conn: redis.Redis, start_dashboard: Callable[..., Dashboard]) -> None:
    job = failed_job(conn)
    dashboard = start_dashboard()
    for name, path in paths(job).items():
        reply = dashboard.request(path, "POST")
        assert reply.status == 403, name
        assert "ASSAYER_DASHBOARD_ALLOW_ACTIONS=true" in reply.body, name
        assert dashboard.request(path, "POST", auth=None).status == 401, name
    assert where(conn, job) == "failed"
    page = dashboard.request(f"/0/view/jobs/{QUEUE}/failed/8/asc/1")
    assert "Set-Cookie" not in page.headers  # no token to hand out when nothing may change
    assert "#requeue-all-btn" in page.body and "display:none" in page.body  # buttons that would only meet a 403


@pytest.mark.parametrize("allow", ["false", "true"])
def test_a_get_of_an_action_url_changes_nothing(
    conn: redis.Redis, start_dashboard: Callable[..., Dashboard], allow: str
) -> None:
    job = failed_job(conn)
    dashboard = start_dashboard(ASSAYER_DASHBOARD_ALLOW_ACTIONS=allow)
    token = dashboard.token() if allow == "true" else "x"
    with_token = {"Cookie": f"{CSRF_COOKIE}={token}", CSRF_HEADER: token}
    for name, path in paths(job).items():
        for method in ("GET", "HEAD"):
            assert dashboard.request(path, method, headers=with_token).status in (403, 405), (name, method)
    assert where(conn, job) == "failed"


def test_allowed_actions_need_the_csrf_token(conn: redis.Redis, start_dashboard: Callable[..., Dashboard]) -> None:
    job = failed_job(conn)
    dashboard = start_dashboard(ASSAYER_DASHBOARD_ALLOW_ACTIONS="true")
    token = dashboard.token()
    forged = token.split(".")[0] + "." + "0" * 64
    other = start_dashboard(ASSAYER_DASHBOARD_ALLOW_ACTIONS="true", ASSAYER_DASHBOARD_PASSWORD="another").url
    foreign = Dashboard(other, Path()).request("/", auth=f"{USER}:another").headers["Set-Cookie"].split(";")[0]
    foreign = foreign.partition("=")[2]
    refused = {
        "no token": {},
        "cookie only": {"Cookie": f"{CSRF_COOKIE}={token}"},
        "header only": {CSRF_HEADER: token},
        "header differs from cookie": {"Cookie": f"{CSRF_COOKIE}={token}", CSRF_HEADER: dashboard.token()},
        "forged signature": {"Cookie": f"{CSRF_COOKIE}={forged}", CSRF_HEADER: forged},
        "token of another dashboard": {"Cookie": f"{CSRF_COOKIE}={foreign}", CSRF_HEADER: foreign},
    }
    for name, path in paths(job).items():
        for case, headers in refused.items():
            reply = dashboard.request(path, "POST", headers=headers)
            assert reply.status == 403 and "CSRF token" in reply.body, (name, case)
    assert where(conn, job) == "failed"

    reply = dashboard.request(paths(job)["requeue"], "POST", headers={"Cookie": f"{CSRF_COOKIE}={token}", CSRF_HEADER: token})
    assert reply.status == 200 and '"status":"OK"' in reply.body.replace(" ", "")
    assert where(conn, job) == "queued"
    # The form field instead of the header works as well.
    reply = dashboard.request(paths(job)["delete"], "POST", headers={"Cookie": f"{CSRF_COOKIE}={token}"},
                              form={"csrf_token": token})
    assert reply.status == 200
    assert where(conn, job) == "gone"


def test_allow_delete_is_a_deprecated_name_for_allow_actions(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="assayer.settings"):
        assert Settings.from_env({"ASSAYER_DASHBOARD_ALLOW_DELETE": "true"}).dashboard_allow_actions is True
    assert "ASSAYER_DASHBOARD_ALLOW_DELETE is deprecated: use ASSAYER_DASHBOARD_ALLOW_ACTIONS" in caplog.text
    both = {"ASSAYER_DASHBOARD_ALLOW_DELETE": "true", "ASSAYER_DASHBOARD_ALLOW_ACTIONS": "false"}
    assert Settings.from_env(both).dashboard_allow_actions is False  # the new name wins
    assert Settings.from_env({}).dashboard_allow_actions is False


@pytest.mark.slow
@pytest.mark.browser
def test_the_requeue_button_in_chromium_requeues_a_failed_job(
    conn: redis.Redis, start_dashboard: Callable[..., Dashboard]
) -> None:
    from playwright.sync_api import sync_playwright  # a dev dependency: missing is a failure

    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("Debian chromium is missing: .ci/run must install it (apt-get install chromium)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    job = failed_job(conn)
    allowed = start_dashboard(ASSAYER_DASHBOARD_ALLOW_ACTIONS="true")
    refused = start_dashboard()
    failed_page = f"/0/view/jobs/{QUEUE}/failed/8/asc/1"
    button = f"tr[data-job-id='{job.id}'] [data-role=requeue-job-btn]"
    profile = tempfile.mkdtemp(prefix="assayer-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=profile, executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
            http_credentials={"username": USER, "password": PASSWORD},
        )
        try:
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith((allowed.url, refused.url)) else route.abort())
            page = context.new_page()
            page.goto(refused.url + failed_page)
            page.wait_for_selector(f"tr[data-job-id='{job.id}']", timeout=20_000)
            assert not page.is_visible(button)  # actions off: no requeue button to click

            page.goto(allowed.url + failed_page)
            page.click(button, timeout=20_000)
            wait_for(lambda: where(conn, job) == "queued", 20, what="the clicked job to be requeued")
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
