"""Plots read back from their PNG: a curve's pixels, in its colour, where its data says they are."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOLERANCE = 0.06
"""How far (per RGB channel, 0-1) a pixel may be from a colour and still count as it (antialiasing)."""


def has_colour_near(image: Any, ax: Any, x: float, y: float, colour: Sequence[float], radius: int = 2) -> bool:
    """Some pixel within ``radius`` pixels of the data point ``(x, y)`` of ``ax`` is ``colour`` (RGB, 0-1)."""
    import numpy as np

    px, py = ax.transData.transform((x, y))
    col, row = round(float(px)), round(image.shape[0] - float(py))  # PNG rows run top down, display y bottom up
    window = image[max(row - radius, 0): row + radius + 1, max(col - radius, 0): col + radius + 1, :3]
    return bool((np.abs(window - np.asarray(colour[:3])).max(axis=-1) < TOLERANCE).any())


def assert_plotted(png: Path, ax: Any, watch: str, points: list[tuple[float, float]], best: tuple[float, float]) -> None:
    """The PNG shows ``watch``'s curve through ``points`` (markers and the segments between them) and its star at ``best``.

    ``ax`` is the axes that was saved (see the ``drawn`` fixture): it maps data to pixels. A blank
    picture, a curve drawn elsewhere or in another colour, or a missing star fails.
    """
    import matplotlib.colors
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    fig = ax.figure
    assert image.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi)), (
        "the PNG's size is not the figure's: its pixels cannot be matched to data"
    )
    (line,) = [line for line in ax.lines if str(line.get_label()).split(":")[0] == watch]
    colour = matplotlib.colors.to_rgb(line.get_color())
    assert [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())] == points
    for x, y in points:
        assert has_colour_near(image, ax, x, y, colour), f"no {watch} marker at {(x, y)}"
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        mx, my = ax.transData.inverted().transform((ax.transData.transform((x0, y0)) + ax.transData.transform((x1, y1))) / 2)
        assert has_colour_near(image, ax, mx, my, colour), f"no {watch} line between {(x0, y0)} and {(x1, y1)}"
    assert has_colour_near(image, ax, *best, colour), f"no {watch} star at {best}"
    black = (0.0, 0.0, 0.0)
    assert has_colour_near(image, ax, *best, black, radius=9), f"the star at {best} has no black edge"
    for x, y in points:
        if (x, y) != best:
            assert not has_colour_near(image, ax, x, y, black, radius=3), f"a star (black edge) at {(x, y)}, not the best"
