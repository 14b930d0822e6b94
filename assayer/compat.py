"""The original amoudgl/assayer command line, kept for its users: ``python -m assayer.watch`` and
``python -m assayer.shutdown`` (thin entry points that call :func:`watch_main` and :func:`shutdown_main`).

Flags keep their original spelling (``--regex_filter``, ``--polling_interval``, ``--redis_host``,
...), and hints in error messages are rewritten to name them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from . import watches
from .cli import setup_logging
from .errors import AssayerError
from .settings import Settings, connect
from .workers import request_shutdown

WATCH_DOC = """Drop-in for the original ``python -m assayer.watch --directory D --evaluator REF ...``.

Registers the watch, starts the requested local workers in the background (logs under
``$ASSAYER_HOME/logs``) and exits, as the original did; ``python -m assayer.shutdown`` stops
them gracefully. Unlike the original, queued work survives the shutdown."""

SHUTDOWN_DOC = """Drop-in for the original ``python -m assayer.shutdown``: stop every worker gracefully.

Workers finish their current evaluation; queued evaluations stay queued (the original emptied
the queues; pass ``--purge`` for that)."""

FLAGS = ((re.compile(r"--regex(?![_\w])"), "--regex_filter"), (re.compile(r"--poll-interval"), "--polling_interval"),
         (re.compile(r"--eval-existing"), "--eval_existing"),
         (re.compile(r"--redis-url(?: \(or [^)]*\))?"), "--redis_host and --redis_port"),
         (re.compile(r"pick another --name, or"), "watch another directory, or"),
         (re.compile(r"e\.g\. --name \w+"), "rename the directory"))
"""Assayer's flag names in hints, as this command line spells them."""


def _own_flags(text: str) -> str:
    for pattern, own in FLAGS:
        text = pattern.sub(own, text)
    return text


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


def watch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m assayer.watch", description=WATCH_DOC)
    p.add_argument("--directory", required=True, help="checkpoints directory (watched recursively)")
    p.add_argument("--evaluator", required=True, help="path/to/file.py:fn or module.fn")
    p.add_argument("--regex_filter", default=None, help="regex searched in each checkpoint's path")
    p.add_argument("--num_eval_workers", type=int, default=5, help="eval workers to start")
    p.add_argument("--num_watch_workers", type=int, default=1, help="watch workers to start")
    p.add_argument("--polling_interval", type=float, default=None, help="seconds between scans")
    p.add_argument("--watch_queue_name", default=None, help="watch queue name")
    p.add_argument("--eval_queue_name", default=None, help="eval queue name")
    p.add_argument("--eval_existing", nargs="?", const=True, default=False, type=_bool,
                   help="evaluate checkpoints already in the directory")
    p.add_argument("--noeval_existing", dest="eval_existing", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--redis_host", default=None, help="Redis host")
    p.add_argument("--redis_port", type=int, default=None, help="Redis port")
    return p


def _settings_from(args: argparse.Namespace) -> Settings:
    url = None
    if args.redis_host or args.redis_port:
        url = f"redis://{args.redis_host or 'localhost'}:{args.redis_port or 6379}/0"
    return Settings.from_env(redis_url=url, watch_queue=args.watch_queue_name, eval_queue=args.eval_queue_name,
                             poll_interval=args.polling_interval)


def watch_main(argv: list[str] | None = None) -> int:
    args = watch_parser().parse_args(argv)
    setup_logging("WARNING")
    try:
        settings = _settings_from(args)
        conn = connect(settings)
        spec, warnings = watches.build_spec(args.directory, args.evaluator, regex=args.regex_filter,
                                            eval_existing=args.eval_existing)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"watch {spec.name} {watches.register(conn, settings, spec)}: {spec.directory} -> {spec.evaluator}")
    except AssayerError as exc:
        print(f"error: {_own_flags(str(exc))}", file=sys.stderr)
        return exc.exit_code
    env = dict(os.environ, ASSAYER_REDIS_URL=settings.effective_redis_url, ASSAYER_WATCH_QUEUE=settings.watch_queue,
               ASSAYER_EVAL_QUEUE=settings.eval_queue, ASSAYER_POLL_INTERVAL=str(settings.poll_interval))
    logs = Path(settings.home) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for role, count in (("watch", args.num_watch_workers), ("eval", args.num_eval_workers)):
        for i in range(count):
            with open(logs / f"{role}-{i}.log", "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "assayer", "worker", role], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            print(f"started {role} worker pid {proc.pid} (log {logs / f'{role}-{i}.log'})")
    return 0


def shutdown_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m assayer.shutdown", description=SHUTDOWN_DOC)
    p.add_argument("--redis_host", default=None)
    p.add_argument("--redis_port", type=int, default=None)
    p.add_argument("--watch_queue_name", default=None)
    p.add_argument("--eval_queue_name", default=None)
    p.add_argument("--purge", action="store_true", help="also drop queued evaluations")
    args = p.parse_args(argv)
    setup_logging(os.environ.get("ASSAYER_LOG_LEVEL", "INFO"))
    url = None
    if args.redis_host or args.redis_port:
        url = f"redis://{args.redis_host or 'localhost'}:{args.redis_port or 6379}/0"
    try:
        settings = Settings.from_env(redis_url=url, watch_queue=args.watch_queue_name, eval_queue=args.eval_queue_name)
        count = request_shutdown(connect(settings), settings, args.purge)
    except AssayerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"shutdown requested for {count} worker(s)")
    return 0
