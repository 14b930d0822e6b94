"""Fixtures of the chart tests (helpers live in chartlib.py)."""

from __future__ import annotations

import pytest
from chartlib import find_helm, require_tool


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary; fails under CI=true when there is none, skips elsewhere."""
    return require_tool("helm", find_helm(), "looked at $HELM, PATH and .cache/bin/helm")
