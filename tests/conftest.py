"""Fixtures: a real redis-server per test session, settings for fast tests, real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harness import RedisServer, Workers

from assayer.settings import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path, conn: redis.Redis) -> Settings:
    """Settings for fast tests: short poll, settle, lease and backoff."""
    return Settings(redis_url=redis_server.url, home=tmp_path / "home", poll_interval=0.2, settle=0.6,
                    retry_backoff=(1,), lease_ttl=4, heartbeat_interval=1.0, reap_interval=0.5)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workers]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    w = Workers(settings, logdir)
    yield w
    w.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(w.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


