"""Settings and secrets: nothing secret in ``repr``, and the public placeholder passwords refused by every role."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, free_port, run_assayer

from assayer.errors import ConfigError
from assayer.settings import PLACEHOLDER_PASSWORDS, Settings, redact_url


@pytest.mark.parametrize("url", [
    "redis://:s3cr%40t-pw@redis:6379/0",
    "redis://default:s3cr%40t-pw@[::1]:6379/0",
    "rediss://redis.example:6380/0?password=s3cr%40t-pw&ssl_cert_reqs=none",
    "unix://:s3cr%40t-pw@/run/redis/redis.sock?db=0",
])
def test_repr_shows_the_redis_url_without_its_password(url: str) -> None:
    settings = Settings(redis_url=url, redis_password="other-pw", dashboard_password="dash-pw")
    shown = repr(settings)
    assert "s3cr" not in shown and "other-pw" not in shown and "dash-pw" not in shown
    assert f"redis_url={redact_url(url)!r}" in shown and "***" in shown
    assert "watch_queue='assayer-watch'" in shown  # the rest is still there to debug with
    assert str(settings) == shown


def test_redact_url_keeps_the_host_as_written_and_leaves_urls_without_a_password_alone() -> None:
    assert redact_url("redis://u:pw@[::1]:6379/2") == "redis://u:***@[::1]:6379/2"
    assert redact_url("redis://redis:6379/0?db=1") == "redis://redis:6379/0?db=1"


@pytest.mark.parametrize("placeholder", sorted(PLACEHOLDER_PASSWORDS))
@pytest.mark.parametrize("field", ["redis_password", "dashboard_password"])
def test_placeholder_passwords_are_refused(field: str, placeholder: str) -> None:
    with pytest.raises(ConfigError, match=f"ASSAYER_{field.upper()} is still the placeholder"):
        fields: dict[str, Any] = {field: placeholder}  # the field is a parameter: no static type to check
        Settings(**fields)


def test_every_password_of_env_example_is_a_known_placeholder() -> None:
    shipped = re.findall(r"^ASSAYER_\w*PASSWORD=(.*)$", (ROOT / ".env.example").read_text(), flags=re.M)
    assert shipped and set(shipped) <= PLACEHOLDER_PASSWORDS


# Every role starts by reading its settings: the refusal comes before any Redis is reached
# (the URL below points at a closed port, where a role without the check would retry or fail with 3).
@pytest.mark.parametrize(("args", "variable", "value", "message"), [
    (["worker", "watch"], "ASSAYER_REDIS_PASSWORD", "change-me-redis", "ASSAYER_REDIS_PASSWORD is still"),
    (["worker", "eval"], "ASSAYER_REDIS_URL", "redis://:change-me-redis@127.0.0.1:{port}/0",
     "the password in ASSAYER_REDIS_URL is still"),
    (["dashboard"], "ASSAYER_DASHBOARD_PASSWORD", "change-me-dashboard", "ASSAYER_DASHBOARD_PASSWORD is still"),
    (["up", "--no-dashboard"], "ASSAYER_DASHBOARD_PASSWORD_FILE", "{tmp}/dashboard.pw",
     "ASSAYER_DASHBOARD_PASSWORD is still"),
    (["status"], "ASSAYER_REDIS_PASSWORD_FILE", "{tmp}/redis.pw", "ASSAYER_REDIS_PASSWORD is still"),
])
def test_every_role_refuses_the_placeholder_passwords_with_a_fix(
    tmp_path: Path, args: list[str], variable: str, value: str, message: str
) -> None:
    (tmp_path / "dashboard.pw").write_text("change-me-dashboard\n")
    (tmp_path / "redis.pw").write_text("change-me-redis\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSAYER_")}
    env.update(ASSAYER_HOME=str(tmp_path / "home"), ASSAYER_REDIS_URL=f"redis://127.0.0.1:{port}/0",
               PYTHONPATH=str(ROOT))
    env[variable] = value.format(port=port, tmp=tmp_path)
    out = run_assayer(args, env, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: {message} the placeholder" in out.stderr
    fix = variable.removesuffix("_FILE")
    assert f"  fix: replace {fix} in .env" in out.stderr and "openssl rand" in out.stderr
    assert not (tmp_path / "home" / "stack" / "supervisord.conf").exists()  # `up` started nothing
