"""Write real checkpoints the way trainers do: in place and slowly, or atomically by rename."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path


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
