"""Write real checkpoints the way trainers do: in place and slowly, or atomically by rename."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel


def torch_bytes(seed: int = 0, size: int = 2000) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"weights": torch.arange(size, dtype=torch.float32) + seed, "step": seed}, buf)
    return buf.getvalue()


def safetensors_bytes(seed: int = 0, size: int = 2000) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"weights": torch.arange(size, dtype=torch.float32) + seed})


def zip_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data.bin", os.urandom(256) + str(seed).encode())
    return buf.getvalue()


def write_slowly(path: Path, data: bytes, chunks: int = 5, pause: float = 0.3) -> None:
    """Write ``data`` into ``path`` in place, ``chunks`` pieces with ``pause`` seconds between them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    step = max(1, len(data) // chunks)
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            os.fsync(fh.fileno())
            if i + step < len(data):
                time.sleep(pause)


def write_slowly_in_background(path: Path, data: bytes, chunks: int = 5, pause: float = 0.3) -> threading.Thread:
    thread = threading.Thread(target=write_slowly, args=(path, data, chunks, pause))
    thread.start()
    return thread


def write_atomically(path: Path, data: bytes) -> None:
    """Write a hidden temp file, then rename it into place (complete from the first moment it is visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the real writers of directory checkpoints ---------------------------------------------------


def tiny_gpt2() -> GPT2LMHeadModel:
    """A GPT-2 small enough to train on a CPU in seconds, built from a config (no hub download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=32, eos_token_id=0, bos_token_id=0)
    return GPT2LMHeadModel(config)


def train_hf(output_dir: Path, max_steps: int = 12, save_steps: int = 4, save_total_limit: int | None = 2) -> None:
    """Run transformers' Trainer, which writes ``checkpoint-N/`` directories (trainer_state.json last)."""
    import torch
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(16) * (i + 1) % 100
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=save_steps,
                             save_total_limit=save_total_limit, report_to=[], use_cpu=True, per_device_train_batch_size=4,
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens()).train()


def save_pretrained_sharded(directory: Path, max_shard_size: str = "100KB") -> list[str]:
    """``save_pretrained`` with shards; returns the shard names the index lists."""
    import json

    tiny_gpt2().save_pretrained(str(directory), max_shard_size=max_shard_size)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def save_dcp(directory: Path, seed: int = 0) -> None:
    """``torch.distributed.checkpoint.save`` in one process: ``__0_0.distcp`` then ``.metadata``."""
    import warnings

    import torch
    from torch.distributed.checkpoint.state_dict_saver import save  # torch.distributed.checkpoint.save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save({"w": torch.arange(1000, dtype=torch.float32) + seed}, checkpoint_id=str(directory))


def train_lightning(root: Path, max_steps: int = 6, every_n_train_steps: int = 2, callbacks: Sequence[Any] = (),
                    save_top_k: int = -1, dirpath: Path | None = None) -> Path:
    """Lightning's ModelCheckpoint writes files ``epoch=E-step=S.ckpt`` (in ``dirpath``, default
    ``root/checkpoints``), beside ``callbacks``; returns their directory."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    checkpoints = dirpath or root / "checkpoints"
    saver = ModelCheckpoint(dirpath=str(checkpoints), every_n_train_steps=every_n_train_steps, save_top_k=save_top_k)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[saver, *callbacks], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    return checkpoints
