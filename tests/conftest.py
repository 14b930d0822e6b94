"""Fixtures: a real redis-server per test session, settings for fast tests, real worker processes.

Under pytest-xdist each worker process is its own session: its own redis-server (on a free port,
in its own basetemp), and every test its own tmp_path and ASSAYER_HOME. Shared by the workers,
because they are expensive to make and read-only to the tests: the ``mlflow server`` (each test
its own experiments and runs in it) and what :func:`harness.built_once` builds.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import RedisServer, Workers
from trackers import MlflowServer, TcpProxy, shared_mlflow_server

from assayer.settings import Settings


def _leave_without_teardown() -> None:
    """A pytest-xdist worker's last step: its results are with the main process, its atexit handlers have run
    (this one was registered first, so it runs last). Tearing down an interpreter that imported torch,
    Transformers and Lightning took the last worker 1.5-3 s of CPU while the whole run waited for it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if os.environ.get("PYTEST_XDIST_WORKER"):
    atexit.register(_leave_without_teardown)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), aof=False)  # never restarted: tests that are have their own
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The run's one ``mlflow server`` (:func:`trackers.shared_mlflow_server`): a test never stops it (see mlflow_proxy)."""
    with shared_mlflow_server(tmp_path_factory) as server:
        yield server


@pytest.fixture
def mlflow_proxy(mlflow_server: MlflowServer) -> Iterator[TcpProxy]:
    """The MLflow server behind a port of this test's own, which the test may take down and bring back."""
    proxy = TcpProxy(mlflow_server.port)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ASSAYER_* setting of the developer's shell reaches a test; code run in process writes under tmp_path.

    ASSAYER_E2E_* variables are the end-to-end tests' own knobs (tests/e2e), not settings: they stay.
    """
    for name in [n for n in os.environ if n.startswith("ASSAYER_") and not n.startswith("ASSAYER_E2E_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ASSAYER_HOME", str(tmp_path / "home"))


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        yield client


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path, conn: redis.Redis) -> Settings:
    """Settings for fast tests: short poll, settle, leases and backoff."""
    return Settings(redis_url=redis_server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.6,
                    retry_backoff=(1,), lease_ttl=4, heartbeat_interval=1.0, reap_interval=0.5, scan_lease=8)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workers]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    w = Workers(settings, logdir)
    yield w
    w.kill_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(w.logs())


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Figures saved during the test (assayer.plot draws into one), so a test can look at what was drawn."""
    import matplotlib.figure

    figures: list[Any] = []
    save = matplotlib.figure.Figure.savefig

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return figures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: pytest-xdist hands tests out in this order (one at a time with
    ``--maxschedchunk 1``), so no worker is left with a slow test while the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise as collected


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                             pytest.TestReport]:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


