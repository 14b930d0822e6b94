"""transformers' Trainer: rotate ``checkpoint-N`` directories only once Assayer evaluated them.

Use instead of ``save_total_limit`` (which deletes without waiting, and which this callback refuses)::

    from assayer.integrations.hf import AssayerRotationCallback

    args = TrainingArguments(output_dir="runs/exp1", save_steps=500, save_total_limit=None)
    Trainer(model, args, train_dataset=data,
            callbacks=[AssayerRotationCallback(keep_last=2, max_wait_s=None)]).train()

After each save (and at the end of training) the ``checkpoint-N`` directories of ``output_dir``
older than the newest ``keep_last`` are deleted once :mod:`assayer.holds` lets them go; the
Trainer's best checkpoint (``load_best_model_at_end``) is never deleted. Only the processes that
save (``args.should_save``) delete. This is the only module of Assayer importing transformers.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import ConfigError
from ..settings import Settings
from . import Rotation

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
"""The directories ``Trainer._save_checkpoint`` writes in ``output_dir`` (``PREFIX_CHECKPOINT_DIR-<step>``)."""


def checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories in ``output_dir``, oldest (lowest step) first."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in names if (m := CHECKPOINT_DIR.fullmatch(n))]
    return [path for _, path in sorted(found) if os.path.isdir(path)]


class AssayerRotationCallback(TrainerCallback):
    """Keep the newest ``keep_last`` checkpoints; delete older ones once Assayer has final results for them.

    ``max_wait_s``: delete an older checkpoint anyway once it waited that long (a warning says so;
    None waits forever). ``final_wait_s``: at the end of training, wait up to that long for the
    older checkpoints still being evaluated, so the run ends with only the newest ``keep_last``
    (0: do not wait; what is still held stays on disk). ``conn``/``settings``: where Assayer's Redis is
    (default: ``ASSAYER_*`` variables, or the local stack of ``assayer up``).
    """

    def __init__(self, keep_last: int = 2, max_wait_s: float | None = None, final_wait_s: float = 0.0, *,
                 conn: Any = None, settings: Settings | None = None) -> None:
        self.rotation = Rotation(keep_last, max_wait_s, conn=conn, settings=settings)
        self.final_wait_s = final_wait_s

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        _refuse_own_rotation(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        _refuse_own_rotation(args)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.should_save:
            self.rotation.prune(checkpoints(args.output_dir or "."), keep=[state.best_model_checkpoint])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if args.should_save:
            self.rotation.drain(functools.partial(checkpoints, args.output_dir or "."), [state.best_model_checkpoint],
                                self.final_wait_s)


def _refuse_own_rotation(args: TrainingArguments) -> None:
    if args.save_total_limit is not None:
        raise ConfigError(
            f"save_total_limit={args.save_total_limit} makes the Trainer delete checkpoints without waiting for "
            "Assayer, so AssayerRotationCallback could not keep them",
            f"set save_total_limit=None and AssayerRotationCallback(keep_last={args.save_total_limit})",
        )
