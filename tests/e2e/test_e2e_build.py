"""The image builds from a package index too, not only offline from the wheelhouse.

No index on the internet is reachable from a build here, so the test serves one on the host's
loopback (a PEP 503 "simple" layout of the wheelhouse, over HTTP) and builds with the classic
builder on the host network, PIP_OFFLINE=0: pip resolves everything through the index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from e2elib import docker_cli, engine_running, image_present, run, wheelhouse_index

pytestmark = pytest.mark.e2e

BASE = "assayer-base:bookworm"
TAG = "assayer:e2e-index"
INDEX_PORT = 38917
"""Fixed, so a second run hits the build cache (the index URL is a build arg)."""


@pytest.fixture
def simple_index() -> Iterator[tuple[str, list[str]]]:
    with wheelhouse_index(INDEX_PORT) as index:
        yield index


@pytest.mark.timeout(900)  # a cold build installs torch and the rest through the index
def test_image_builds_from_a_package_index_without_the_wheelhouse(simple_index: tuple[str, list[str]]) -> None:
    engine_running()
    image_present(BASE)
    url, served = simple_index
    build = run(
        [docker_cli(), "build", "--force-rm", "--network", "host", "-f", "docker/Dockerfile",
         "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "PIP_OFFLINE=0",
         "--build-arg", f"PIP_INDEX_URL={url}", "--build-arg", f"TORCH_INDEX_URL={url}", "-t", TAG, "."],
        timeout=900, env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    try:
        log = build.stdout + build.stderr
        assert "pip-install.sh: offline" not in log, "the wheelhouse must not be used"
        # Steps cached by an earlier run of this test were built from this same index URL.
        if "pip-install.sh: from the package index" in log:
            assert any(path.endswith(".whl") for path in served), served
        versions = run([docker_cli(), "run", "--rm", "--entrypoint", "python", TAG, "-c",
                        "import torch, rq, rq_dashboard, assayer.cli; print(torch.__version__, rq.__version__)"])
        assert versions.stdout.split()[0].startswith("2.13.0"), versions.stdout
        cli = run([docker_cli(), "run", "--rm", TAG, "--version"])
        assert "assayer" in cli.stdout
    finally:
        # Keep the layers (--no-prune) so the next run is a cache hit; drop only the tag.
        run([docker_cli(), "rmi", "--no-prune", TAG], check=False)
