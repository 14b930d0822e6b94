"""Snapshots: a complete checkpoint is pinned before it is queued, so rotation never costs an evaluation.

Trainers keep only their newest checkpoints; when evaluation is slower than saving, a checkpoint
deleted before its turn ends ``missing``. With ``--snapshot`` the watch worker pins each new
checkpoint version first:

* ``link``: hard links in a snapshot directory on the same filesystem. No byte is copied; a link
  keeps the data alive after the trainer unlinks the original (not after it rewrites the file in
  place, which a trainer's rotation does not do).
* ``copy``: a copy into a bounded snapshot cache (``ASSAYER_SNAPSHOT_MAX_GB``); the original's
  version is read again after the copy, so a copy torn by a rewrite is never used. When the cache
  is full, new checkpoints wait for room (``--when-full wait``) or are recorded as ``skipped``.
* ``auto``: a link where the filesystem allows it, else a copy.

The eval job gets the pinned path (the evaluator's ``ctx.original_path`` names the original).
A pin is released once every evaluation queued for it has ended (a final result, or replaced);
the watch workers release pins and remove what a killed worker left half-made, or what a removed
watch left, at each sweep. Pins are recorded in Redis in the same transaction that queues their
jobs: a pin on disk without a record is debris, a record always has its directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from . import keys
from .dirs import version_of_path
from .errors import AssayerError
from .settings import Settings

log = logging.getLogger("assayer.snapshots")

MODES = ("off", "link", "copy", "auto")
WHEN_FULL = ("wait", "skip")
TMP_PREFIX = ".pinning-"
DEBRIS_AFTER = 60.0
"""Seconds a finished pin directory may go without its Redis record (its queueing transaction is due)."""


class SnapshotError(AssayerError):
    """A checkpoint could not be pinned (and why)."""


class CacheFull(SnapshotError):
    """A copy would take the snapshot cache past ``ASSAYER_SNAPSHOT_MAX_GB``."""


@dataclass
class Pin:
    """A pinned checkpoint version: where its snapshot is, what it pins and for which jobs."""

    name: str  # the snapshot directory's name under the watch's snapshot root
    path: str  # the pinned checkpoint (what the evaluator reads)
    original: str
    relpath: str
    version: str  # the original's version (the ledger's)
    pinned_version: str  # the snapshot's own version (what the eval worker checks before and after)
    mode: str  # link or copy
    size: int  # bytes the cache holds for it (0 for links: no new data)
    at: float = field(default_factory=time.time)
    jobs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pin:
        return cls(**json.loads(raw))


def root(settings: Settings, watch: str, snapshot_dir: str | None = None) -> Path:
    """Where a watch's snapshots live: ``--snapshot-dir``, else ``ASSAYER_SNAPSHOT_DIR``, else under ASSAYER_HOME."""
    base = Path(snapshot_dir) if snapshot_dir else settings.snapshot_path
    return base / watch


def used_bytes(conn: redis.Redis) -> int:
    """Bytes the snapshot cache holds for every watch's copies (links cost none)."""
    total = 0
    for name in conn.smembers(keys.PINNED_WATCHES):
        total += sum(Pin.from_json(v).size for v in conn.hvals(keys.pins(keys.text(name))))
    return total


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def make(conn: redis.Redis, settings: Settings, watch: str, original: str, relpath: str, version: str, mode: str,
         snapshot_dir: str | None = None, unrecorded: int = 0) -> Pin:
    """Pin one checkpoint version; raises FileNotFoundError when it is gone, CacheFull, or SnapshotError.

    ``unrecorded``: bytes the caller copied into the cache and has not recorded in Redis yet (the pins
    of the same scan), which count against ASSAYER_SNAPSHOT_MAX_GB as the recorded ones do.
    """
    if version_of_path(original) != version:
        raise FileNotFoundError(errno.ENOENT, "replaced or deleted before it could be pinned", original)
    folder = root(settings, watch, snapshot_dir)
    folder.mkdir(parents=True, exist_ok=True)
    conn.sadd(keys.PINNED_WATCHES, watch)
    conn.hset(keys.SNAPSHOT_ROOTS, watch, str(folder))
    digest = hashlib.sha1(f"{relpath}\n{version}".encode()).hexdigest()[:12]
    name = f"{digest}-{secrets.token_hex(3)}"  # several watch workers may pin the same version: one record wins
    tmp = folder / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{name}"
    leaf = os.path.basename(relpath.rstrip("/")) or "checkpoint"
    try:
        used = "link"
        if mode in ("link", "auto"):
            try:
                _link(original, str(tmp / leaf))
            except OSError as exc:
                if mode == "link" or exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise SnapshotError(f"cannot hard-link {original} into {folder}: {exc.strerror or exc}",
                                        "put --snapshot-dir on the checkpoints' filesystem, or use --snapshot copy"
                                        ) from None
                shutil.rmtree(tmp, ignore_errors=True)
                used = "copy"
        else:
            used = "copy"
        size = 0
        if used == "copy":
            size = _size(original)
            limit = int(settings.snapshot_max_gb * 1024**3)
            held = used_bytes(conn) + unrecorded
            if limit and held + size > limit:
                raise CacheFull(f"the snapshot cache holds {held / 1024**3:.2f} GB; {relpath} needs "
                                f"{size / 1024**3:.2f} GB more than ASSAYER_SNAPSHOT_MAX_GB={settings.snapshot_max_gb:g}",
                                "raise ASSAYER_SNAPSHOT_MAX_GB, add eval workers, or use --snapshot link")
            _copy(original, str(tmp / leaf))
            if version_of_path(original) != version:  # rewritten during the copy: the copy may be torn
                raise FileNotFoundError(errno.ENOENT, "rewritten while it was being pinned", original)
        final = folder / name
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pinned = str(final / leaf)
    return Pin(name, pinned, original, relpath, version, version_of_path(pinned), used, size)


def _link(src: str, dst: str) -> None:
    if os.path.isdir(src):
        for folder, _, files in os.walk(src):
            target = os.path.join(dst, os.path.relpath(folder, src))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.link(os.path.join(folder, name), os.path.join(target, name))
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(src, dst)


def _copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=False)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def discard(pin: Pin) -> None:
    """Remove a pin's directory (its record is someone else's business)."""
    shutil.rmtree(os.path.dirname(pin.path), ignore_errors=True)


def pins(conn: redis.Redis, watch: str) -> dict[str, Pin]:
    return {keys.text(k): Pin.from_json(v) for k, v in conn.hgetall(keys.pins(watch)).items()}


def release_done(conn: redis.Redis, settings: Settings) -> int:
    """Release the pins whose jobs all ended; remove debris of killed pinning and of removed watches."""
    released = 0
    watches_now = {keys.text(n) for n in conn.hkeys(keys.WATCHES)}
    roots = {keys.text(k): keys.text(v) for k, v in conn.hgetall(keys.SNAPSHOT_ROOTS).items()}
    for watch, folder in roots.items():
        recorded = pins(conn, watch)
        if watch not in watches_now:
            shutil.rmtree(folder, ignore_errors=True)  # `watch remove`: nothing of it is evaluated any more
            with conn.pipeline() as pipe:
                pipe.delete(keys.pins(watch))
                pipe.srem(keys.PINNED_WATCHES, watch)
                pipe.hdel(keys.SNAPSHOT_ROOTS, watch)
                pipe.execute()
            released += len(recorded)
            continue
        pending = {keys.text(m) for m in conn.smembers(keys.pending(watch))}
        for name, pin in recorded.items():
            if any(job in pending for job in pin.jobs):
                continue  # queued, running or waiting for a retry
            if conn.hdel(keys.pins(watch), name):
                discard(pin)
                released += 1
        _remove_debris(conn, watch, Path(folder), recorded)
    return released


def _remove_debris(conn: redis.Redis, watch: str, folder: Path, recorded: dict[str, Pin]) -> None:
    """Directories no record names: pins whose transaction lost or never ran, tmp dirs of dead processes."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    host = socket.gethostname()
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):  # .pinning-HOST-PID-DIGEST-TOKEN
            parts = entry.name[len(TMP_PREFIX):].split("-")
            owner, pid = "-".join(parts[:-3]), parts[-3] if len(parts) > 3 else ""
            dead = owner == host and pid.isdigit() and not _alive(int(pid))
            with contextlib.suppress(OSError):
                if dead or time.time() - entry.stat().st_mtime > 3600:  # another host's: given an hour
                    shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name not in recorded:
            # not recorded a minute after it was made: its queueing transaction never ran (or lost)
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > DEBRIS_AFTER and not conn.hexists(keys.pins(watch), entry.name):
                    shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summary(conn: redis.Redis, watch: str) -> dict[str, Any]:
    """What ``assayer status`` shows: pins held, their bytes, and checkpoints waiting for room."""
    held = pins(conn, watch)
    waiting = conn.hget(keys.watch_state(watch), "snapshot_waiting")
    return {"pinned": len(held), "bytes": sum(p.size for p in held.values()),
            "waiting": keys.text(waiting) if waiting else None}
