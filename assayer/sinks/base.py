"""What every sink shares: the :class:`Delivery` a job carries, the :class:`Sink` contract, the retryable error."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import AssayerError, ConfigError

PREFIX = "eval/"
"""Namespace of the metrics Assayer writes (``eval/accuracy``)."""


class SinkUnavailable(AssayerError):
    """A tracker cannot be reached or refused for now: the delivery is worth another attempt."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One final result for one sink; travels as JSON in rq job payloads (``to_dict``/``from_dict``)."""

    watch: str
    sink: str
    result_key: str  # unique per result: the idempotence key
    path: str
    version: str
    step: int | None
    metrics: dict[str, Any]
    evaluator: str
    finished_at: float  # seconds since the epoch; also the points' timestamp, so a re-sent point is identical
    epoch: float | None = None
    tensorboard_dir: str | None = None  # per-watch options; None: the sink's default
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delivery:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # unknown keys: from a newer Assayer

    @property
    def digest(self) -> str:
        """A short, stable id of the result, safe in file names, tag keys and history values."""
        return hashlib.sha256(self.result_key.encode()).hexdigest()[:16]

    def numeric(self) -> dict[str, float]:
        """The metrics a chart can draw: numbers only (no bools, strings, lists or dicts)."""
        return {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "version": self.version, "step": self.step, "epoch": self.epoch,
                "evaluator": self.evaluator, "result": self.digest}


def need(module: str, extra: str) -> Any:
    """Import a tracker's package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"the {extra} sink needs the Python package {module!r}, which is not installed",
                          hint=f"pip install 'checkpoint-assayer[{extra}]'") from exc


class Sink(ABC):
    """A tracker that results are delivered to. A retry goes through :func:`deliver_once`."""

    name: ClassVar[str]

    @abstractmethod
    def deliver(self, d: Delivery) -> None:
        """Write the result; returns once the tracker has it (raises :class:`SinkUnavailable` to retry).

        TensorBoard and MLflow ignore a result they already have; W&B would log it a second time.
        """

    @abstractmethod
    def delivered(self, d: Delivery) -> bool:
        """Ask the tracker itself whether this result (``d.result_key``) is already there."""

    def close(self) -> None:  # noqa: B027 - most sinks hold nothing open
        """Release connections and finish open runs."""


def deliver_once(sink: Sink, d: Delivery) -> bool:
    """Deliver unless the tracker already has the result; True when this call wrote it."""
    if sink.delivered(d):
        return False
    sink.deliver(d)
    return True
