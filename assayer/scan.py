"""Find complete checkpoints under a watched directory, cheaply enough to poll every second.

A :class:`Scanner` keeps, per directory, the directory's mtime and the checkpoint names in it.
A directory is listed again only when its mtime changes (a file was created, renamed or
deleted in it). Files are stat'ed when they are new, not yet handed over, or were modified in
the last :data:`~assayer.defaults.HOT_WINDOW` seconds; every file is stat'ed on a full scan,
every ``full_scan_interval`` seconds, which catches in-place rewrites of old files.

A directory that a layout claims (see :mod:`assayer.layouts`) is one checkpoint: it is not looked
inside as a folder, its files are never checkpoints on their own, and it is handed over once its
layout's rule holds and its members stayed unchanged for the layout's quiet time. A handed-over,
cold directory checkpoint costs one stat per scan, like a folder.

A handed-over directory that loses members while the rest stay unchanged is being deleted (a
trainer's rotation: ``shutil.rmtree`` unlinks one file at a time, and may pause longer than the
quiet time between two). What is left is never a new version, even when its layout would call it
complete, nor a folder of loose checkpoints once its marker is gone: it stays handed over until it
vanishes. A member changed or added is a new version, as always. This needs the handed-over
member set, so a scanner that starts cold in the middle of such a deletion cannot tell (the ledger
then sees a new version).

The cache only saves work: what was already evaluated is decided by the ledger in Redis, so a
cold scanner (a restarted or different worker) is just slower, never wrong.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import defaults
from .dirs import LocalDir, dir_version, file_version, walk
from .filters import compile_filter
from .layouts import Layout, Member, Resolver, dir_step
from .readiness import Format, check_format, settled_at

log = logging.getLogger("assayer.scan")

IGNORED_SUFFIXES = (".tmp", ".temp", ".partial", ".part", ".incomplete", ".lock", ".lck", ".swp", "~", ".crdownload")
"""Names ending so are never checkpoints: writers use them for files that are not done."""

IGNORED_DIR_PREFIXES = ("tmp-", "tmp_")
"""Directories written before an atomic rename (e.g. Hugging Face's ``tmp-checkpoint-500``)."""

IGNORED_DIR_PARTS = (".orbax-checkpoint-tmp",)
"""Orbax writes ``500.orbax-checkpoint-tmp-<time>`` and renames it to ``500`` when finalized."""

SMALL_WATCH = 256
"""Watches with at most this many checkpoints stat every file on every scan."""

_STEP_IN_NAME = re.compile(r"(?:^|[^a-z])(?:global_)?(?:step|iter(?:ation)?)[=_-]?(\d+)|^checkpoint-(\d+)", re.IGNORECASE)
"""Names that say they hold a step: ``step_500``, ``global_step1200``, ``iter-42``, Lightning's ``epoch=3-step=1200``,
``checkpoint-500``. Any other number (``resnet50``, ``-v1``, ``00001-of-00004``, an epoch) is not a step."""

_EPOCH_IN_NAME = re.compile(r"(?:^|[^a-z])epoch[=_-]?(\d+)", re.IGNORECASE)


def is_ignored(name: str, is_dir: bool = False) -> bool:
    """Hidden, temporary, partial and lock files are never checkpoints."""
    if name.startswith("."):
        return True
    if is_dir:
        lowered = name.lower()
        return (name.startswith(IGNORED_DIR_PREFIXES) or lowered.endswith(IGNORED_SUFFIXES)
                or any(part in lowered for part in IGNORED_DIR_PARTS))
    return name.lower().endswith(IGNORED_SUFFIXES)


def parse_step(relpath: str) -> int | None:
    """The training step a checkpoint's name says, else its directory's (``global_step1200/...``), else None.

    Only names that say "step" count (see ``_STEP_IN_NAME``); when none does, the evaluator may report
    the step (``ctx.step = ...`` or a ``_step`` metric).
    """
    name = os.path.basename(relpath)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    found = _STEP_IN_NAME.findall(stem)
    if found:
        return int(next(g for g in found[-1] if g))
    parent = os.path.basename(os.path.dirname(relpath))
    return dir_step(parent) if parent and not parent.isdigit() else None


def parse_epoch(relpath: str) -> int | None:
    """The epoch a checkpoint's name says (``epoch=3``, ``epoch_3``), kept apart from steps."""
    found = _EPOCH_IN_NAME.findall(os.path.basename(relpath))
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Candidate:
    """A complete checkpoint version, ready to be evaluated unless the ledger knows it."""

    path: str
    relpath: str
    version: str
    step: int | None
    layout: str = "file"
    epoch: int | None = None
    mtime: float | None = None  # when this version was written (the newest member's, for a directory)


@dataclass
class ScanReport:
    ready: list[Candidate] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # pending checkpoint -> what it waits for
    changed: bool = False  # a directory was listed anew, or a checkpoint version appeared: not a quiet scan
    stalled: dict[str, float] = field(default_factory=dict)  # incomplete and unchanged for stall_after: age
    truncated: bool = False  # the scan ran out of its time budget; the next one goes on (cached parts cost a stat)
    errors: list[str] = field(default_factory=list)
    next_check: float | None = None
    files: int = 0
    missing_root: bool = False

    def wake_at(self, when: float) -> None:
        self.next_check = when if self.next_check is None else min(self.next_check, when)


@dataclass
class _File:
    version: str
    mtime: float
    first_seen: float
    format: Format | None = None
    done: bool = False
    recheck_at: float = 0.0


@dataclass
class _DirCheckpoint:
    """A directory checkpoint's last seen version."""

    layout: Layout
    version: str
    mtime: float  # newest member's
    first_seen: float
    done: bool = False
    formats: dict[str, tuple[str, Format]] = field(default_factory=dict)
    members: frozenset[tuple[str, str]] = frozenset()  # (member, its version): what was handed over once done

    def deleting(self, members: Mapping[str, Member]) -> bool:
        """Whether ``members`` is this handed-over version losing files: a strict subset, every rest unchanged."""
        return self.done and frozenset((rel, m.version) for rel, m in members.items()) < self.members


@dataclass
class _Dir:
    path: str
    mtime_ns: int
    files: set[str]
    subdirs: set[str]  # paths relative to the root
    hot: set[str] = field(default_factory=set)  # files to stat even when the directory is unchanged
    layout: Layout | None = None  # set when this directory is itself a checkpoint
    excluded: bool = False  # a directory checkpoint that the watch's own --regex leaves out


class Scanner:
    """Incremental scanner of one watched directory tree."""

    def __init__(
        self,
        root: str,
        regex: str = defaults.CHECKPOINT_REGEX,
        settle: float = defaults.SETTLE,
        full_scan_interval: float = defaults.FULL_SCAN_INTERVAL,
        hot_window: float = defaults.HOT_WINDOW,
        layout: str = "auto",
        markers: tuple[str, ...] | list[str] = (),
        quiet: float = defaults.DIR_QUIET,
        follow_symlinks: bool = False,
        stall_after: float = defaults.STALL_AFTER,
    ) -> None:
        self.root = os.path.abspath(root)
        self.pattern = compile_filter(regex)
        # The default filter names file extensions; it does not apply to directories a layout claims.
        self.filter_dirs = regex != defaults.CHECKPOINT_REGEX
        self.settle = settle
        self.quiet = min(quiet, settle)
        self.full_scan_interval = full_scan_interval
        self.hot_window = hot_window
        self.resolver = Resolver(layout, tuple(markers))
        self.follow_symlinks = follow_symlinks
        self.stall_after = stall_after
        self._dirs: dict[str, _Dir] = {}
        self._files: dict[str, _File] = {}
        self._ckpts: dict[str, _DirCheckpoint] = {}
        self._last_full = float("-inf")
        self._deadline: float | None = None
        self.generation = 0  # bumped whenever the set of listed directories changes

    @property
    def options(self) -> tuple[object, ...]:
        """What the scanner was built from; a watch whose options differ needs a new scanner."""
        return (self.root, self.pattern.pattern, self.settle, self.resolver.layout, self.resolver.marker.markers,
                self.follow_symlinks, self.stall_after)

    def directories(self) -> set[str]:
        """Absolute paths of every directory this scanner lists (folders and directory checkpoints)."""
        return {d.path for d in self._dirs.values()}

    def force_full(self) -> None:
        self._last_full = float("-inf")

    def mark_done(self, relpath: str, version: str) -> None:
        """The caller handed this version over (enqueued it, or the ledger already had it)."""
        ckpt = self._ckpts.get(relpath)
        if ckpt is not None and ckpt.version == version:
            ckpt.done = True
            return
        state = self._files.get(relpath)
        if state is not None and state.version == version:
            state.done = True
            folder = self._dirs.get(os.path.dirname(relpath))
            if folder is not None and time.time() - state.mtime > self.hot_window:
                folder.hot.discard(os.path.basename(relpath))

    def scan(self, now: float, budget: float | None = None) -> ScanReport:
        """Look at the tree once; with ``budget``, stop after that many seconds and say so (``truncated``).

        A truncated scan keeps what it learnt: the directories it listed are cached, so the next
        scan passes them with one stat each and gets further. Nothing is forgotten on its account.
        """
        full = now - self._last_full >= self.full_scan_interval
        if full:
            self._last_full = now
        report = ScanReport()
        seen_dirs: set[str] = set()
        self._deadline = None if budget is None else time.monotonic() + budget
        self._scan_dir("", now, full, set(), seen_dirs, report)
        for gone in set() if report.truncated else set(self._dirs) - seen_dirs:
            self._forget_dir(gone)
            report.changed = True
        report.files = len(self._files) + len(self._ckpts)
        if report.changed:
            self.generation += 1
        return report

    def _scan_dir(
        self, rel: str, now: float, full: bool, visited: set[tuple[int, int]], seen: set[str], report: ScanReport
    ) -> None:
        if self._deadline is not None and (report.truncated or time.monotonic() > self._deadline):
            report.truncated = True
            return
        cached = self._dirs.get(rel)
        path = cached.path if cached is not None else (os.path.join(self.root, rel) if rel else self.root)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._forget_dir(rel)
            report.missing_root = report.missing_root or rel == ""
            return
        except OSError as exc:
            report.errors.append(f"{path}: {exc.strerror or exc}")
            return
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in visited:
            return  # not a directory, or a symlink loop / second path to a directory already scanned
        visited.add((st.st_dev, st.st_ino))
        seen.add(rel)
        listed = full or cached is None or cached.mtime_ns != st.st_mtime_ns
        if listed:
            cached = self._relist(rel, path, st.st_mtime_ns, cached, report)
            if cached is None:
                return
        assert cached is not None
        if cached.layout is not None:
            if not cached.excluded:
                self._check_dir(rel, cached, now, listed, report)
            return
        stat_all = listed or len(self._files) <= SMALL_WATCH
        # Idle cost: an unchanged directory costs one stat plus its hot files, never a walk over cold ones.
        cached.hot = {name for name in (cached.files if stat_all else cached.hot)
                      if self._check_file(os.path.join(rel, name), now, report, force=stat_all)}
        for sub in cached.subdirs:
            self._scan_dir(sub, now, full, visited, seen, report)

    def _relist(self, rel: str, path: str, mtime_ns: int, cached: _Dir | None, report: ScanReport) -> _Dir | None:
        fresh = self._list(rel, path, mtime_ns, report)
        if fresh is None:
            return None
        if cached is not None and cached.layout is not None and fresh.layout is not cached.layout \
                and self._being_deleted(rel, path):
            # Its marker (or the name its layout knew it by) was deleted first: the rest is not a new
            # checkpoint, nor a folder of loose ones.
            fresh.layout, fresh.excluded, fresh.files = cached.layout, cached.excluded, set()
        if cached is None or cached.mtime_ns != mtime_ns or cached.layout is not fresh.layout:
            report.changed = True
        if cached is not None:
            for name in cached.files - fresh.files:
                self._files.pop(os.path.join(rel, name), None)
        if fresh.layout is not None:  # a checkpoint now: nothing below it is looked at on its own
            self._forget_below(rel)
        else:
            self._ckpts.pop(rel, None)
        self._dirs[rel] = fresh
        return fresh

    def _list(self, rel: str, path: str, mtime_ns: int, report: ScanReport) -> _Dir | None:
        files: set[str] = set()
        subdirs: set[str] = set()
        names: set[str] = set()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    names.add(entry.name)
                    try:
                        if entry.is_symlink() and not self._link_allowed(entry.path):
                            continue  # a link out of the watched tree (to /etc/passwd, say) is never followed
                        if entry.is_dir():
                            if not is_ignored(entry.name, is_dir=True):
                                subdirs.add(os.path.join(rel, entry.name))
                        elif entry.is_file() and not is_ignored(entry.name) and self.pattern.search(entry.path):
                            files.add(entry.name)
                    except OSError:
                        continue  # vanished or unreadable between listing and looking
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                report.errors.append(f"{path}: {exc.strerror or exc}")
            return None
        layout = self.resolver.resolve(os.path.basename(rel), frozenset(names), bool(files)) if rel else None
        if not self.resolver.files_are_checkpoints:
            files = set()
        excluded = layout is not None and self.filter_dirs and not (
            self.pattern.search(path + os.sep) or any(self.pattern.search(os.path.join(path, n)) for n in names))
        return _Dir(path, mtime_ns, files, subdirs, layout=layout, excluded=excluded)

    def _being_deleted(self, rel: str, path: str) -> bool:
        state = self._ckpts.get(rel)
        if state is None or not state.done:
            return False
        try:
            return state.deleting(walk(path))
        except OSError:  # gone, unreadable or too large: judged as usual
            return False

    def _link_allowed(self, path: str) -> bool:
        if self.follow_symlinks:
            return True
        real = os.path.realpath(path)
        root = os.path.realpath(self.root)
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def _forget_below(self, rel: str) -> None:
        prefix = rel + os.sep
        for name in [d for d in self._dirs if d.startswith(prefix)]:
            del self._dirs[name]
        for name in [f for f in self._files if f.startswith(prefix)]:
            del self._files[name]
        for name in [c for c in self._ckpts if c.startswith(prefix)]:
            del self._ckpts[name]

    def _forget_dir(self, rel: str) -> None:
        self._dirs.pop(rel, None)
        self._ckpts.pop(rel, None)
        if rel:
            self._forget_below(rel)
        else:
            self._dirs.clear()
            self._files.clear()
            self._ckpts.clear()

    def _check_dir(self, rel: str, folder: _Dir, now: float, listed: bool, report: ScanReport) -> None:
        """Look at one directory checkpoint: walk its members unless it is handed over, cold and unchanged."""
        assert folder.layout is not None
        state = self._ckpts.get(rel)
        if state is not None and state.done and not listed and now - state.mtime > self.hot_window:
            return
        try:
            members = walk(folder.path)
        except FileNotFoundError:  # deleted since it was listed: forgotten on the next listing of its parent
            self._ckpts.pop(rel, None)
            return
        except OSError as exc:  # unreadable, or TooManyMembers
            report.errors.append(f"{folder.path}: {exc.strerror or exc}")
            return
        version = dir_version(members)
        if state is not None and state.deleting(members):
            return  # being deleted: what is left is not a new version (it is forgotten once the directory is gone)
        if state is None or state.version != version or state.layout is not folder.layout:
            newest = max((m.mtime for m in members.values()), default=0.0)
            formats = state.formats if state is not None else {}
            state = self._ckpts[rel] = _DirCheckpoint(folder.layout, version, newest, now, formats=formats,
                                                      members=frozenset((r, m.version) for r, m in members.items()))
            report.changed = True
        if state.done:
            return
        verdict = folder.layout.check(LocalDir(folder.path, members, state.formats))
        state.formats = {k: v for k, v in state.formats.items() if k in members}
        if not verdict.complete:
            report.pending.append(rel)
            report.waiting[rel] = verdict.waiting
            if members and now - state.mtime >= self.stall_after:
                report.stalled[rel] = now - state.mtime
            return
        due = settled_at(state.mtime, state.first_seen, self.settle if folder.layout.settle_only else self.quiet)
        if now >= due:
            name = os.path.basename(rel)
            report.ready.append(Candidate(folder.path, rel, version, dir_step(name), folder.layout.name,
                                          mtime=state.mtime))
        else:
            report.pending.append(rel)
            report.waiting[rel] = f"its files to stay unchanged until {due - now:.1f}s from now"
            report.wake_at(due)

    def _check_file(self, relpath: str, now: float, report: ScanReport, force: bool = True) -> bool:
        """Look at one file; return whether it stays hot (not handed over, or recently modified).

        A hot file already handed over is re-stat'ed every HOT_RECHECK seconds, not every scan: that
        is what an in-place rewrite waits for, and what keeps a fresh run of many files cheap.
        """
        known = self._files.get(relpath)
        if not force and known is not None and known.done and now < known.recheck_at:
            return now - known.mtime <= self.hot_window
        path = os.path.join(self.root, relpath)
        try:
            st = os.stat(path)
            version = file_version(st)
            state = self._files.get(relpath)
            if state is None or state.version != version:
                state = self._files[relpath] = _File(version, st.st_mtime, now)
                report.changed = True
            if state.done:
                state.recheck_at = now + defaults.HOT_RECHECK
                return now - state.mtime <= self.hot_window
            if state.format is None or state.format is Format.UNKNOWN:
                state.format = check_format(path, st.st_size)
        except FileNotFoundError:  # deleted between listing and looking, or mid-read
            self._files.pop(relpath, None)
            return False
        except OSError as exc:
            report.errors.append(f"{path}: {exc.strerror or exc}")
            return True
        due = now if state.format is Format.COMPLETE else settled_at(st.st_mtime, state.first_seen, self.settle)
        if state.format is not Format.INCOMPLETE and now >= due:
            report.ready.append(Candidate(path, relpath, version, parse_step(relpath), epoch=parse_epoch(relpath),
                                          mtime=st.st_mtime))
        else:
            report.pending.append(relpath)
            report.waiting[relpath] = "still being written" if state.format is Format.INCOMPLETE else "settling"
            if state.format is Format.UNKNOWN:
                report.wake_at(due)
            elif now - st.st_mtime >= self.stall_after:
                report.stalled[relpath] = now - st.st_mtime
        return True
