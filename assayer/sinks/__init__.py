"""Deliver final results to the trackers people already look at: TensorBoard, MLflow and W&B.

Each numeric metric becomes ``eval/<metric>`` at the checkpoint's training step, so evaluations
that finish late or out of order still land at the right x-value; non-numeric values are skipped.
A result without a step goes to each tool's own default: step 0 in TensorBoard and MLflow; in
W&B the row has no training step (so it is in the run's table, not on the ``eval/*`` charts).
Tracker packages are extras, imported only when a sink is made.

Exactly-once rule: a delivery is recorded as done (in Redis, by the caller) only after
``deliver()`` returned, and a retry first asks the tracker itself, ``delivered()``
(:func:`deliver_once`), so a worker killed between "logged" and "recorded" neither duplicates nor
skips the point. How each tracker answers, and where a window remains, is in the docstring of
its module: :mod:`.tensorboard` (exactly once), :mod:`.mlflow` (exactly once with a SQL store),
:mod:`.wandb` (exactly once offline; online, a window until the server has the row).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from .base import PREFIX, Delivery, Sink, SinkUnavailable, deliver_once
from .mlflow import MlflowSink
from .tensorboard import TensorBoardSink
from .wandb import WandbSink, run_id_for

__all__ = ["PREFIX", "SINKS", "Delivery", "MlflowSink", "Sink", "SinkUnavailable", "TensorBoardSink", "WandbSink",
           "build", "deliver_once", "parse_report_to", "run_id_for"]

SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}
"""Every sink a watch can report to, by name."""


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; an unknown name is a :class:`ConfigError`."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in SINKS:
            raise _unknown(n)
    return list(dict.fromkeys(names))


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown sink {name!r} in --report-to", hint=f"use a comma-separated list of: {', '.join(SINKS)}")


def build(name: str, results_dir: Path, env: Mapping[str, str] = os.environ) -> Sink:
    """Make sink ``name`` from the trackers' standard environment variables, read here and only here.

    TensorBoard writes under ``<results_dir>/tensorboard/<watch>`` unless the watch names a directory;
    MLflow reads MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME (default: the watch's name); W&B reads
    WANDB_PROJECT (default: the watch's name), WANDB_ENTITY, WANDB_MODE and WANDB_DIR.
    """
    if name not in SINKS:
        raise _unknown(name)
    if name == "tensorboard":
        return TensorBoardSink(results_dir)
    if name == "mlflow":
        return MlflowSink(env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_EXPERIMENT_NAME"))
    return WandbSink(env.get("WANDB_PROJECT"), env.get("WANDB_ENTITY"), env.get("WANDB_MODE"),
                     Path(env["WANDB_DIR"]) if env.get("WANDB_DIR") else None)
