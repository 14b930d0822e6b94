"""An evaluator that only submits a SLURM job and returns at once.

    assayer watch add /ckpt/llm --evaluator examples/slurm/eval_sbatch.py:evaluate --regex '/step_\\d+$'

For evaluations that take hours on other machines (an LM harness run, say): the Assayer
eval worker spends a second per checkpoint on ``sbatch`` and records the SLURM job id as
the result; the job itself writes its scores next to the checkpoint. Settings:

- ``SLURM_EVAL_COMMAND``: the command the job runs; ``{checkpoint}`` is replaced by the
  shell-quoted checkpoint path.
- ``SLURM_EVAL_SBATCH_ARGS``: extra sbatch flags, e.g. ``--partition=eval --gres=gpu:1 --time=4:00:00``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_COMMAND = (
    "lm_eval --model hf --model_args pretrained={checkpoint} --tasks hellaswag,arc_easy "
    "--batch_size auto --output_path {checkpoint}.lm_eval"
)


def evaluate(checkpoint_path: str | os.PathLike[str], ctx: Any = None) -> dict[str, str]:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError(
            "sbatch not found on PATH: this evaluator submits SLURM jobs, so run its eval worker "
            "on a SLURM login or submit host (or put the SLURM client on PATH)"
        )
    checkpoint = Path(checkpoint_path)
    command = os.environ.get("SLURM_EVAL_COMMAND", DEFAULT_COMMAND).format(checkpoint=shlex.quote(str(checkpoint)))
    argv = [
        sbatch,
        "--parsable",  # print only "jobid[;cluster]"
        f"--job-name=assayer-{getattr(ctx, 'watch', None) or 'eval'}",
        f"--output={checkpoint}.slurm-%j.log",
        *shlex.split(os.environ.get("SLURM_EVAL_SBATCH_ARGS", "")),
        "--wrap",
        command,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return {"slurm_job_id": done.stdout.strip().split(";")[0]}
