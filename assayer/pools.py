"""Evaluation pools: which eval workers may run which evaluator, and the rq queues that say so.

An evaluator names a pool (``--pool mmlu=gpu``); eval workers serve the pools they are given
(``assayer worker eval --pool gpu,default``), so a GPU evaluation only ever runs on a GPU worker.
Each pool has two queues: new checkpoints go to its queue, re-evaluations of older ones
(backfill) to ``<queue>-backfill``. A worker listens to the new-work queues of its pools before
their backfill queues, and rq takes a job from the first queue that has one, so a new
checkpoint is always the next evaluation to start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import redis

from . import keys
from .errors import ConfigError
from .settings import Settings

DEFAULT = "default"

POOL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?")
"""Pool names: short DNS labels, so the chart can name a Deployment after each."""

BACKFILL_SUFFIX = "-backfill"


def check(name: str) -> str:
    if not POOL_RE.fullmatch(name or ""):
        raise ConfigError(f"pool name {name!r} is not valid",
                          "use lower-case letters, digits and '-' (at most 30, e.g. gpu or a100-80g)")
    return name


def parse(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``gpu,default`` (or a list) as a tuple of checked pool names; empty means the default pool."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    names = tuple(dict.fromkeys(check(n.strip()) for n in items if n.strip()))
    return names or (DEFAULT,)


def queue(settings: Settings, pool: str, backfill: bool = False) -> str:
    """The rq queue of ``pool``'s new work (or its backfill work)."""
    name = settings.eval_queue if pool == DEFAULT else f"{settings.eval_queue}-{pool}"
    return name + BACKFILL_SUFFIX if backfill else name


def worker_queues(settings: Settings, pools: Iterable[str]) -> list[str]:
    """What a worker serving ``pools`` listens to, in order: new work of each pool, then backfill of each."""
    pools = list(pools)
    return [queue(settings, p) for p in pools] + [queue(settings, p, backfill=True) for p in pools]


def known(conn: redis.Redis, settings: Settings) -> list[str]:
    """Pools named by some watch's evaluators, the default one and those this process serves."""
    from .watches import WatchSpec

    names = {DEFAULT, *settings.pools}
    for raw in conn.hvals(keys.WATCHES):
        names.update(e.pool for e in WatchSpec.from_json(raw).evaluators)
    return sorted(names)


def all_queues(conn: redis.Redis, settings: Settings) -> list[str]:
    """Every eval queue of every known pool (what status, the sweep and shutdown look at)."""
    return worker_queues(settings, known(conn, settings))
