"""docs/kubernetes.md's settings table names every setting once, and what it names exists."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml
from chartlib import CHART, ROOT, containers, render

pytestmark = pytest.mark.chart

DOC = ROOT / "docs" / "kubernetes.md"
VALUE_PATH = re.compile(r"`([a-z][A-Za-z]*(?:\.[A-Za-z]+)+)`")


def settings_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `(ASSAYER_[A-Z_]+)` \|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def has_value(values: dict[str, Any], path: str) -> bool:
    node: Any = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_every_setting_has_one_row() -> None:
    from assayer.settings import Settings

    fields = {"ASSAYER_" + f.name.upper() for f in dataclasses.fields(Settings)}
    assert set(settings_rows()) == fields


def test_every_chart_value_named_in_the_docs_exists() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    named = set()
    for line in DOC.read_text().splitlines():
        if line.startswith("|"):
            named |= {p for p in VALUE_PATH.findall(line) if p.split(".")[0] in values}
    assert len(named) > 30
    assert sorted(p for p in named if not has_value(values, p)) == []


def test_every_variable_the_chart_sets_is_documented(helm: str) -> None:
    rows = settings_rows()
    r = render(helm)
    names = set(r.config())
    for obj in r.workloads():
        for c in containers(obj):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("ASSAYER_")}
    assert names - set(rows) == set()
    for name in names:
        assert rows[name][4], f"{name} has no chart value"


def same_value(documented: str, rendered: str) -> bool:
    try:
        return float(documented) == float(rendered)
    except ValueError:
        return documented == rendered


def test_defaults_in_the_table_match_the_chart(helm: str) -> None:
    cfg = render(helm).config()
    checked = 0
    for name, cells in settings_rows().items():
        # paths the chart sets on purpose: its own mounts, and evaluators only from their mount
        if name in cfg and name not in ("ASSAYER_HOME", "ASSAYER_RESULTS_DIR", "ASSAYER_EVALUATOR_PATHS"):
            documented = cells[1].split()[0].strip("`")
            assert same_value(documented, cfg[name]), f"{name}: docs say {documented}, chart renders {cfg[name]}"
            checked += 1
    assert checked >= 12
