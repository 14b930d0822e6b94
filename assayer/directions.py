"""Which way is better for a metric: the one rule used by ``results --best``, the plot and (later) the page.

In order, the first that applies:

1. an explicit ``--best METRIC:min`` / ``:max``;
2. what the evaluator declared: a ``directions = {"val_mse": "min"}`` attribute on its function,
   carried in each result record;
3. the metric's name: its last word (words split at ``_``, ``-``, ``/``, ``.`` and spaces) is a known
   lower-is-better name (``loss``, ``mse``, ``rmse``, ``mae``, ``nll``, ``fid``, ``bpb``, ``ppl``,
   ``wer`` ...) or higher-is-better name (``acc``, ``accuracy``, ``f1``, ``auc``, ``bleu`` ...); else
   any word of it is;
4. otherwise higher is better.

Every answer says which of these decided it, so the output can show it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LOWER = frozenset({
    "loss", "losses", "error", "err", "errors", "mse", "rmse", "mae", "mape", "smape", "nll", "nlls", "ce",
    "xent", "crossentropy", "fid", "kid", "bpb", "bpc", "bpd", "ppl", "perplexity", "wer", "cer", "ter", "ber",
    "kl", "kld", "divergence", "distance", "regret", "latency", "time", "seconds", "secs", "duration", "mem",
    "memory", "lpips", "eer", "fpr", "fnr", "miss", "misses", "violations", "toxicity", "hallucination",
})
"""Words that name a metric where lower is better."""

HIGHER = frozenset({
    "acc", "accuracy", "f1", "precision", "recall", "auc", "auroc", "auprc", "ap", "map", "iou", "miou", "dice",
    "bleu", "rouge", "rougel", "meteor", "chrf", "em", "exact", "match", "score", "reward", "return", "psnr",
    "ssim", "r2", "top1", "top5", "pass", "passk", "win", "winrate", "correct", "tpr", "throughput", "mrr", "ndcg",
})
"""Words that name a metric where higher is better."""

_WORDS = re.compile(r"[^a-z0-9@]+")


@dataclass(frozen=True)
class Direction:
    mode: str  # "min" or "max"
    why: str  # "given", "declared by the evaluator", "name: 'mse'", "default"

    def __str__(self) -> str:
        return f"{'lower' if self.mode == 'min' else 'higher'} is better ({self.why})"


def by_name(metric: str) -> Direction | None:
    words = [w.split("@")[0] for w in _WORDS.split(metric.lower()) if w]
    for candidates in (words[-1:], list(reversed(words))):
        for word in candidates:
            if word in LOWER:
                return Direction("min", f"name: '{word}'")
            if word in HIGHER:
                return Direction("max", f"name: '{word}'")
    return None


def declared(records: Iterable[Mapping[str, Any]], metric: str) -> str | None:
    """The direction the evaluator declared for ``metric``, from the newest record that carries one."""
    for rec in sorted(records, key=lambda r: str(r.get("finished_at") or ""), reverse=True):
        mode = (rec.get("directions") or {}).get(metric)
        if mode in ("min", "max"):
            return str(mode)
    return None


def direction(metric: str, records: Iterable[Mapping[str, Any]] = (), given: str | None = None) -> Direction:
    """Which way is better for ``metric`` (see the module docstring for the order of the rules)."""
    if given:
        if given not in ("min", "max"):
            raise ValueError(f"direction must be min or max, not {given!r}")
        return Direction(given, "given")
    mode = declared(records, metric)
    if mode:
        return Direction(mode, "declared by the evaluator")
    return by_name(metric) or Direction("max", "default: no rule for this name")


def check_declared(value: Any) -> dict[str, str]:
    """An evaluator's ``directions`` attribute, checked: ``{metric: "min" | "max"}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and v in ("min", "max") for k, v in value.items()):
        raise TypeError("the evaluator's `directions` must map metric names to 'min' or 'max', "
                        "e.g. evaluate.directions = {'val_mse': 'min'}")
    return dict(value)
