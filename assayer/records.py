"""The records Assayer keeps in Redis and in the results files, each built and parsed here only.

* :class:`LedgerEntry`: which version of a checkpoint path was handed to which eval job (the
  ledger hash, :func:`assayer.keys.ledger`). Its JSON keys are short (``v``, ``job``, ``at``):
  a watch of many checkpoints holds one per path.
* :class:`ResultRecord`: one attempt at evaluating a checkpoint version; the final one of a job
  is its result. Kept as a ``TypedDict`` because it is JSON on every side (Redis, the JSON-lines
  files, ``assayer results --format json``, the dashboard) and readers pick the fields they show.

Readers tolerate records written by older versions: unknown keys are kept, missing ones default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypedDict


@dataclass(frozen=True)
class LedgerEntry:
    version: str
    job: str | None  # None: a baseline entry (already there when the watch was added; never queued)
    at: float  # when it was queued (0 when restored from a results file)

    def to_json(self) -> str:
        return json.dumps({"v": self.version, "job": self.job, "at": self.at})

    @classmethod
    def from_json(cls, raw: str | bytes) -> LedgerEntry:
        data = json.loads(raw)
        return cls(version=data["v"], job=data.get("job"), at=float(data.get("at") or 0))

    @property
    def is_baseline(self) -> bool:
        return self.job is None


class ResultRecord(TypedDict, total=False):
    watch: str
    checkpoint: str  # absolute path
    relpath: str  # path relative to the watch directory: the ledger's key
    version: str
    step: int | None
    epoch: int | None
    layout: str
    evaluator: str
    job_id: str
    attempt: int
    attempts_allowed: int
    worker: str | None
    started_at: str | None
    finished_at: str | None
    checkpoint_time: str | None
    status: str  # ok, failed, missing; "retrying N/M" only in what results.load shows
    final: bool
    metrics: dict[str, Any]
    directions: dict[str, str]
    error: str | None
    traceback: str | None
    duration: float


STATUSES = ("ok", "failed", "missing")
"""Statuses of a final record."""

FIELDS = ("watch", "checkpoint", "step", "status", "metrics", "attempt", "duration", "worker",
          "started_at", "finished_at", "error", "job_id", "version")
"""Columns of ``assayer results --format csv``, in order."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def new_attempt(job_id: str, payload: Mapping[str, Any], attempt: int, worker: str | None,
                started_at: str | None) -> ResultRecord:
    """An attempt of the eval job ``job_id`` whose keyword arguments are ``payload``, not finished yet."""
    retries = int(payload.get("retries") or 0)
    mtime = payload.get("mtime")
    return ResultRecord(
        watch=payload["watch"], checkpoint=payload["checkpoint"], relpath=payload["relpath"],
        version=payload["version"], step=payload.get("step"), epoch=payload.get("epoch"),
        layout=payload.get("layout") or "file", evaluator=payload.get("evaluator") or "", job_id=job_id,
        attempt=attempt, attempts_allowed=retries + 1, worker=worker, started_at=started_at, finished_at=None,
        checkpoint_time=iso(mtime) if mtime else None, status="failed", final=False, metrics={}, error=None,
        traceback=None, duration=0.0,
    )


def finish(rec: ResultRecord, status: str, final: bool, error: str | None = None, **fields: Any) -> ResultRecord:
    """``rec`` ended with ``status``; ``fields`` (metrics, traceback, duration, ...) are set too."""
    done = rec.copy()
    done["status"], done["final"], done["error"], done["finished_at"] = status, final, error, utcnow()
    done.update(fields)  # type: ignore[typeddict-item]
    return done


def dump(rec: ResultRecord) -> str:
    return json.dumps(rec, sort_keys=True)


def parse(raw: str | bytes) -> ResultRecord:
    """A stored record; raises ValueError on a torn or foreign line."""
    data = json.loads(raw)
    if not isinstance(data, dict) or "watch" not in data or "job_id" not in data:
        raise ValueError("not a result record")
    return data  # type: ignore[return-value]
