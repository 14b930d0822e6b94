"""Holds: may a trainer delete this checkpoint yet, or would its evaluation be lost?

Trainers keep only their newest checkpoints (Hugging Face's ``save_total_limit``, Lightning's
``save_top_k``, torchtitan's ``keep_latest_k``). When evaluation is slower than saving, a checkpoint
rotated away before its turn ends ``missing``. A trainer that asks here before deleting keeps each
checkpoint exactly as long as Assayer needs it, without a copy.

The rules, for a path and every watch whose directory holds it (all of them must agree):

* under no watch: deletable (``no-watch``); a path that is already gone: deletable (``gone``);
* a file or directory the watch never evaluates (its ``--regex``, an ignored temp name, a directory
  no layout claims and holding no checkpoint): deletable (``not-a-checkpoint``);
* a checkpoint the ledger does not have at its current version (still being written, not scanned
  yet, or rewritten since): kept (``unqueued``), since the watch will evaluate it; unless the
  watch is paused (``paused``) or ``--every N`` skips its step (``skipped``);
* a baseline entry (there before the watch was added, never evaluated unless asked): deletable
  (``baseline``);
* otherwise deletable only once every evaluator of the watch has a *final* result (ok, failed
  or missing: ``keys.results(watch)`` holds the job id of its ledger slot) for the checkpoint's
  current version (``evaluated``); kept while one has none (``evaluating``). An evaluator added
  to the watch later (no slot yet) is waited for when the watch backfills, not with ``--no-backfill``.

A directory that is not itself a checkpoint (a run folder) is deletable once every checkpoint the
watch finds inside it is. Never delete on doubt: when Redis cannot be reached, :class:`HoldUnknown`
says so, and the integrations (:mod:`assayer.integrations`) keep every checkpoint.

Cost per call: one HVALS of the watches hash, then per watch one HMGET of its ledger and one HMGET of
its results (for any number of paths), plus a ``stat`` of each file (a walk of each directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from . import defaults, keys
from .dirs import version_of_path
from .errors import RedisUnavailable
from .filters import compile_filter
from .layouts import Resolver, dir_step
from .records import LedgerEntry
from .scan import Scanner, is_ignored, parse_step
from .settings import Settings
from .watches import WatchSpec

log = logging.getLogger("assayer.holds")

REDIS_TIMEOUT = 5.0
"""Seconds one Redis command of a hold may take: a trainer asking must never hang on a stuck Redis."""

WAIT_INTERVAL = 1.0
"""Seconds between two looks of :func:`wait`."""

LONG_AFTER = 10**6
"""Seconds ahead a folder's checkpoints are scanned as of: past every settle time, so only format decides."""

DELETABLE_RULES = frozenset({"no-watch", "gone", "not-a-checkpoint", "skipped", "paused", "baseline", "evaluated"})
"""Rules (:attr:`Hold.rule`) that let a checkpoint go; ``unqueued`` and ``evaluating`` keep it."""


class HoldUnknown(RedisUnavailable):
    """Whether a checkpoint may be deleted cannot be told (Redis unreachable): keep it."""


@dataclass(frozen=True)
class Hold:
    """The answer for one path: may it be deleted, by which rule, and what its evaluation waits for."""

    path: str
    deletable: bool
    rule: str  # one of DELETABLE_RULES, "unqueued" or "evaluating"
    reason: str  # for a person: why
    watch: str | None = None  # the watch the answer comes from (the one holding it, if any)
    checkpoint: str | None = None  # the checkpoint it is about, relative to the watch's directory
    done: Mapping[str, str] = field(default_factory=dict)  # evaluator -> final status (ok, failed, missing)
    pending: tuple[str, ...] = ()  # evaluators without a final result yet


@dataclass(frozen=True)
class _Item:
    """One checkpoint a watch evaluates at (or below) the path asked about."""

    relpath: str
    version: str | None  # None: still incomplete (being written)
    step: int | None


class Holds:
    """Asks Redis about holds; the connection is made on first use (from ``settings``, else the environment)."""

    def __init__(self, conn: Any = None, settings: Settings | None = None) -> None:
        self._conn = conn
        self._settings = settings

    @property
    def conn(self) -> Any:
        if self._conn is None:
            settings = self._settings or Settings.from_env()
            # Not settings.redis(): that client has no command timeout, and a trainer must not hang on Redis.
            client = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=REDIS_TIMEOUT,
                                          socket_timeout=REDIS_TIMEOUT)
            with self._asking(settings.redacted_redis_url):
                client.ping()
            self._conn = client
        return self._conn

    def why(self, path: str | os.PathLike[str]) -> Hold:
        return self.why_many([path])[0]

    def may_delete(self, path: str | os.PathLike[str]) -> bool:
        return self.why(path).deletable

    def deletable(self, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The paths among ``paths`` that may be deleted now, in their order (for trainers with their own rotation)."""
        return [h.path for h in self.why_many(paths) if h.deletable]

    def wait(self, path: str | os.PathLike[str], timeout: float | None = None,
             interval: float = WAIT_INTERVAL) -> Hold:
        """Look every ``interval`` seconds until ``path`` may be deleted or ``timeout`` passed (None: forever).

        Returns the last answer: check ``.deletable``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hold = self.why(path)
            left = None if deadline is None else deadline - time.monotonic()
            if hold.deletable or (left is not None and left <= 0):
                return hold
            time.sleep(interval if left is None else max(0.0, min(interval, left)))

    def why_many(self, paths: Sequence[str | os.PathLike[str]]) -> list[Hold]:
        """One answer per path, in order; raises :class:`HoldUnknown` when Redis cannot be asked."""
        wanted = [os.path.abspath(os.fspath(p)) for p in paths]
        conn = self.conn
        with self._asking():
            specs = [WatchSpec.from_json(raw) for raw in conn.hvals(keys.WATCHES)]
        # Per watch, what each path is to it: a list of checkpoints to look up, or a verdict already.
        looks: dict[str, list[tuple[int, list[_Item] | Hold]]] = {}
        gone = [not os.path.lexists(path) for path in wanted]
        for i, path in enumerate(wanted):
            for spec in [] if gone[i] else specs:
                rel = _under(spec.directory, path)
                if rel is not None:  # looked at as the watch's scanner sees it: below the watch's own path
                    seen = os.path.normpath(os.path.join(os.path.abspath(spec.directory), rel))
                    looks.setdefault(spec.name, []).append((i, _items(spec, seen, rel)))
        by_name = {s.name: s for s in specs}
        answers: list[list[Hold]] = [[] for _ in wanted]
        for name, entries in looks.items():
            items = [it for _, found in entries if isinstance(found, list) for it in found]
            verdicts = self._judge(by_name[name], items)
            for i, found in entries:
                if isinstance(found, Hold):
                    answers[i].append(_at(found, wanted[i], name))
                else:
                    answers[i].append(_combine(wanted[i], name, [verdicts[it.relpath] for it in found]))
        return [Hold(path, True, "gone", "it no longer exists") if gone[i] else _first(path, holds)
                for i, (path, holds) in enumerate(zip(wanted, answers))]

    def _judge(self, spec: WatchSpec, items: list[_Item]) -> dict[str, Hold]:
        """The verdict on each checkpoint of one watch: one HMGET of the ledger, one of the results."""
        if not items:
            return {}
        with self._asking():
            raws = self.conn.hmget(keys.ledger(spec.name), [it.relpath for it in items])
        entries = {it.relpath: LedgerEntry.from_json(raw, spec.first) if raw else None for it, raw in zip(items, raws)}
        jobs = sorted({slot.job for e in entries.values() if e is not None for slot in e.evals.values()})
        with self._asking():
            finals = dict(zip(jobs, self.conn.hmget(keys.results(spec.name), jobs))) if jobs else {}
        return {it.relpath: _verdict(spec, it, entries[it.relpath], finals) for it in items}

    @contextlib.contextmanager
    def _asking(self, where: str | None = None) -> Iterator[None]:
        try:
            yield
        except (redis.RedisError, RedisUnavailable) as exc:
            shown = where or (self._settings.redacted_redis_url if self._settings else "Redis")
            raise HoldUnknown(
                f"cannot tell whether checkpoints may be deleted: Redis at {shown} did not answer ({exc})",
                "keep the checkpoints (the integrations do); start Redis (`assayer up`) or point "
                "ASSAYER_REDIS_URL at it",
            ) from None


def _under(directory: str, path: str) -> str | None:
    """``path`` relative to ``directory`` ("." for the directory itself), None when outside it.

    Compared as given first, then with links resolved: a trainer writing through a link to the
    watched directory (or a watch added through one) must not have its checkpoints seen as unwatched.
    """
    for root, target in ((os.path.abspath(directory), path), (os.path.realpath(directory), os.path.realpath(path))):
        if target == root:
            return "."
        if target.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(target, root)
    return None


def _items(spec: WatchSpec, path: str, rel: str) -> list[_Item] | Hold:
    """The checkpoints ``spec``'s scanner takes at ``path``: the path itself, or those inside a folder.

    Mirrors :class:`~assayer.scan.Scanner`'s choices (ignored names, the filter, layouts); a
    verdict instead when there is nothing to look up.
    """
    parts = [] if rel == "." else rel.split(os.sep)
    if any(is_ignored(p, is_dir=True) for p in parts[:-1]):
        return _not_taken(rel, "it lies in an ignored (temporary or hidden) directory")
    pattern = compile_filter(spec.regex)
    resolver = Resolver(spec.layout, spec.ready_markers)
    try:
        if os.path.isdir(path):
            if parts and is_ignored(parts[-1], is_dir=True):
                return _not_taken(rel, "temporary or hidden directories are never checkpoints")
            if parts:
                names = os.listdir(path)
                weights = any(not is_ignored(n) and pattern.search(os.path.join(path, n))
                              and os.path.isfile(os.path.join(path, n)) for n in names)
                layout = resolver.resolve(parts[-1], frozenset(names), weights)
                if layout is not None:
                    if spec.regex != defaults.CHECKPOINT_REGEX and not (
                            pattern.search(path + os.sep) or any(pattern.search(os.path.join(path, n)) for n in names)):
                        return _not_taken(rel, f"the watch's filter {spec.regex!r} leaves it out")
                    return [_Item(rel, version_of_path(path), dir_step(parts[-1]))]
            return _inside(spec, path, rel)
        if not parts or not resolver.files_are_checkpoints or is_ignored(parts[-1]) or not pattern.search(path):
            return _not_taken(rel, f"the watch (filter {spec.regex!r}, layout {spec.layout}) does not evaluate it")
        return [_Item(rel, version_of_path(path), parse_step(rel))]
    except FileNotFoundError:
        return Hold("", True, "gone", "it no longer exists", checkpoint=rel)


def _inside(spec: WatchSpec, path: str, rel: str) -> list[_Item] | Hold:
    """Every checkpoint the watch finds in a folder, complete (with its version) or still being written."""
    scanner = Scanner(path, spec.regex, 0.0, layout=spec.layout, markers=spec.ready_markers,
                      follow_symlinks=spec.follow_symlinks)
    report = scanner.scan(time.time() + LONG_AFTER)
    prefix = "" if rel == "." else rel + os.sep
    found = [_Item(prefix + c.relpath, c.version, c.step) for c in report.ready]
    found += [_Item(prefix + r, None, parse_step(r)) for r in report.pending]
    return found or _not_taken(rel, "the watch finds no checkpoint in it")


def _not_taken(rel: str, why: str) -> Hold:
    return Hold("", True, "not-a-checkpoint", why, checkpoint=rel)


def _verdict(spec: WatchSpec, item: _Item, entry: LedgerEntry | None, finals: Mapping[str, bytes | None]) -> Hold:
    """The rules of the module docstring for one checkpoint of one watch."""
    rel = item.relpath
    if entry is None or item.version is None or entry.version != item.version:
        if spec.paused:
            return Hold("", True, "paused", "not queued, and its watch is paused", checkpoint=rel)
        if spec.every is not None and item.step is not None and item.step % spec.every:
            return Hold("", True, "skipped", f"--every {spec.every} skips step {item.step}", checkpoint=rel)
        state = ("still being written" if item.version is None
                 else "rewritten since it was queued" if entry is not None else "not queued yet")
        return Hold("", False, "unqueued", f"{rel} is {state}: the watch will evaluate it", checkpoint=rel)
    if entry.is_baseline:
        return Hold("", True, "baseline", "it was there when the watch was added (not evaluated unless asked)",
                    checkpoint=rel)
    done: dict[str, str] = {}
    pending: list[str] = []
    for ev in spec.evaluators:
        slot = entry.evals.get(ev.name)
        if slot is None:
            if spec.backfill:
                pending.append(ev.name)  # added to the watch after this was queued: the backfill queues it
            continue
        raw = finals.get(slot.job)
        if raw is None:
            pending.append(ev.name)
        else:
            done[ev.name] = str(_status(raw))
    if pending:
        return Hold("", False, "evaluating", f"{rel} waits for {', '.join(pending)}", checkpoint=rel, done=done,
                    pending=tuple(pending))
    shown = ", ".join(f"{name} {status}" for name, status in done.items()) or "no evaluator waits for it"
    return Hold("", True, "evaluated", f"every evaluation ended ({shown})", checkpoint=rel, done=done)


def _status(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw).get("status") or "final")
    except (ValueError, AttributeError):
        return "final"


def _at(hold: Hold, path: str, watch: str) -> Hold:
    return Hold(path, hold.deletable, hold.rule, hold.reason, watch, hold.checkpoint, hold.done, hold.pending)


def _combine(path: str, watch: str, verdicts: list[Hold]) -> Hold:
    """One watch's answer for a path: its checkpoint's verdict, or for a folder the first one keeping it."""
    keeping = [v for v in verdicts if not v.deletable]
    chosen = keeping[0] if keeping else verdicts[0]
    hold = _at(chosen, path, watch)
    if len(verdicts) > 1 and keeping:
        return Hold(path, False, chosen.rule, f"{len(keeping)} of its {len(verdicts)} checkpoints are kept; "
                    f"first: {chosen.reason}", watch, chosen.checkpoint, chosen.done, chosen.pending)
    if len(verdicts) > 1:
        return Hold(path, True, chosen.rule, f"every one of its {len(verdicts)} checkpoints may go (first: "
                    f"{chosen.reason})", watch)
    return hold


def _first(path: str, holds: list[Hold]) -> Hold:
    """The answer over every watch holding the path: the first that keeps it, else the first watch's."""
    if not holds:
        return Hold(path, True, "no-watch", "no watch covers it")
    return next((h for h in holds if not h.deletable), holds[0])


# -- the module-level API: a fresh connection per call unless one is given ---------------------------


def why(path: str | os.PathLike[str], *, conn: Any = None, settings: Settings | None = None) -> Hold:
    """Why ``path`` may (not) be deleted now; see the module docstring for the rules."""
    return Holds(conn, settings).why(path)


def may_delete(path: str | os.PathLike[str], *, conn: Any = None, settings: Settings | None = None) -> bool:
    """True when deleting ``path`` now loses no evaluation; raises :class:`HoldUnknown` when Redis cannot say."""
    return Holds(conn, settings).may_delete(path)


def deletable(paths: Sequence[str | os.PathLike[str]], *, conn: Any = None,
              settings: Settings | None = None) -> list[str]:
    """The candidates that may be deleted now (absolute paths, in their order): the hook for custom rotations."""
    return Holds(conn, settings).deletable(paths)


def wait(path: str | os.PathLike[str], timeout: float | None = None, *, conn: Any = None,
         settings: Settings | None = None, interval: float = WAIT_INTERVAL) -> Hold:
    """Block until ``path`` may be deleted or ``timeout`` seconds passed (None: no limit); the last answer."""
    return Holds(conn, settings).wait(path, timeout, interval)
