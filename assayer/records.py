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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypedDict


@dataclass(frozen=True)
class Slot:
    """One evaluator's job for a checkpoint version: at which evaluator version, under which job id."""

    ev: str | None  # the evaluator version it was queued for; None: from before evaluators had versions
    job: str
    at: float


@dataclass(frozen=True)
class LedgerEntry:
    version: str
    job: str | None  # the first evaluator's job (what single-evaluator readers use); None: a baseline entry
    at: float  # when it was queued (0 when restored from a results file)
    evals: dict[str, Slot] = field(default_factory=dict)  # evaluator name -> its job for this version
    step: int | None = None
    layout: str | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"v": self.version, "job": self.job, "at": self.at}
        if self.evals:
            data["e"] = {name: [s.ev, s.job, s.at] for name, s in self.evals.items()}
        if self.step is not None:
            data["s"] = self.step
        if self.layout:
            data["l"] = self.layout
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str | bytes, first: str | None = None) -> LedgerEntry:
        """Parse an entry; one written before evaluators had names belongs to ``first`` (the watch's first one)."""
        data = json.loads(raw)
        job, at = data.get("job"), float(data.get("at") or 0)
        evals = {name: Slot(ev, j, float(t or 0)) for name, (ev, j, t) in (data.get("e") or {}).items()}
        if not evals and job and first:
            evals = {first: Slot(None, job, at)}
        return cls(version=data["v"], job=job, at=at, evals=evals, step=data.get("s"), layout=data.get("l"))

    @property
    def is_baseline(self) -> bool:
        return self.job is None and not self.evals

    def jobs(self) -> list[str]:
        """Every job id this entry names (each evaluator's, and the legacy one)."""
        found = [s.job for s in self.evals.values()]
        return [*found, self.job] if self.job and self.job not in found else found


class ResultRecord(TypedDict, total=False):
    watch: str
    checkpoint: str  # absolute path
    relpath: str  # path relative to the watch directory: the ledger's key
    version: str
    step: int | None
    epoch: int | None
    layout: str
    evaluator: str  # the evaluator's name in its watch (records before names: its reference)
    evaluator_ref: str
    evaluator_version: str
    pool: str
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
    jobs: list[str]  # only in a row of ``assayer results`` that merges several evaluators' results


STATUSES = ("ok", "failed", "missing", "skipped")
"""Statuses of a final record."""

FIELDS = ("watch", "checkpoint", "step", "evaluator", "evaluator_version", "status", "metrics", "attempt", "duration",
          "worker", "started_at", "finished_at", "error", "job_id", "version")
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
        layout=payload.get("layout") or "file", evaluator=payload.get("evaluator_name") or evaluator_name(payload),
        evaluator_ref=payload.get("evaluator") or "", evaluator_version=payload.get("evaluator_version") or "",
        pool=payload.get("pool") or "default", job_id=job_id,
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


def evaluator_name(rec: Mapping[str, Any]) -> str:
    """The evaluator's name in its watch; a record or payload from before names has only the reference."""
    name = rec.get("evaluator_name") if "evaluator_ref" not in rec else rec.get("evaluator")
    if name:
        return str(name)
    ref = str(rec.get("evaluator_ref") or rec.get("evaluator") or "")
    return ref.rpartition(":")[2].rpartition(".")[2]


def dump(rec: ResultRecord) -> str:
    return json.dumps(rec, sort_keys=True)


def parse(raw: str | bytes) -> ResultRecord:
    """A stored record; raises ValueError on a torn or foreign line."""
    data = json.loads(raw)
    if not isinstance(data, dict) or "watch" not in data or "job_id" not in data:
        raise ValueError("not a result record")
    return data  # type: ignore[return-value]
