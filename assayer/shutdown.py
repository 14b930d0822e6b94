"""Drop-in for the original ``python -m assayer.shutdown``: stop every worker gracefully.

Workers finish their current evaluation; queued evaluations stay queued (the original emptied
the queues; pass ``--purge`` for that).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import connect, setup_logging
from .errors import AssayerError
from .settings import Settings
from .stack import request_shutdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m assayer.shutdown", description=__doc__)
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


if __name__ == "__main__":
    sys.exit(main())
