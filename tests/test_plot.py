"""assayer.plot: metrics by step, one line per watch, the best checkpoint marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pictures import assert_plotted

from assayer import plot
from assayer.records import ResultRecord


def rec(watch: str, step: int | None, status: str = "ok", finished: str = "", **metrics: Any) -> ResultRecord:
    name = f"step={step}.pt" if step is not None else "last.ckpt"
    return {
        "watch": watch,
        "checkpoint": f"/runs/{watch}/{name}",
        "status": status,
        "metrics": metrics if status == "ok" else {},  # as a failed attempt is recorded (records.new_attempt)
        "step": step,
        "finished_at": finished,
    }


@pytest.fixture
def records() -> list[ResultRecord]:
    return [
        rec("digits", 30, loss=0.5, accuracy=0.85),
        rec("digits", 10, loss=1.2, accuracy=0.60),
        rec("digits", 20, loss=0.3, accuracy=0.93),  # best by both metrics
        rec("digits", 40, status="failed"),
        rec("mnist", 100, loss=0.9, accuracy=0.70),
        rec("mnist", 200, loss=0.4, accuracy=0.88),  # best
    ]


def legend(ax: Any) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_png_with_one_line_per_watch_and_best_annotated(records: list[ResultRecord], drawn: list[Any], tmp_path: Path) -> None:
    out = plot.plot_results(records, tmp_path / "plots" / "metrics.png", metric="accuracy")

    assert out == tmp_path / "plots" / "metrics.png"
    (ax,) = drawn[0].axes
    assert legend(ax) == [
        "digits: best accuracy 0.93 at step=20.pt",
        "mnist: best accuracy 0.88 at step=200.pt",
    ]
    stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "*"]
    assert stars == [(20, 0.93), (200, 0.88)]
    digits_line = next(line for line in ax.lines if line.get_label().startswith("digits:"))
    assert list(digits_line.get_xdata()) == [10, 20, 30]  # sorted by step, failed record left out
    # The picture itself: each curve where its data is, in its colour, with its star.
    assert_plotted(out, ax, "digits", [(10, 0.60), (20, 0.93), (30, 0.85)], best=(20, 0.93))
    assert_plotted(out, ax, "mnist", [(100, 0.70), (200, 0.88)], best=(200, 0.88))


def test_default_metric_is_first_numeric_and_loss_is_minimised(records: list[ResultRecord], drawn: list[Any],
                                                                tmp_path: Path) -> None:
    records.insert(0, rec("digits", 5, note="text only"))
    plot.plot_results(records, tmp_path / "m.png")

    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "loss"
    assert legend(ax) == ["digits: best loss 0.3 at step=20.pt", "mnist: best loss 0.4 at step=200.pt"]


def test_best_can_use_another_metric_and_direction(records: list[ResultRecord], drawn: list[Any], tmp_path: Path) -> None:
    plot.plot_results(records, tmp_path / "m.png", metric="loss", best=("accuracy", "min"))

    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "loss"
    assert legend(ax) == ["digits: best accuracy 0.6 at step=10.pt", "mnist: best accuracy 0.7 at step=100.pt"]


def test_best_points_per_watch(records: list[ResultRecord]) -> None:
    points = plot.series(records, "loss")
    best = plot.best_points(points, "loss", "min")
    assert {w: r["checkpoint"] for w, (_, r) in best.items()} == {
        "digits": "/runs/digits/step=20.pt",
        "mnist": "/runs/mnist/step=200.pt",
    }
    with pytest.raises(ValueError, match="'max' or 'min'"):
        plot.best_points(points, "loss", "lowest")


def test_without_steps_x_is_finish_order() -> None:
    records = [
        rec("run", None, finished="2026-01-01T00:00:03", accuracy=0.9),
        rec("run", None, finished="2026-01-01T00:00:01", accuracy=0.5),
        rec("run", None, finished="2026-01-01T00:00:02", accuracy=0.7),
    ]
    points = plot.series(records, "accuracy")
    assert [(x, r["metrics"]["accuracy"]) for x, r in points["run"]] == [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]


def test_stepless_records_left_out_where_the_watch_has_steps(records: list[ResultRecord]) -> None:
    records.append(rec("digits", None, finished="2026-01-01T00:00:09", loss=0.3, accuracy=0.93))
    points = plot.series(records, "accuracy")
    assert [x for x, _ in points["digits"]] == [10.0, 20.0, 30.0]


def test_missing_metric_names_the_metric_and_what_exists(records: list[ResultRecord], tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    with pytest.raises(ValueError, match=r"'bleu'.*numeric metrics: loss, accuracy"):
        plot.plot_results(records, out, metric="bleu")
    with pytest.raises(ValueError, match=r"best.*'f1'"):
        plot.plot_results(records, out, metric="loss", best=("f1", "max"))
    with pytest.raises(ValueError, match="no successful evaluation"):
        plot.plot_results([rec("digits", 1, status="failed")], out)
    assert not out.exists()
