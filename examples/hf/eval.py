"""Evaluate a Hugging Face checkpoint directory: Trainer's ``checkpoint-N/`` or a ``save_pretrained`` export.

    assayer watch add runs/llm -e examples/hf/eval.py:evaluate

The held-out tokens are loaded once per warm worker (``HELDOUT_TOKENS``, a tensor saved with
``torch.save``); without it a fixed random batch stands in, enough to see the curve move.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import AutoModelForCausalLM

_HELDOUT: torch.Tensor | None = None


def heldout(vocab_size: int) -> torch.Tensor:
    global _HELDOUT
    if _HELDOUT is None:
        path = os.environ.get("HELDOUT_TOKENS")
        generator = torch.Generator().manual_seed(0)
        _HELDOUT = torch.load(path) if path else torch.randint(0, vocab_size, (8, 16), generator=generator)
    return _HELDOUT


def evaluate(path: str, ctx=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """``path`` is the checkpoint directory; ``ctx.step`` comes from its name (checkpoint-500 -> 500)."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # reads the shards through their index
    batch = heldout(model.config.vocab_size)
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    return {"loss": loss, "perplexity": math.exp(loss)}
