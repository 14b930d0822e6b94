"""Wake a watch as soon as one of its directories changes (Linux inotify), so quiet watches can be polled rarely.

Polling stays the source of truth: an event only moves the watch's next scan to now. A watch is
*covered* when every directory its scanner lists is watched here; covered watches that stayed
quiet are polled every :data:`~assayer.defaults.NOTIFIED_IDLE_POLL` seconds, the others every
``idle_poll_interval``. Network filesystems (NFS, SMB, Lustre, FUSE mounts, ...) deliver no events
for writes made on other machines, so watches on them are never covered and keep polling.

An overflow of the kernel's event queue wakes every watch and makes its next scan a full one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("assayer.notify")

IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000

MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
        | IN_MOVE_SELF | IN_ONLYDIR)
"""Creation, rename, deletion and the close of a written file: no event per write() of a large file."""

EVENT = struct.Struct("iIII")

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "9p", "virtiofs", "davfs", "panfs", "orangefs", "fuse")
"""Filesystem types (or prefixes, as ``fuse.sshfs``) whose changes made elsewhere raise no inotify event."""


def network_filesystem(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the network filesystem ``path`` lies on, or None for a local one."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open(mountinfo) as fh:
            for line in fh:
                head, _, tail = line.partition(" - ")
                fields = head.split()
                if len(fields) < 5 or not tail:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, tail.split()[0]
    except OSError:
        return None
    return fstype if fstype.split(".")[0] in NETWORK_FS else None


class Notifier:
    """One inotify instance for all watches of a watch worker; ``run`` reads events in a thread."""

    def __init__(self, on_change: Callable[[set[str]], None]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.on_change = on_change
        self.overflows = 0
        self._lock = threading.Lock()
        self._wd_path: dict[int, str] = {}
        self._path_wd: dict[str, int] = {}
        self._path_watches: dict[str, set[str]] = {}
        self._watch_paths: dict[str, set[str]] = {}
        self._covered: set[str] = set()
        self._network: dict[str, str | None] = {}
        self._warned: set[str] = set()

    def covers(self, watch: str) -> bool:
        return watch in self._covered

    def sync(self, watch: str, root: str, paths: Iterable[str]) -> bool:
        """Watch exactly ``paths`` for ``watch``; return whether every one of them is watched."""
        if root not in self._network:
            self._network[root] = network_filesystem(root)
        fstype = self._network[root]
        wanted = set() if fstype else set(paths)
        covered = fstype is None and bool(wanted)
        with self._lock:
            current = self._watch_paths.get(watch, set())
            for path in current - wanted:
                self._release(watch, path)
            for path in wanted - current:
                if not self._hold(watch, path):
                    covered = False
            if fstype and watch not in self._warned:
                self._warned.add(watch)
                log.info("watch %s is on %s: polling, no change notification", watch, fstype)
            if covered:
                self._covered.add(watch)
            else:
                self._covered.discard(watch)
        return covered

    def drop(self, watch: str) -> None:
        with self._lock:
            for path in self._watch_paths.get(watch, set()).copy():
                self._release(watch, path)
            self._covered.discard(watch)

    def _hold(self, watch: str, path: str) -> bool:
        wd = self._path_wd.get(path)
        if wd is None:
            wd = self._add(self.fd, os.fsencode(path), MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC and watch not in self._warned:
                    self._warned.add(watch)
                    log.warning("watch %s: inotify watch limit reached; polling instead "
                                "(fix: raise fs.inotify.max_user_watches)", watch)
                return False  # gone already (ENOENT) or not allowed: polling covers it
            self._path_wd[path], self._wd_path[wd] = wd, path
        self._path_watches.setdefault(path, set()).add(watch)
        self._watch_paths.setdefault(watch, set()).add(path)
        return True

    def _release(self, watch: str, path: str) -> None:
        self._watch_paths.get(watch, set()).discard(path)
        holders = self._path_watches.get(path, set())
        holders.discard(watch)
        if not holders:
            self._path_watches.pop(path, None)
            wd = self._path_wd.pop(path, None)
            if wd is not None:
                self._wd_path.pop(wd, None)
                self._rm(self.fd, wd)

    def run(self, stop: threading.Event, timeout: float = 0.5) -> None:
        """Read events until ``stop`` is set; call ``on_change`` with the watches that saw a change."""
        while not stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                continue
            changed = self._parse(data)
            if changed:
                try:
                    self.on_change(changed)
                except Exception as exc:  # Redis away: the watch's own poll still finds the change
                    log.warning("could not wake watches %s: %s", sorted(changed), exc)

    def _parse(self, data: bytes) -> set[str]:
        changed: set[str] = set()
        offset = 0
        with self._lock:
            while offset + EVENT.size <= len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                    changed.update(self._watch_paths)
                    continue
                path = self._wd_path.get(wd)
                if path is None:
                    continue
                changed.update(self._path_watches.get(path, ()))
                if mask & IN_IGNORED:  # the directory is gone: the kernel dropped its watch
                    for watch in self._path_watches.pop(path, set()):
                        self._watch_paths.get(watch, set()).discard(path)
                    self._path_wd.pop(path, None)
                    self._wd_path.pop(wd, None)
        return changed

    def close(self) -> None:
        os.close(self.fd)
