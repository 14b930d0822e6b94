"""Security scan (checkov) of the chart, rendered with every values case, and of docker/Dockerfile.
No finding may remain unexplained: a check is skipped only with a written reason, in
helm/.checkov.yaml or as a checkov.io/skipN annotation on the one resource it concerns."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from chartlib import CHART, ROOT, case_name, ci_values_files, render, require_tool

pytestmark = pytest.mark.chart

CONFIG = ROOT / "helm" / ".checkov.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def find_checkov() -> str | None:
    env = os.environ.get("CHECKOV")
    if env:
        return env if Path(env).is_file() else None
    local = ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"
    if local.is_file():
        return str(local)
    return shutil.which("checkov")


@pytest.fixture(scope="module")
def checkov() -> str:
    return require_tool("checkov", find_checkov(), "looked at $CHECKOV, .cache/checkov-venv and PATH")


def scan(checkov: str, *target: str) -> list[dict[str, Any]]:
    """Run checkov with the project's configuration; one report per framework."""
    proc = subprocess.run(
        [checkov, "--config-file", str(CONFIG), *target, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    return reports if isinstance(reports, list) else [reports]


def failures(reports: list[dict[str, Any]]) -> list[str]:
    out = []
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for f in report["results"].get("failed_checks", []):
            out.append(f"{f['check_id']} {f['check_name']}: {f['resource']} ({f['file_path']})")
    return out


@pytest.fixture(scope="module")
def rendered_cases(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    for path in ci_values_files():
        (out / f"{case_name(path)}.yaml").write_text(render(helm, files=(path,)).text)
    return out


def test_chart_scan_has_no_findings(checkov: str, rendered_cases: Path) -> None:
    reports = scan(checkov, "-d", str(rendered_cases))
    assert [r["check_type"] for r in reports] == ["kubernetes"]
    assert reports[0]["summary"]["resource_count"] >= 20 * len(ci_values_files())
    assert failures(reports) == []


def test_dockerfile_scan_has_no_findings(checkov: str) -> None:
    assert DOCKERFILE.is_file()
    reports = scan(checkov, "-f", str(DOCKERFILE))
    assert [r["check_type"] for r in reports] == ["dockerfile"]
    assert failures(reports) == []


def test_scan_catches_an_insecure_rendering(helm: str, checkov: str, tmp_path: Path) -> None:
    """The scan can fail: weakened security contexts are reported."""
    weak = render(helm, {"securityContext": {"readOnlyRootFilesystem": False, "allowPrivilegeEscalation": True}})
    (tmp_path / "weak.yaml").write_text(weak.text)
    found = {f.split()[0] for f in failures(scan(checkov, "-d", str(tmp_path)))}
    assert {"CKV_K8S_20", "CKV_K8S_22"} <= found


def test_every_skipped_check_has_a_reason() -> None:
    lines = CONFIG.read_text().splitlines()
    skips = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"\s*-\s*(CKV\w+)\s*$", line))]
    assert skips, "no skip-check entries parsed"
    for i, check in skips:
        reason: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            reason.insert(0, lines[j])
            j -= 1
        text = " ".join(reason)
        assert check in text and len(text) > 80, f"{check} is skipped without a reason"

    annotations = []
    for template in (CHART / "templates").rglob("*.yaml"):
        annotations += re.findall(r"checkov\.io/skip\d+:\s*(.*)", template.read_text())
    assert annotations
    for value in annotations:
        assert re.fullmatch(r"CKV_\w+=\S.{30,}", value), f"annotation without a reason: {value}"
