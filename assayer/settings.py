"""The one settings object, built from ``ASSAYER_*`` variables and command-line flags.

Library code never reads the environment: it is handed a :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis

from . import defaults
from .errors import ConfigError, RedisUnavailable

ENV_PREFIX = "ASSAYER_"
log = logging.getLogger("assayer.settings")

DEPRECATED_NAMES = {"ASSAYER_DASHBOARD_ALLOW_DELETE": "dashboard_allow_actions"}
"""Old variable -> field it still sets when the field's own variable is unset (ALLOW_DELETE now allows every action)."""

PLACEHOLDER_PASSWORDS = frozenset({"change-me-redis", "change-me-dashboard"})
"""The passwords ``.env.example`` ships with: public, so refused wherever a password is read."""


def _default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".assayer"


@dataclass(frozen=True)
class Settings:
    """Everything a command, worker or job needs to know. Field ``x`` is read from ``ASSAYER_X``."""

    redis_url: str = defaults.REDIS_URL
    redis_password: str | None = field(default=None, repr=False)
    watch_queue: str = defaults.WATCH_QUEUE
    eval_queue: str = defaults.EVAL_QUEUE
    home: Path = field(default_factory=_default_home)
    results_dir: Path | None = None
    watches_file: Path | None = None
    poll_interval: float = defaults.POLL_INTERVAL
    settle: float = defaults.SETTLE
    eval_timeout: float = defaults.EVAL_TIMEOUT
    retries: int = defaults.RETRIES
    retry_backoff: tuple[int, ...] = defaults.RETRY_BACKOFF
    lease_ttl: int = defaults.LEASE_TTL
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    reap_interval: float = defaults.REAP_INTERVAL
    full_scan_interval: float = defaults.FULL_SCAN_INTERVAL
    idle_poll_interval: float = defaults.IDLE_POLL_INTERVAL
    quiet_after: float = defaults.QUIET_AFTER
    scan_lease: int = defaults.SCAN_LEASE
    inotify: bool = True
    max_warm_evaluators: int = defaults.MAX_WARM_EVALUATORS  # also read from ASSAYER_MAX_WARM
    pools: tuple[str, ...] = ("default",)  # pools an eval worker serves: "gpu,default"
    snapshot: str = "off"  # new watches' --snapshot: off, link, copy or auto
    snapshot_dir: Path | None = None  # where snapshots go (default: $ASSAYER_HOME/snapshots)
    snapshot_max_gb: float = defaults.SNAPSHOT_MAX_GB  # bound of the copies' cache (0: none)
    newest_after: float = defaults.NEWEST_AFTER  # --every: the newest checkpoint is evaluated after this long
    eval_max_calls: int = 0
    stall_after: float = defaults.STALL_AFTER
    evaluator_paths: tuple[str, ...] = ()
    eval_max_rss: float = 0.0
    dashboard_user: str = defaults.DASHBOARD_USER
    dashboard_password: str | None = field(default=None, repr=False)
    dashboard_port: int = defaults.DASHBOARD_PORT
    dashboard_bind: str = defaults.DASHBOARD_BIND
    dashboard_allow_actions: bool = False
    exporter_port: int = defaults.EXPORTER_PORT
    exporter_bind: str = defaults.DASHBOARD_BIND
    report_to: str = ""  # trackers of new watches without --report-to: "tensorboard,mlflow,wandb"
    delivery_lease: float = defaults.DELIVERY_LEASE
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ConfigError(
                f"poll interval must be positive, got {self.poll_interval}",
                "set ASSAYER_POLL_INTERVAL (or --poll-interval) to a number of seconds such as 1",
            )
        if self.settle < 0:
            raise ConfigError(f"settle must be >= 0, got {self.settle}", "set ASSAYER_SETTLE to seconds, e.g. 2")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}", "set ASSAYER_RETRIES to 0 or more")
        if self.eval_timeout < 0:
            raise ConfigError(
                f"eval timeout must be >= 0, got {self.eval_timeout}", "use 0 for no limit, or seconds"
            )
        if self.heartbeat_interval * 2 > self.lease_ttl:
            raise ConfigError(
                f"heartbeat interval {self.heartbeat_interval}s must be at most half the lease TTL {self.lease_ttl}s",
                "raise ASSAYER_LEASE_TTL or lower ASSAYER_HEARTBEAT_INTERVAL",
            )
        if self.scan_lease <= 0:
            raise ConfigError(f"scan lease must be positive, got {self.scan_lease}",
                              "set ASSAYER_SCAN_LEASE to seconds, e.g. 30 (a lost scan is taken up again after this)")
        if self.snapshot not in ("off", "link", "copy", "auto"):
            raise ConfigError(f"ASSAYER_SNAPSHOT={self.snapshot!r} is not a snapshot mode", "use off, link, copy or auto")
        if not self.retry_backoff:
            raise ConfigError("retry backoff is empty", "give seconds as a comma list, e.g. 10,60")
        self._refuse_placeholder_passwords()

    def _refuse_placeholder_passwords(self) -> None:
        url_password = unquote(urlsplit(self.redis_url).password or "")
        for var, value in (("ASSAYER_REDIS_PASSWORD", self.redis_password),
                           ("the password in ASSAYER_REDIS_URL", url_password),
                           ("ASSAYER_DASHBOARD_PASSWORD", self.dashboard_password)):
            if value in PLACEHOLDER_PASSWORDS:
                raise ConfigError(
                    f"{var} is still the placeholder {value!r} from .env.example, which anyone can read",
                    f"replace {var.removeprefix('the password in ')} in .env (or your environment) with a secret "
                    "of your own, e.g. the output of `openssl rand -hex 24`",
                )

    def __repr__(self) -> str:
        # The dataclass repr would print the password a Redis URL may carry.
        shown = (f"{f.name}={redact_url(self.redis_url) if f.name == 'redis_url' else getattr(self, f.name)!r}"
                 for f in fields(self) if f.repr)
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- derived values -------------------------------------------------

    @property
    def snapshot_path(self) -> Path:
        """Directory of the snapshots of watches without their own ``--snapshot-dir``."""
        return self.snapshot_dir or self.home / "snapshots"

    @property
    def results_path(self) -> Path:
        """Directory of the append-only result files (one JSON-lines file per watch)."""
        return self.results_dir or self.home / "results" / self.stack_id

    @property
    def stack_id(self) -> str:
        """Which stack (Redis) this is, fit for a directory name: ``127.0.0.1-6390-0``.

        Stacks sharing a home (the local stack, a compose project, a second Redis) keep their
        results apart; credentials are never part of it.
        """
        parts = urlsplit(self.redis_url)
        if parts.scheme == "unix":
            return "unix-" + re.sub(r"[^A-Za-z0-9_.-]", "-", parts.path.strip("/"))
        db = parts.path.strip("/") or "0"
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", parts.hostname or "localhost")
        return f"{host}-{parts.port or 6379}-{db}"

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL with ``redis_password`` merged in (a password already in the URL wins)."""
        if not self.redis_password:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        if parts.password or parts.scheme == "unix":
            return self.redis_url
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(self.redis_password, safe='')}@{parts.hostname or 'localhost'}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def redacted_redis_url(self) -> str:
        """The Redis URL fit for logs and error messages."""
        return redact_url(self.effective_redis_url)

    def redis(self) -> redis.Redis:
        """A new Redis client, not yet connected (rq's JSON serializer needs raw bytes, so no decode_responses)."""
        return redis.Redis.from_url(
            self.effective_redis_url, socket_connect_timeout=5, health_check_interval=30
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``ASSAYER_*`` variables, then apply non-None ``overrides`` (flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env and env[name] != "":
                values[f.name] = _parse(f.name, env[name])
            elif name + "_FILE" in env and env[name + "_FILE"] != "":
                values[f.name] = _read_secret_file(name + "_FILE", env[name + "_FILE"])
        for alias, name in ALIASES.items():
            if env.get(alias) and name not in values:
                values[name] = _parse(name, env[alias])
        for old, new in DEPRECATED_NAMES.items():
            if env.get(old) and new not in values:
                log.warning("%s is deprecated: use %s", old, ENV_PREFIX + new.upper())
                values[new] = _parse(new, env[old])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "redis_url" not in values:
            home = Path(values.get("home") or _default_home())
            local = local_stack_url(home)
            if local:
                values["redis_url"] = local
        return cls(**values)


_FLOATS = {"snapshot_max_gb", "newest_after", "delivery_lease", "stall_after", "eval_max_rss", "poll_interval", "settle",
           "eval_timeout", "heartbeat_interval", "reap_interval", "full_scan_interval", "idle_poll_interval",
           "quiet_after"}
_BOOLS = {"dashboard_allow_actions", "inotify"}
_INTS = {"exporter_port", "retries", "lease_ttl", "max_warm_evaluators", "dashboard_port", "eval_max_calls", "scan_lease"}
_PATHS = {"home", "results_dir", "watches_file", "snapshot_dir"}


ALIASES = {"ASSAYER_MAX_WARM": "max_warm_evaluators"}
"""Shorter names a setting is also read from."""


def _parse(name: str, raw: str) -> Any:
    var = ENV_PREFIX + name.upper()
    try:
        if name in _FLOATS:
            return float(raw)
        if name in _INTS:
            return int(raw)
        if name in _PATHS:
            return Path(raw).expanduser()
        if name == "pools":
            from .pools import parse as parse_pools

            return parse_pools(raw)
        if name == "evaluator_paths":
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if name == "retry_backoff":
            return tuple(int(x) for x in raw.split(",") if x.strip())
        if name in _BOOLS:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid value", f"see the settings table in README.md for {var}") from None
    return raw


def _read_secret_file(var: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"{var} points at {path}, which cannot be read: {exc.strerror}", "mount the secret file or unset the variable"
        ) from None


def local_stack_url(home: Path) -> str | None:
    """The Redis URL that ``assayer up`` wrote, if a local stack runs from ``home``."""
    path = home / "stack" / "redis.url"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def redact_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``; a ``?password=`` (redis-py reads it) too."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"  # the host as written: [::1], unix
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect(settings: Settings) -> redis.Redis:
    """A Redis client that answered a PING; :class:`RedisUnavailable` says why not and how to fix it."""
    conn = settings.redis()
    try:
        conn.ping()
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"Redis at {settings.redacted_redis_url} refused the password: {exc}",
                               "set the password in ASSAYER_REDIS_URL or ASSAYER_REDIS_PASSWORD(_FILE)") from None
    except redis.ConnectionError as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {settings.redacted_redis_url}: {exc}",
            "start one with `assayer up`, or point ASSAYER_REDIS_URL (or --redis-url) at yours",
        ) from None
    return conn

