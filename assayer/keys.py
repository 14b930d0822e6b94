"""Every Redis key Assayer writes, built in one place from :data:`~assayer.defaults.KEY_PREFIX`."""

from __future__ import annotations

from .defaults import KEY_PREFIX as P


def text(raw: bytes | str) -> str:
    """A key, field or member as Redis returns it (bytes: rq needs a client without decode_responses)."""
    return raw.decode() if isinstance(raw, bytes) else raw


WATCHES = P + "watches"
"""Hash: watch name -> WatchSpec JSON."""

DUE = P + "due"
"""Sorted set: active watch name -> when its next scan is due (unix seconds)."""

EPOCH = P + "epoch"
"""String: id of this Redis's Assayer data; the results directory keeps it too (see :mod:`assayer.backup`)."""

DATA_LOST = P + "data-lost"
"""String: set while Redis lacks data the results directory remembers (until ``assayer restore``)."""

MIRROR_LOCK = P + "mirror-lock"
"""String with TTL: the eval worker mirroring watches and ledgers to the results directory."""

DELIVER_DUE = P + "deliver-due"
"""Sorted set: ``watch|sink|job_id`` -> when that delivery may next be tried (see :mod:`assayer.deliveries`)."""

SHUTDOWN = P + "shutdown"
"""String: unix time of the last ``assayer shutdown``; workers born before it stop."""


def ledger(watch: str) -> str:
    """Hash: checkpoint path relative to the watch root -> JSON {version, job, at}."""
    return f"{P}ledger:{watch}"


def pending(watch: str) -> str:
    """Set: ids of eval jobs of this watch that have no final result yet."""
    return f"{P}pending:{watch}"


def watch_state(watch: str) -> str:
    """Hash: last scan time, files, incomplete files, last error of a watch."""
    return f"{P}state:{watch}"


def results(watch: str) -> str:
    """Hash: eval job id -> final result record JSON."""
    return f"{P}results:{watch}"


def delivered(watch: str) -> str:
    """Hash: ``sink|job_id`` -> JSON {at, attempts}: that result is in that tracker (never delivered again)."""
    return f"{P}delivered:{watch}"


def delivery_errors(watch: str) -> str:
    """Hash: ``sink|job_id`` -> JSON {attempts, error, at} of a delivery tried and not yet done."""
    return f"{P}delivery-errors:{watch}"


COPY_ERRORS = P + "copy-errors"
"""Hash: watch name -> why its results file copy is behind (cleared once it caught up)."""


def copy_backlog(watch: str) -> str:
    """List: result lines not yet appended to the watch's results file (each line waits here until it is)."""
    return f"{P}copy-backlog:{watch}"



def failing(watch: str) -> str:
    """Hash: eval job id -> its last failed attempt, while the job waits for a retry (no final result yet)."""
    return f"{P}failing:{watch}"


def attempts(job_id: str) -> str:
    """List: every attempt record of one eval job."""
    return f"{P}attempts:{job_id}"


def health(role: str, host: str, pid: int) -> str:
    """String with TTL: a live worker of ``role`` on ``host``."""
    return f"{P}health:{role}:{host}:{pid}"


def health_pattern(role: str) -> str:
    """``SCAN`` pattern of the health keys of every live worker of ``role``."""
    return f"{P}health:{role}:*"


def host_health(role: str, host: str) -> str:
    """String with TTL: some live worker of ``role`` on ``host`` (what ``assayer health`` reads)."""
    return f"{P}health-host:{role}:{host}"


COPY_PENDING = P + "copy-pending"
"""Set: watches whose copy backlog may hold lines: added with each line, removed once it is empty, so the
lines of a process killed before it appended them are found (see :mod:`assayer.results`)."""


PINNED_WATCHES = P + "pinned-watches"
"""Set: watches that have (or had) snapshots (see :mod:`assayer.snapshots`)."""

SNAPSHOT_ROOTS = P + "snapshot-roots"
"""Hash: watch name -> the directory its snapshots are in (kept after ``watch remove``, to clean it up)."""


def pins(watch: str) -> str:
    """Hash: snapshot directory name -> Pin JSON (what it pins, for which jobs)."""
    return f"{P}pins:{watch}"


def tracker_lock(what: str) -> str:
    """String with TTL (a redis-py lock): held by the watch worker finding or making a tracker's run for ``what``."""
    return f"{P}tracker-lock:{what}"
