"""Reproduce, on a local filesystem, the checkpoint layouts of three trainers that cannot run on a CPU test box.

Each ``write_*`` function lays down one checkpoint with the same names, in the same order, as the real writer's
source does; each ``*_latest`` / ``*_tracker`` / ``*_commit`` function performs only the writer's final "marker"
step, so a test can write the body first (``write_latest=False`` / ``write_tracker=False`` / ``commit=False``) and
the marker later.  Sources read (commit / version):

* DeepSpeed  ``deepspeed/runtime/engine.py`` at edaa7221 (version.txt 0.19.6, i.e. after v0.19.5).
* Megatron-LM ``megatron/training/checkpointing.py`` and ``megatron/core/dist_checkpointing/`` at d98e8a64
  (main, megatron.core 0.20.0 dev), compared with tags core_v0.18.2 and core_v0.19.0; torch DCP
  ``FileSystemWriter.finish`` from torch 2.13.
* Orbax ``checkpoint/orbax/checkpoint/_src/{path/atomicity.py,checkpointers/async_checkpointer.py,
  handlers/composite_checkpoint_handler.py}`` at 3ff7b24a (orbax-checkpoint 0.12.4 dev, after v0.12.3).

``.pt`` files are real ``torch.save`` zip archives (``torch`` is imported lazily); other binary payloads
(``.distcp``, OCDBT data) are a few hundred random bytes.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

# --------------------------------------------------------------------------------------------------------------
# shared helpers


def _torch_save(path: Path, payload: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def _tiny_tensors(seed: int) -> dict[str, Any]:
    import torch

    return {"weight": torch.arange(16, dtype=torch.float32) + seed, "bias": torch.zeros(4) + seed}


def _random_file(path: Path, size: int = 384) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed

DEEPSPEED_VERSION = "0.19.6"


def deepspeed_tag(step: int) -> str:
    """Default tag of ``engine.save_checkpoint`` (engine.py:4783: ``tag = f"global_step{self.global_steps}"``)."""
    return f"global_step{step}"


def deepspeed_file_names(*, dp_ranks: int = 2, mp_ranks: int = 1, zero_stage: int = 2, bf16: bool = False) -> list[str]:
    """Names inside ``save_dir/<tag>/``, in the order rank 0, rank 1, ... write them.

    engine.py ``_get_ckpt_name`` (l.4212) / ``_get_rank_zero_ckpt_name`` (l.4198) / ``_get_zero_ckpt_prefix`` (l.4195):
    ZeRO-0/1/2 → ``mp_rank_{mp:02d}_model_states.pt`` written by DP rank 0 only; ZeRO-3 → one
    ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt`` per DP rank; optimizer shards
    ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` per DP rank whenever the optimizer is ZeRO or the
    bf16 optimizer (``bf16_`` prefix whenever bf16 is enabled, any stage).
    """
    names: list[str] = []
    for mp in range(mp_ranks):
        for dp in range(dp_ranks):
            if zero_stage == 3:
                names.append(f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
            elif dp == 0:
                names.append(f"mp_rank_{mp:02d}_model_states.pt")
            if zero_stage > 0 or bf16:
                names.append(f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
    return names


def deepspeed_latest(save_dir: Path, tag: str) -> Path:
    """Write ``save_dir/latest`` exactly as DeepSpeed does: the tag text, no trailing newline, plain ``open('w')``.

    engine.py:4840-4842 (``if save_latest and self.global_rank == 0: open(os.path.join(save_dir, 'latest'), 'w')
    .write(tag)``).  Note: global rank 0 writes it right after its *own* files; the ``dist.barrier()`` (l.4844)
    comes *after* it, so other ranks may still be writing their shards when ``latest`` appears.
    """
    path = save_dir / "latest"
    with open(path, "w") as fd:
        fd.write(tag)
    return path


def write_deepspeed(
    save_dir: Path,
    step: int,
    *,
    dp_ranks: int = 2,
    mp_ranks: int = 1,
    zero_stage: int = 2,
    bf16: bool = False,
    tag: str | None = None,
    write_latest: bool = True,
) -> Path:
    """Write one DeepSpeed ``engine.save_checkpoint(save_dir, tag)`` checkpoint; return ``save_dir/<tag>``.

    Follows DeepSpeed 0.19.6 (commit edaa7221) ``deepspeed/runtime/engine.py``: ``save_checkpoint`` l.4749,
    ``_create_checkpoint_file`` l.5218 (makedirs ``save_dir/tag``), ``_save_checkpoint`` l.5239 (model states via
    ``TorchCheckpointEngine.save`` = ``torch.save`` in place, zip serialization by default), ``_save_zero_checkpoint``
    l.5409 (optimizer shard, then global rank 0 copies ``zero_to_fp32.py`` into ``save_dir`` -- not the tag dir --
    and chmod +x, l.5390), then ``latest`` (l.4840).  Ranks run concurrently; this writes them one after another
    (rank 0 first), then ``latest`` when ``write_latest``.
    """
    tag = deepspeed_tag(step) if tag is None else str(tag)
    save_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = save_dir / tag
    ckpt_dir.mkdir(exist_ok=True)
    zero_optimizer = zero_stage > 0 or bf16
    for dp in range(dp_ranks):
        for mp in range(mp_ranks):
            if zero_stage == 3 or dp == 0:
                name = f"mp_rank_{mp:02d}_model_states.pt"
                if zero_stage == 3:
                    name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"
                _torch_save(
                    ckpt_dir / name,
                    {
                        "module": _tiny_tensors(step),
                        "global_steps": step,
                        "dp_world_size": dp_ranks,
                        "mp_world_size": mp_ranks,
                        "ds_version": DEEPSPEED_VERSION,
                    },
                )
            if zero_optimizer:
                prefix = "bf16_" if bf16 else ""
                _torch_save(
                    ckpt_dir / f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt",
                    {"optimizer_state_dict": {"fp32_flat_groups": _tiny_tensors(dp)}, "ds_version": DEEPSPEED_VERSION},
                )
                if dp == 0 and mp == 0:
                    script = save_dir / "zero_to_fp32.py"
                    script.write_text("#!/usr/bin/env python\n# stand-in for deepspeed/utils/zero_to_fp32.py\n")
                    os.chmod(script, os.stat(script).st_mode | stat.S_IEXEC)
    if write_latest:
        deepspeed_latest(save_dir, tag)
    return ckpt_dir


# --------------------------------------------------------------------------------------------------------------
# Megatron-LM

MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"


def megatron_iter_dir(iteration: int, *, release: bool = False) -> str:
    """``get_checkpoint_name`` (checkpointing.py:230): ``'release'`` or ``'iter_{:07d}'``."""
    return "release" if release else f"iter_{iteration:07d}"


def megatron_tracker(save_dir: Path, iteration: int, *, release: bool = False) -> Path:
    """Write ``save_dir/latest_checkpointed_iteration.txt`` as Megatron does: ``str(iteration)`` or ``'release'``, no newline.

    checkpointing.py:1083-1084 (``iter_finalize_fn``): global rank 0 only, after the ``torch.distributed.barrier()``
    at l.1025 (sync save) or as an async-request finalize fn (async save), i.e. after every rank's files.
    """
    path = save_dir / MEGATRON_TRACKER
    with open(path, "w") as f:
        f.write("release" if release else str(iteration))
    return path


def write_megatron(
    save_dir: Path,
    iteration: int,
    *,
    fmt: Literal["torch", "torch_dist"] = "torch",
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    distributed_optimizer: bool = False,
    files_per_rank: int = 1,
    common_pt: bool = False,
    release: bool = False,
    write_tracker: bool = True,
) -> Path:
    """Write one Megatron-LM ``save_checkpoint`` checkpoint; return ``save_dir/iter_NNNNNNN``.

    Follows Megatron-LM main d98e8a64 (megatron.core 0.20.0 dev) ``megatron/training/checkpointing.py``
    ``save_checkpoint`` l.605.

    ``fmt="torch"`` (legacy, l.1014-1017): every (tp, pp) rank with DP rank 0 does
    ``torch.save(state_dict, iter_NNNNNNN/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt)`` in place (the ``_{pp:03d}``
    part only when pipeline-parallel size > 1, ``get_checkpoint_name`` l.230); with the distributed optimizer,
    ``distrib_optim.pt`` is written into the same directory *before* it (l.742-751).

    ``fmt="torch_dist"`` (l.896 → ``megatron/core/dist_checkpointing/serialization.py`` ``save`` l.341): rank 0 makes
    the iter dir; each of the ``tp*pp*dp`` ranks writes ``__{rank}_{i}.distcp`` (``FileSystemWriterAsync`` in
    ``strategies/filesystem_async.py`` l.140; ``i`` < thread_count, default 1 now, 2 up to core 0.12); the coordinator
    then writes ``.metadata.tmp`` and renames it to ``.metadata`` (torch ``FileSystemWriter.finish``); then rank 0
    writes ``metadata.json`` (``metadata_finalize_fn`` l.439, ``core.py`` ``save_config``).  ``common_pt=True``
    reproduces core <= 0.18.x, where rank 0 first wrote ``common.pt`` (``save_common``, removed in core 0.19.0) and
    ``metadata.json`` also carried ``common_backend``/``common_backend_version``.

    Then the tracker (``megatron_tracker``) when ``write_tracker``.
    """
    save_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = save_dir / megatron_iter_dir(iteration, release=release)
    if fmt == "torch":
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                sub = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
                if distributed_optimizer:
                    _torch_save(ckpt_dir / sub / "distrib_optim.pt", {"per_bucket_numel": [16], "param_state": _tiny_tensors(0)})
                _torch_save(
                    ckpt_dir / sub / "model_optim_rng.pt",
                    {"args": None, "checkpoint_version": 3.0, "iteration": iteration, "model": _tiny_tensors(tp_rank)},
                )
    elif fmt == "torch_dist":
        ckpt_dir.mkdir(exist_ok=True)
        if common_pt:
            _torch_save(ckpt_dir / "common.pt", {"iteration": iteration, "checkpoint_version": 3.0, "args": None})
        for rank in range(tp * pp * dp):
            for i in range(files_per_rank):
                _random_file(ckpt_dir / f"__{rank}_{i}.distcp")
        tmp = ckpt_dir / ".metadata.tmp"
        _random_file(tmp, 256)
        os.replace(tmp, ckpt_dir / ".metadata")
        config: dict[str, Any] = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
        if common_pt:
            config.update(common_backend="torch", common_backend_version=1)
        with open(ckpt_dir / "metadata.json", "w") as f:
            json.dump(config, f)
    else:
        raise ValueError(f"unknown Megatron checkpoint format {fmt!r}")
    if write_tracker:
        megatron_tracker(save_dir, iteration, release=release)
    return ckpt_dir


# --------------------------------------------------------------------------------------------------------------
# Orbax

ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
ORBAX_COMMIT_FILE = "commit_success.txt"
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
ORBAX_DEFAULT_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"

TmpStyle = Literal["bare", "counter", "timestamp"]
_tmp_counter = 0


def orbax_step_name(step: int, *, step_prefix: str | None = None, step_format_fixed_length: int | None = None) -> str:
    """Step directory name, ``_src/path/step.py`` l.349-355: ``[<prefix>_]<step, zero-padded if fixed length>``."""
    step_str = f"{step:0{step_format_fixed_length}d}" if step_format_fixed_length is not None else f"{step}"
    return f"{step_prefix}_{step_str}" if step_prefix is not None else step_str


def orbax_tmp_name(final_name: str, style: TmpStyle = "bare") -> str:
    """Temporary name of a step/item directory before the rename.

    ``bare``: ``<name>.orbax-checkpoint-tmp`` (atomicity.py ``_get_tmp_directory`` l.164, since v0.11.20, July 2025);
    ``counter``: ``<name>.orbax-checkpoint-tmp-<N>`` with a per-process counter (v0.6.3 .. v0.11.19);
    ``timestamp``: ``<name>.orbax-checkpoint-tmp-<sec><usec:06>`` (before v0.6.3: commit 69244975, May 2024).
    """
    global _tmp_counter
    if style == "bare":
        return final_name + ORBAX_TMP_SUFFIX
    if style == "counter":
        _tmp_counter += 1
        return f"{final_name}{ORBAX_TMP_SUFFIX}-{_tmp_counter}"
    now = time.time()
    return f"{final_name}{ORBAX_TMP_SUFFIX}-{int(now)}{int((now - int(now)) * 1_000_000):06}"


def _orbax_final_name(name: str) -> str:
    idx = name.find(ORBAX_TMP_SUFFIX)
    return name if idx == -1 else name[:idx]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # _BlockingMetadataStore.write: json.dumps + epath write_text, in place (metadata/checkpoint.py).
    path.write_text(json.dumps(data))


def _update_json(path: Path, **kwargs: Any) -> None:
    # MetadataStore.update: read, merge keys, rewrite the whole file.
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(kwargs)
    _write_json(path, data)


def _orbax_item_body(item_dir: Path) -> None:
    """What a PyTree/Standard handler writes with OCDBT on one process, before finalize (merge)."""
    _random_file(item_dir / "ocdbt.process_0" / "d" / f"{os.urandom(16).hex()}", 512)
    _random_file(item_dir / "ocdbt.process_0" / "manifest.ocdbt", 160)
    sharding = {"sharding_type": "SingleDeviceSharding", "device_str": "TFRT_CPU_0"}
    _write_json(item_dir / "_sharding", {"cGFyYW1z": json.dumps(sharding)})  # key: urlsafe-b64 of the param name
    (item_dir / "array_metadatas").mkdir(exist_ok=True)
    _write_json(item_dir / "array_metadatas" / "process_0", {"array_metadatas": [{"array_metadata": {"param_name": "params"}}]})
    # _METADATA is written by the primary host after the data commits (base_pytree_checkpoint_handler.py
    # _write_metadata_after_commits l.1217).
    _write_json(
        item_dir / "_METADATA",
        {
            "tree_metadata": {
                "('params',)": {
                    "key_metadata": [{"key": "params", "key_type": 2}],
                    "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
                }
            },
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        },
    )


def _orbax_item_finalize(item_dir: Path, final_item_dir: Path, *, commit_file: bool) -> None:
    # PyTree handler finalize merges per-process OCDBT into a top-level manifest (+ tree nodes under d/).
    _random_file(item_dir / "d" / f"{os.urandom(16).hex()}", 256)
    _random_file(item_dir / "manifest.ocdbt", 160)
    if commit_file:
        (item_dir / ORBAX_COMMIT_FILE).write_text(f"Checkpoint commit was successful to {final_item_dir}")
    if item_dir != final_item_dir:
        os.rename(item_dir, final_item_dir)


def write_orbax(
    root: Path,
    step: int,
    *,
    items: tuple[str, ...] = ("default",),
    object_store: bool = False,
    commit: bool = True,
    step_prefix: str | None = None,
    step_format_fixed_length: int | None = None,
    tmp_style: TmpStyle = "bare",
    local_commit_file: bool = True,
) -> Path:
    """Write one Orbax ``CheckpointManager.save(step, ...)`` checkpoint; return its directory.

    Follows orbax-checkpoint 0.12.4-dev (commit 3ff7b24a): ``checkpoint_manager.py`` ``save`` →
    ``_src/checkpointers/async_checkpointer.py`` ``_save`` l.510 → ``_src/path/atomicity.py`` ``_create_tmp_directory``
    l.104 (mkdir the step dir, then write ``_CHECKPOINT_METADATA`` = ``{"init_timestamp_nsecs": ...}`` inside it) →
    ``composite_checkpoint_handler.py`` ``async_save`` l.671 (one temp subdir per item, sorted) → item handler writes.

    Local (POSIX) filesystem, ``AtomicRenameTemporaryPath``: everything is written under
    ``<step>.orbax-checkpoint-tmp/`` (see ``orbax_tmp_name`` for older names) and becomes ``<step>/`` only in
    ``orbax_commit``.  Object store (``object_store=True``, ``CommitFileTemporaryPath`` as chosen for ``gs://``
    paths by ``atomicity_defaults.py``): written in place under ``<step>/``; ``commit_success.txt`` appears last.

    With ``commit=False`` nothing of the commit callback runs: the return value is the temp dir (local) or the
    final dir still lacking ``commit_success.txt`` (object store); pass it to ``orbax_commit``.
    ``local_commit_file=False`` reproduces <= v0.12.1, which wrote no ``commit_success.txt`` on local disks.
    """
    root.mkdir(parents=True, exist_ok=True)
    final_name = orbax_step_name(step, step_prefix=step_prefix, step_format_fixed_length=step_format_fixed_length)
    if object_store:
        step_dir = root / final_name
    else:
        step_dir = root / orbax_tmp_name(final_name, tmp_style)
    step_dir.mkdir()
    legacy = tmp_style == "timestamp"  # before v0.6.3 (commit 2744ad10): no _CHECKPOINT_METADATA at all
    if not legacy:
        _write_json(
            step_dir / ORBAX_STEP_METADATA,
            {
                "item_handlers": None,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": time.time_ns(),
                "commit_timestamp_nsecs": None,
                "custom_metadata": {},
            },
        )
    # Per-item temp dirs are in v0.6.4's CompositeCheckpointHandler; pre-v0.6.3 sources were not in the mirror,
    # so the "timestamp" style writes items straight into the step temp dir (unverified).
    item_tmp = not object_store and not legacy
    item_dirs = [step_dir / (orbax_tmp_name(name, tmp_style) if item_tmp else name) for name in sorted(items)]
    for item_dir in item_dirs:
        item_dir.mkdir()
    for item_dir in item_dirs:
        _orbax_item_body(item_dir)
    if commit:
        return orbax_commit(step_dir, local_commit_file=local_commit_file)
    return step_dir


def orbax_commit(step_dir: Path, *, local_commit_file: bool = True, item_handlers: dict[str, str] | None = None) -> Path:
    """Run Orbax's commit callback on a step dir written by ``write_orbax(..., commit=False)``; return the final dir.

    async_checkpointer.py ``_make_on_commit_callback`` l.438, in order:
    1. ``_save_step_metadata`` (l.455): rewrite ``_CHECKPOINT_METADATA`` adding ``item_handlers``/``custom_metadata``;
    2. ``handler.finalize`` (l.466) → per item (composite_checkpoint_handler.py ``finalize`` l.1039): OCDBT merge, then
       the item's own TemporaryPath finalize: write ``<item>/commit_success.txt`` and rename
       ``<item>.orbax-checkpoint-tmp`` → ``<item>`` (local) or only the file (object store);
    3. step TemporaryPath finalize (atomicity.py l.522 / l.656): rewrite ``_CHECKPOINT_METADATA`` with
       ``commit_timestamp_nsecs`` (in the temp dir, i.e. *before* the rename), write ``commit_success.txt``
       ("Checkpoint commit was successful to <final path>"), then -- local only -- ``os.rename`` temp → final.

    So on a local disk the rename is the very last act; on an object store ``commit_success.txt`` is.
    """
    final_step_dir = step_dir.parent / _orbax_final_name(step_dir.name)
    renaming = final_step_dir != step_dir
    commit_file = local_commit_file or not renaming
    item_dirs = sorted(p for p in step_dir.iterdir() if p.is_dir())
    handlers = item_handlers or {_orbax_final_name(p.name): ORBAX_DEFAULT_HANDLER for p in item_dirs}
    meta = step_dir / ORBAX_STEP_METADATA
    if meta.exists():
        _update_json(meta, item_handlers=handlers, custom_metadata={})
    for item_dir in item_dirs:
        _orbax_item_finalize(item_dir, item_dir.parent / _orbax_final_name(item_dir.name), commit_file=commit_file)
    if meta.exists():
        _update_json(meta, commit_timestamp_nsecs=time.time_ns())
    if commit_file:
        (step_dir / ORBAX_COMMIT_FILE).write_text(f"Checkpoint commit was successful to {final_step_dir}")
    if renaming:
        os.rename(step_dir, final_step_dir)
    return final_step_dir


def tree(root: Path) -> Iterable[str]:
    """Relative paths under ``root`` (directories end in ``/``), sorted -- handy in assertions and debugging."""
    for path in sorted(root.rglob("*")):
        yield path.relative_to(root).as_posix() + ("/" if path.is_dir() else "")
