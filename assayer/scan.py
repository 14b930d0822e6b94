"""Find complete checkpoints under a watched directory, cheaply enough to poll every second.

A :class:`Scanner` keeps, per directory, the directory's mtime and the checkpoint names in it.
A directory is listed again only when its mtime changes (a file was created, renamed or
deleted in it). Files are stat'ed when they are new, not yet handed over, or were modified in
the last :data:`~assayer.defaults.HOT_WINDOW` seconds; every file is stat'ed on a full scan,
every ``full_scan_interval`` seconds, which catches in-place rewrites of old files.

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
from dataclasses import dataclass, field

from . import defaults
from .readiness import Format, check_format, settled_at

log = logging.getLogger("assayer.scan")

IGNORED_SUFFIXES = (".tmp", ".temp", ".partial", ".part", ".incomplete", ".lock", ".lck", ".swp", "~", ".crdownload")
"""Names ending so are never checkpoints: writers use them for files that are not done."""

IGNORED_DIR_PREFIXES = ("tmp-", "tmp_")
"""Directories written before an atomic rename (e.g. Hugging Face's ``tmp-checkpoint-500``)."""

SMALL_WATCH = 256
"""Watches with at most this many checkpoints stat every file on every scan."""

_STEP_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (r"step[=_-]?(\d+)", r"iter(?:ation)?[=_-]?(\d+)", r"epoch[=_-]?(\d+)")]
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def is_ignored(name: str, is_dir: bool = False) -> bool:
    """Hidden, temporary, partial and lock files are never checkpoints."""
    if name.startswith("."):
        return True
    if is_dir:
        return name.startswith(IGNORED_DIR_PREFIXES)
    return name.lower().endswith(IGNORED_SUFFIXES)


def parse_step(relpath: str) -> int | None:
    """The training step a checkpoint name tells: ``step=1200``, ``iter_500``, ``epoch3``, else its last number."""
    name = os.path.basename(relpath)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    for pattern in _STEP_PATTERNS:
        found = pattern.findall(stem)
        if found:
            return int(found[-1])
    match = _LAST_NUMBER.search(stem)
    if match:
        return int(match.group(1))
    parent = os.path.basename(os.path.dirname(relpath))  # e.g. checkpoint-500/model.safetensors
    match = _LAST_NUMBER.search(parent)
    return int(match.group(1)) if match else None


def version_of(st: os.stat_result) -> str:
    """A file version: a rename-over changes the inode, a rewrite in place the size or mtime."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


@dataclass(frozen=True)
class Candidate:
    """A complete checkpoint version, ready to be evaluated unless the ledger knows it."""

    path: str
    relpath: str
    version: str
    step: int | None


@dataclass
class ScanReport:
    ready: list[Candidate] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
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


@dataclass
class _Dir:
    path: str
    mtime_ns: int
    files: set[str]
    subdirs: set[str]  # paths relative to the root
    hot: set[str] = field(default_factory=set)  # files to stat even when the directory is unchanged


class Scanner:
    """Incremental scanner of one watched directory tree."""

    def __init__(
        self,
        root: str,
        regex: str = defaults.CHECKPOINT_REGEX,
        settle: float = defaults.SETTLE,
        full_scan_interval: float = defaults.FULL_SCAN_INTERVAL,
        hot_window: float = defaults.HOT_WINDOW,
    ) -> None:
        self.root = os.path.abspath(root)
        self.pattern = re.compile(regex)
        self.settle = settle
        self.full_scan_interval = full_scan_interval
        self.hot_window = hot_window
        self._dirs: dict[str, _Dir] = {}
        self._files: dict[str, _File] = {}
        self._last_full = float("-inf")

    def mark_done(self, relpath: str, version: str) -> None:
        """The caller handed this version over (enqueued it, or the ledger already had it)."""
        state = self._files.get(relpath)
        if state is not None and state.version == version:
            state.done = True
            folder = self._dirs.get(os.path.dirname(relpath))
            if folder is not None and time.time() - state.mtime > self.hot_window:
                folder.hot.discard(os.path.basename(relpath))

    def scan(self, now: float) -> ScanReport:
        full = now - self._last_full >= self.full_scan_interval
        if full:
            self._last_full = now
        report = ScanReport()
        seen_dirs: set[str] = set()
        self._scan_dir("", now, full, set(), seen_dirs, report)
        for gone in set(self._dirs) - seen_dirs:
            self._forget_dir(gone)
        report.files = len(self._files)
        return report

    def _scan_dir(
        self, rel: str, now: float, full: bool, visited: set[tuple[int, int]], seen: set[str], report: ScanReport
    ) -> None:
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
            fresh = self._list(rel, path, st.st_mtime_ns, report)
            if fresh is None:
                return
            if cached is not None:
                for name in cached.files - fresh.files:
                    self._files.pop(os.path.join(rel, name), None)
            cached = self._dirs[rel] = fresh
        assert cached is not None
        stat_all = listed or len(self._files) <= SMALL_WATCH
        # Idle cost: an unchanged directory costs one stat plus its hot files, never a walk over cold ones.
        cached.hot = {name for name in (cached.files if stat_all else cached.hot)
                      if self._check_file(os.path.join(rel, name), now, report)}
        for sub in cached.subdirs:
            self._scan_dir(sub, now, full, visited, seen, report)

    def _list(self, rel: str, path: str, mtime_ns: int, report: ScanReport) -> _Dir | None:
        files: set[str] = set()
        subdirs: set[str] = set()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
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
        return _Dir(path, mtime_ns, files, subdirs)

    def _forget_dir(self, rel: str) -> None:
        prefix = rel + os.sep if rel else ""
        for name in [d for d in self._dirs if d == rel or d.startswith(prefix)]:
            self._dirs.pop(name, None)
        for name in [f for f in self._files if f.startswith(prefix)]:
            del self._files[name]

    def _check_file(self, relpath: str, now: float, report: ScanReport) -> bool:
        """Look at one file; return whether it stays hot (not handed over, or recently modified)."""
        path = os.path.join(self.root, relpath)
        try:
            st = os.stat(path)
            version = version_of(st)
            state = self._files.get(relpath)
            if state is None or state.version != version:
                state = self._files[relpath] = _File(version, st.st_mtime, now)
            if state.done:
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
            report.ready.append(Candidate(path, relpath, version, parse_step(relpath)))
        else:
            report.pending.append(relpath)
            if state.format is Format.UNKNOWN:
                report.wake_at(due)
        return True
