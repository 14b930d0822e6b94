"""Trainer integrations: keep the newest checkpoints, delete older ones once Assayer is done with them.

:class:`Rotation` is the policy every integration shares (:mod:`.hf` for transformers' Trainer,
:mod:`.lightning` for Lightning's ModelCheckpoint); a trainer with a rotation of its own can call
:func:`assayer.holds.deletable` instead. Neither this module nor :mod:`assayer.holds` imports a
training framework.

The policy: of the checkpoints given (oldest first), the newest ``keep_last`` always stay; an
older one is deleted once :mod:`assayer.holds` says it may be (every evaluation of it ended, or
Assayer never evaluates it), or, with ``max_wait_s``, once it has been older than the newest
``keep_last`` for that long (logged as a warning: its evaluation will end ``missing``). When Redis
cannot be asked, nothing is deleted, whatever the time: never delete on doubt.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ..errors import ConfigError
from ..holds import WAIT_INTERVAL, Hold, Holds, HoldUnknown
from ..settings import Settings

log = logging.getLogger("assayer.integrations")


class Rotation:
    """Keep the newest ``keep_last`` checkpoints; delete older ones once no evaluation needs them."""

    def __init__(self, keep_last: int = 2, max_wait_s: float | None = None, *, conn: Any = None,
                 settings: Settings | None = None, holds: Holds | None = None) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be a whole number >= 1, got {keep_last!r}",
                              "keep at least the newest checkpoint: keep_last=1 or more")
        if max_wait_s is not None and max_wait_s < 0:
            raise ConfigError(f"max_wait_s must be >= 0 or None, got {max_wait_s!r}",
                              "None waits for Assayer forever; a number of seconds deletes after that long")
        self.keep_last = keep_last
        self.max_wait_s = max_wait_s
        self.holds = holds or Holds(conn, settings)
        self.kept: dict[str, Hold] = {}  # older checkpoints kept at the last look, with why
        self._since: dict[str, float] = {}  # path -> when it was first seen older than the newest keep_last
        self._said: set[str] = set()  # warnings given once

    def prune(self, checkpoints: Sequence[str | os.PathLike[str]], keep: Collection[str | None] = ()) -> list[str]:
        """Delete what may go among ``checkpoints`` (oldest first) but the newest ``keep_last`` and ``keep``.

        Returns the paths deleted. Never raises for Redis: when it cannot be asked, every checkpoint stays.
        """
        paths = [os.path.abspath(os.fspath(p)) for p in checkpoints]
        exempt = {os.path.abspath(p) for p in keep if p}
        older = [p for p in paths[: max(0, len(paths) - self.keep_last)] if p not in exempt]
        now = time.monotonic()
        self._since = {p: self._since.get(p, now) for p in older}
        if not older:
            self.kept = {}
            return []
        try:
            holds = self.holds.why_many(older)
        except HoldUnknown as exc:
            self._once(f"keeping every checkpoint: {exc}", str(exc.message))
            self.kept = {p: Hold(p, False, "unknown", exc.message) for p in older}
            return []
        deleted: list[str] = []
        self.kept = {}
        for hold in holds:
            waited = now - self._since[hold.path]
            if hold.rule == "no-watch":
                self._once(f"no Assayer watch covers {os.path.dirname(hold.path)}: its checkpoints are rotated "
                           "at once (add a watch: `assayer watch add DIR -e ...`)", "no-watch:" + hold.path)
            if hold.deletable:
                log.info("deleting %s: %s", hold.path, hold.reason)
            elif self.max_wait_s is not None and waited >= self.max_wait_s:
                log.warning("deleting %s after waiting %.0f s (max_wait_s=%s) although %s; its evaluation will "
                            "end missing", hold.path, waited, self.max_wait_s, hold.reason)
            else:
                self.kept[hold.path] = hold
                continue
            if remove(hold.path):
                deleted.append(hold.path)
                self._since.pop(hold.path, None)
        if self.kept:
            log.debug("keeping %d older checkpoint(s) for Assayer: %s", len(self.kept),
                      "; ".join(h.reason for h in self.kept.values()))
        return deleted

    def drain(self, listing: Callable[[], Sequence[str]], keep: Collection[str | None] = (),
              timeout: float = 0.0, interval: float = WAIT_INTERVAL) -> list[str]:
        """Prune ``listing()`` until only the newest ``keep_last`` (and ``keep``) remain, or ``timeout`` passed.

        For the end of training: with ``timeout`` 0 it prunes once; what is still held stays on
        disk (Assayer evaluates it; prune again later to delete it).
        """
        deadline = time.monotonic() + timeout
        deleted = self.prune(listing(), keep)
        while self.kept and time.monotonic() < deadline:
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
            deleted += self.prune(listing(), keep)
        if self.kept:
            log.info("training ended with %d older checkpoint(s) kept for Assayer: %s", len(self.kept),
                     ", ".join(sorted(self.kept)))
        return deleted

    def _once(self, message: str, key: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)


def remove(path: str) -> bool:
    """Delete a checkpoint file or directory; False (logged) when it cannot be. A link is removed, not followed."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)
        return False
    return True
