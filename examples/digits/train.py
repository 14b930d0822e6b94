"""Train the digits CNN and save a checkpoint after every epoch, the way training scripts do.

    python examples/digits/train.py --out runs/digits --epochs 6 --pace 2

Writes ``OUT/epoch=000-step=0023.pt``, odd epochs under ``OUT/sub/`` (Assayer watches
subdirectories too), and rewrites ``OUT/last.ckpt`` in place every epoch. Each file is a
``torch.save`` zip archive of ``{"model": state_dict, "epoch": int, "step": int}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

BATCH_SIZE = 64
LEARNING_RATE = 3e-3


def _sibling(name: str) -> ModuleType:
    """Import ``name.py`` from this directory under a private name.

    No sys.path edits, so no clash with a ``model`` module of the process that loads us.
    """
    key = f"_assayer_digits_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def checkpoint_path(out: Path, epoch: int, step: int) -> Path:
    """Where epoch ``epoch`` is saved: odd epochs go to a subdirectory."""
    folder = out / "sub" if epoch % 2 else out
    return folder / f"epoch={epoch:03d}-step={step:04d}.pt"


def train(
    out: Path,
    epochs: int = 6,
    pace: float = 0.0,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Train for ``epochs`` epochs into ``out``; return the per-epoch checkpoint paths (not last.ckpt)."""
    log = log or (lambda line: print(line, flush=True))
    model_module = _sibling("model")
    dev = pick_device(device)
    torch.manual_seed(model_module.SEED)
    (x, y), _ = model_module.load_split()
    x, y = x.to(dev), y.to(dev)
    model = model_module.DigitsCNN().to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(model_module.SEED)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sub").mkdir(exist_ok=True)

    saved: list[Path] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(y), generator=shuffle).split(BATCH_SIZE):
            batch = batch.to(dev)
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            step += 1
        state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "epoch": epoch, "step": step}
        path = checkpoint_path(out, epoch, step)
        torch.save(state, path)
        torch.save(state, out / "last.ckpt")  # rewritten in place, as most training loops do
        saved.append(path)
        log(f"epoch {epoch} step {step} train loss {total / len(y):.4f} -> {path.relative_to(out)}")
        if pace and epoch < epochs - 1:
            time.sleep(pace)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write checkpoints into")
    parser.add_argument("--epochs", type=int, default=6, help="epochs to train (one checkpoint each)")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds to sleep between epochs (demo pacing)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    train(args.out, args.epochs, args.pace, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
