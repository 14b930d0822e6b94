"""The image builds from a package index too, not only offline from the wheelhouse.

No index on the internet is reachable from a build here, so the test serves one on the host's
loopback (a PEP 503 "simple" layout of the wheelhouse, over HTTP) and builds with the classic
builder on the host network, PIP_OFFLINE=0: pip resolves everything through the index.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2elib import ROOT, docker_cli, engine_running, image_present, run, unavailable
from packaging.utils import canonicalize_name, parse_wheel_filename

pytestmark = pytest.mark.e2e

BASE = "assayer-base:bookworm"
TAG = "assayer:e2e-index"
INDEX_PORT = 38917
"""Fixed, so a second run hits the build cache (the index URL is a build arg)."""


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: list[str]

    def log_message(self, format: str, *args: object) -> None:
        self.served.append(self.path)


@pytest.fixture
def simple_index() -> Iterator[tuple[str, list[str]]]:
    wheels = sorted((ROOT / "docker" / "wheelhouse").glob("*.whl"))
    if not wheels:
        unavailable("docker/wheelhouse is empty (docker/wheelhouse.sh fills it)")
    root = Path(tempfile.mkdtemp(prefix="assayer-index-"))
    for wheel in wheels:
        project = root / "simple" / canonicalize_name(parse_wheel_filename(wheel.name)[0])
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).symlink_to(wheel)
    served: list[str] = []
    handler = type("Handler", (_Handler,), {"served": served})
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), functools.partial(handler, directory=str(root)))
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/", served
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)


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
