"""The digits CNN and the fixed train / held-out split, shared by train.py and eval.py.

Data: scikit-learn's bundled ``load_digits`` (1797 real 8x8 handwritten digits, shipped
inside scikit-learn, so nothing is downloaded).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SEED = 0
"""Seed of the split and of the weight initialisation."""

HELD_OUT_FRACTION = 0.2
"""Share of the digits kept out of training and used by eval.py."""


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one pooling, two dense layers: about 40k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Return ``((x_train, y_train), (x_held_out, y_held_out))``, the same on every call.

    Images are float32 tensors of shape (N, 1, 8, 8) scaled to [0, 1]; labels are int64.
    """
    from sklearn.datasets import load_digits  # imported here: only the callers that need data pay for it

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SEED).permutation(len(y)))
    n_held_out = int(len(y) * HELD_OUT_FRACTION)
    held_out, train = order[:n_held_out], order[n_held_out:]
    return (x[train], y[train]), (x[held_out], y[held_out])
