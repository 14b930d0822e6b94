"""Evaluators of the end-to-end tests, mounted at /evaluators in the eval containers.

They load the checkpoint for real (``torch.load(weights_only=True)``), report what it holds, so
the test can tell a complete file from a partial one, and the container that evaluated it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch

PAUSE = 1.0
"""Seconds each evaluation takes: long enough that a burst of checkpoints spreads over every worker."""
SLOW_PAUSE = 8.0
"""Seconds of ``evaluate_slow``: long enough to stop the stack while it runs."""


def _inspect(path: str, pause: float) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state["weight"]
    time.sleep(pause)
    return {"sum": float(weight.sum()), "tag": int(state["tag"]), "host": socket.gethostname()}


def evaluate(path: str) -> dict[str, Any]:
    return _inspect(path, PAUSE)


def evaluate_slow(path: str) -> dict[str, Any]:
    return _inspect(path, SLOW_PAUSE)
