"""The evaluator Assayer calls with each checkpoint of the digits example.

    assayer watch add runs/digits --evaluator examples/digits/eval.py:evaluate

Loss and accuracy on the held-out split that train.py never sees. The dataset tensors and
the model skeleton are built on the first call and cached in this module, so a warm eval
worker pays for them (and for importing torch and scikit-learn) once, not per checkpoint.
Nothing here touches CUDA at import time: a process may import this module and still fork.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

DEVICE_ENV = "DIGITS_DEVICE"
"""Set to ``cpu`` or ``cuda`` to override the default (cuda when available, else cpu)."""

THREADS_ENV = "DIGITS_THREADS"
"""CPU threads for evaluation (default 1: the model is tiny, and the CPU is shared with training)."""

_cache: dict[str, Any] = {}
"""Built on the first call: device, held-out tensors on that device, model skeleton."""

stats = {"dataset_loads": 0, "model_builds": 0}
"""How often the expensive set-up ran in this process (1 and 1 in a warm worker)."""


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


def _setup() -> dict[str, Any]:
    if not _cache:
        model_module = _sibling("model")
        device = torch.device(os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))
        # More threads than this buys nothing on 359 8x8 images and stalls when the cores are busy.
        torch.set_num_threads(int(os.environ.get(THREADS_ENV) or 1))
        _, (x, y) = model_module.load_split()
        stats["dataset_loads"] += 1
        model = model_module.DigitsCNN().to(device).eval()
        stats["model_builds"] += 1
        _cache.update(device=device, x=x.to(device), y=y.to(device), model=model)
    return _cache


def evaluate(checkpoint_path: str | os.PathLike[str], ctx: Any = None) -> dict[str, float]:
    """Return ``{"loss": ..., "accuracy": ...}`` of the checkpoint on the held-out digits.

    ``ctx`` (watch, checkpoint, step, attempt) is accepted and not needed here.
    """
    cache = _setup()
    state = torch.load(checkpoint_path, map_location=cache["device"], weights_only=True)
    model: nn.Module = cache["model"]
    model.load_state_dict(state["model"])
    with torch.inference_mode():
        logits = model(cache["x"])
        loss = nn.functional.cross_entropy(logits, cache["y"]).item()
        accuracy = (logits.argmax(dim=1) == cache["y"]).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}
