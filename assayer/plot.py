"""Metrics against training step, one line per watch, the best checkpoint of each marked.

Used by ``assayer results --plot FILE.png``. matplotlib is an optional dependency
(``pip install 'checkpoint-assayer[plot]'``) and is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .directions import direction
from .records import ResultRecord

Record = ResultRecord

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def numeric_metrics(records: Iterable[Record]) -> list[str]:
    """Names of the numeric metrics of the ``ok`` records, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        if record.get("status") == "ok":
            for name, value in (record.get("metrics") or {}).items():
                if _is_number(value):
                    names.setdefault(name, None)
    return list(names)


def series(records: Iterable[Record], metric: str) -> dict[str, list[tuple[float, Record]]]:
    """Per watch, ``(x, record)`` points sorted by x, for the ``ok`` records that have ``metric``.

    x is the step parsed from the checkpoint name. In a watch where no record has a step,
    x is the order in which the evaluations finished (1, 2, ...). Where only some have one,
    the step-less records (a ``last.ckpt`` rewritten each epoch, say) are left out.
    """
    by_watch: dict[str, list[Record]] = {}
    for record in records:
        if record.get("status") == "ok" and _is_number((record.get("metrics") or {}).get(metric)):
            by_watch.setdefault(str(record.get("watch")), []).append(record)
    out: dict[str, list[tuple[float, Record]]] = {}
    for watch, rows in by_watch.items():
        stepped = [(float(r.get("step") or 0), r) for r in rows if r.get("step") is not None]
        if not stepped:
            rows = sorted(rows, key=lambda r: str(r.get("finished_at") or ""))
            stepped = [(float(i), r) for i, r in enumerate(rows, start=1)]
        out[watch] = sorted(stepped, key=lambda point: point[0])
    return out


def best_points(points: dict[str, list[tuple[float, Record]]], metric: str, mode: str) -> dict[str, tuple[float, Record]]:
    """Per watch, the point whose record is best by ``metric`` (``max`` or ``min``); ties go to the earliest x."""
    if mode not in ("max", "min"):
        raise ValueError(f"best mode must be 'max' or 'min', not {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    best: dict[str, tuple[float, Record]] = {}
    for watch, rows in points.items():
        scored = [(x, r) for x, r in rows if _is_number((r.get("metrics") or {}).get(metric))]
        if scored:
            best[watch] = max(scored, key=lambda point: (sign * point[1]["metrics"][metric], -point[0]))
    return best


def _missing(metric: str, available: list[str]) -> str:
    return f"no successful evaluation has the metric {metric!r} (numeric metrics: {', '.join(available) or 'none'})"


def plot_results(
    records: list[Record],
    out: Path,
    metric: str | None = None,
    best: tuple[str, str | None] | None = None,
) -> Path:
    """Draw ``metric`` against step for every watch in ``records`` into the PNG ``out``; return ``out``.

    ``metric`` defaults to the best metric if ``best`` is given, else to the first numeric
    metric found. ``best`` is ``(metric, "max" | "min" | None)``; by default the plotted metric.
    Which way is better comes from :func:`assayer.directions.direction` (the same rule as
    ``results --best``) unless given, and the title says which rule decided it.
    Raises ValueError when there is nothing to plot.
    """
    available = numeric_metrics(records)
    metric = metric or (best[0] if best else (available[0] if available else None))
    if metric is None:
        raise ValueError("nothing to plot: no successful evaluation with a numeric metric in these results")
    points = series(records, metric)
    if not points:
        raise ValueError(f"nothing to plot: {_missing(metric, available)}")
    best_metric, given = best or (metric, None)
    rule = direction(best_metric, records, given)
    mode = rule.mode
    marked = best_points(points, best_metric, mode)
    if not marked:
        raise ValueError(f"cannot mark the best checkpoint: {_missing(best_metric, available)}")

    import matplotlib

    matplotlib.use("Agg")  # no display needed; also keeps a worker or CLI free of GUI toolkits
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        for watch, rows in sorted(points.items()):
            ys = [r["metrics"][metric] for _, r in rows]
            (line,) = ax.plot([x for x, _ in rows], ys, marker="o", markersize=3, label=watch)
            if watch in marked:
                x, record = marked[watch]
                y = record["metrics"][metric]
                ax.plot([x], [y], marker="*", markersize=15, color=line.get_color(), markeredgecolor="black", zorder=3)
                # The best goes into the legend: text on the plot collides once the lines converge.
                name = os.path.basename(str(record.get("checkpoint")))
                line.set_label(f"{watch}: best {best_metric} {record['metrics'][best_metric]:.4g} at {name}")
        stepped = all(any(r.get("step") is not None for _, r in rows) for rows in points.values())
        ax.set_xlabel("step" if stepped else "step (finish order where a watch has no steps)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by training step (\u2605 best {best_metric}: {rule})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.05, y=0.12)
        ax.legend(title="watch", fontsize=8)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
