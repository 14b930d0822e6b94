"""Lightning: rotate the files a ``ModelCheckpoint(save_top_k=-1)`` writes only once Assayer evaluated them.

::

    from assayer.integrations.lightning import AssayerRotation

    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="runs/exp1", every_n_train_steps=500, save_top_k=-1),
                                   AssayerRotation(keep_last=2)])

``save_top_k=-1`` keeps every checkpoint (any other value deletes without waiting, and is
refused); this callback then deletes the ``*.ckpt`` files of the checkpoint directory older than
the newest ``keep_last`` once :mod:`assayer.holds` lets them go. ``last*.ckpt`` and each
ModelCheckpoint's best and last model paths are never deleted. Only global rank zero deletes (it
is the one that saves). Lightning runs ModelCheckpoint's hooks after every other callback's, so a
save is rotated at the next batch's end, the epoch's end or the end of fitting.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..errors import ConfigError
from ..scan import parse_step
from ..settings import Settings
from . import Rotation

RECHECK_INTERVAL = 1.0
"""Seconds between two looks at held checkpoints when no new one was saved (batch ends come often)."""


class AssayerRotation(Callback):
    """Keep the newest ``keep_last`` checkpoint files; delete older ones once Assayer has final results for them.

    ``dirpath``: the directory to rotate (default: every ModelCheckpoint's). ``max_wait_s``,
    ``final_wait_s``, ``conn`` and ``settings`` as for :class:`assayer.integrations.hf.AssayerRotationCallback`.
    """

    def __init__(self, keep_last: int = 2, max_wait_s: float | None = None, final_wait_s: float = 0.0,
                 dirpath: str | os.PathLike[str] | None = None, *, conn: Any = None,
                 settings: Settings | None = None) -> None:
        self.rotation = Rotation(keep_last, max_wait_s, conn=conn, settings=settings)
        self.final_wait_s = final_wait_s
        self.dirpath = os.path.abspath(os.fspath(dirpath)) if dirpath is not None else None
        self._looked: tuple[tuple[str, ...], float] = ((), float("-inf"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dirs = self._dirs(trainer)  # every ModelCheckpoint has resolved its dirpath in its setup by now
        if not dirs:
            raise ConfigError("AssayerRotation has no checkpoint directory to rotate",
                              "add ModelCheckpoint(dirpath=..., save_top_k=-1) or give AssayerRotation(dirpath=...)")
        for cb in _model_checkpoints(trainer):
            if cb.dirpath and os.path.abspath(cb.dirpath) in dirs and cb.save_top_k not in (-1, 0):
                raise ConfigError(
                    f"ModelCheckpoint(save_top_k={cb.save_top_k}) deletes checkpoints in {cb.dirpath} without "
                    "waiting for Assayer, so AssayerRotation could not keep them",
                    f"use ModelCheckpoint(save_top_k=-1) and AssayerRotation(keep_last={max(cb.save_top_k, 1)})",
                )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._rotate(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rotate(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rotate(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            deadline = time.monotonic() + self.final_wait_s
            for folder in self._dirs(trainer):
                self.rotation.drain(functools.partial(checkpoints, folder, _kept_names(trainer)),
                                    _exempt(trainer), max(0.0, deadline - time.monotonic()))

    def _rotate(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        names = _kept_names(trainer)
        listings = {folder: checkpoints(folder, names) for folder in self._dirs(trainer)}
        seen = tuple(p for found in listings.values() for p in found)
        now = time.monotonic()
        if seen == self._looked[0] and (not self.rotation.kept or now - self._looked[1] < RECHECK_INTERVAL):
            return  # nothing saved since the last look, and nothing held to look at again yet
        self._looked = (seen, now)
        for found in listings.values():
            self.rotation.prune(found, _exempt(trainer))

    def _dirs(self, trainer: pl.Trainer) -> list[str]:
        if self.dirpath is not None:
            return [self.dirpath]
        return sorted({os.path.abspath(cb.dirpath) for cb in _model_checkpoints(trainer) if cb.dirpath})


def checkpoints(folder: str, last_names: tuple[str, ...] = (ModelCheckpoint.CHECKPOINT_NAME_LAST,)) -> list[str]:
    """The checkpoint files ModelCheckpoint wrote in ``folder``, oldest first (by step when every name has one).

    ``last*.ckpt`` (and links) are left out: save_last rewrites it in place, it is never rotated.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    files = []
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext != ModelCheckpoint.FILE_EXTENSION or any(stem == n or stem.startswith(n + "-v") for n in last_names):
            continue
        try:
            if entry.is_symlink() or not entry.is_file():
                continue
            files.append((parse_step(entry.name), entry.stat().st_mtime_ns, entry.path))
        except FileNotFoundError:
            continue
    by_step = all(step is not None for step, _, _ in files)
    files.sort(key=lambda f: (f[0] or 0, f[1]) if by_step else (f[1], 0))
    return [path for _, _, path in files]


def _model_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]


def _kept_names(trainer: pl.Trainer) -> tuple[str, ...]:
    return tuple({cb.CHECKPOINT_NAME_LAST for cb in _model_checkpoints(trainer)} | {ModelCheckpoint.CHECKPOINT_NAME_LAST})


def _exempt(trainer: pl.Trainer) -> list[str]:
    """The best and last model paths of every ModelCheckpoint: never rotated."""
    return [p for cb in _model_checkpoints(trainer) for p in (cb.best_model_path, cb.last_model_path) if p]
