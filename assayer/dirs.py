"""Directory checkpoints on a local (or network-mounted) filesystem: members, version, and the view layouts read.

A directory checkpoint's version is a digest of its members' names, inodes, sizes and mtimes, so a
directory rewritten under the same name (new inodes), a member replaced by a rename, or a member
rewritten in place all make a new version, exactly as for single files.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping

from .layouts import Member
from .readiness import Format, check_format

MAX_MEMBERS = 100_000
"""Files a directory checkpoint may hold; past this it is reported, not walked forever."""


def file_version(st: os.stat_result) -> str:
    """A file version: a rename-over changes the inode, a rewrite in place the size or mtime."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class TooManyMembers(OSError):
    """A directory checkpoint with more files than MAX_MEMBERS (a wrong watch root, most likely)."""


def walk(path: str) -> dict[str, Member]:
    """Every regular file below ``path`` (following file links, not directory links), by relative path.

    Raises FileNotFoundError when ``path`` itself is gone; members that vanish mid-walk are skipped.
    """
    members: dict[str, Member] = {}
    stack = [("", path)]
    os.stat(path)  # FileNotFoundError for a deleted checkpoint
    inside = os.path.realpath(path).rstrip(os.sep) + os.sep
    while stack:
        rel, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            if not rel:
                raise
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((name, entry.path))
                    continue
                if entry.is_symlink() and not os.path.realpath(entry.path).startswith(inside):
                    # A link out of the checkpoint is part of its version by its target, never opened here.
                    st = entry.stat(follow_symlinks=False)
                    members[name] = Member(0, st.st_mtime, "l:" + os.readlink(entry.path))
                    continue
                st = entry.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                members[name] = Member(st.st_size, st.st_mtime, file_version(st))
        if len(members) > MAX_MEMBERS:
            raise TooManyMembers(0, f"more than {MAX_MEMBERS} files below {path}")
    return members


def dir_version(members: Mapping[str, Member]) -> str:
    digest = hashlib.sha1()
    for rel in sorted(members):
        digest.update(f"{rel}\0{members[rel].version}\n".encode())
    return f"d{len(members):x}-{digest.hexdigest()[:24]}"


def version_of_path(path: str) -> str:
    """The current version of a file or directory checkpoint (raises OSError when it is gone)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return dir_version(walk(path))
    return file_version(st)


class LocalDir:
    """A :class:`~assayer.layouts.DirView` over a directory on disk, with format checks cached per member version."""

    def __init__(self, path: str, members: Mapping[str, Member], formats: dict[str, tuple[str, Format]]) -> None:
        self.path = path
        self._members = members
        self._formats = formats

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def members(self) -> Mapping[str, Member]:
        return self._members

    def format_of(self, rel: str) -> Format:
        member = self._members.get(rel)
        if member is None:
            return Format.INCOMPLETE
        if member.version.startswith("l:"):
            return Format.UNKNOWN  # a link out of the checkpoint: not read
        cached = self._formats.get(rel)
        if cached is not None and cached[0] == member.version:
            return cached[1]
        try:
            found = check_format(os.path.join(self.path, rel), member.size)
        except OSError:
            return Format.INCOMPLETE  # vanished or unreadable: not complete now, looked at again next scan
        self._formats[rel] = (member.version, found)
        return found

    def read_text(self, rel: str, limit: int) -> str | None:
        return _read(os.path.join(self.path, rel), limit)

    def sibling_text(self, name: str, limit: int) -> str | None:
        return _read(os.path.join(os.path.dirname(self.path), name), limit)


def _read(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None
