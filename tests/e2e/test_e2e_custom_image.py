"""Evaluators' own dependencies, both documented ways: the EXTRA_REQUIREMENTS build arg of
docker/Dockerfile, and an image FROM the Assayer image (examples/custom-image).

Both reuse what docker/e2e.sh built: the first builds the same Dockerfile (every layer before
the extra requirements comes from the cache), the second starts FROM that image.
"""

from __future__ import annotations

import os

import pytest
from e2elib import (
    BASE_IMAGE,
    IMAGE,
    ROOT,
    WHEELHOUSE,
    docker_cli,
    engine_running,
    image_present,
    run,
    unavailable,
    wheelhouse_index,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EXTRA = "tabulate"
"""A small pure-Python package the image lacks; docker/e2e.sh has docker/wheelhouse.sh download it
(EXTRA_REQUIREMENTS=tabulate) before the first build, so the build context stays the same all run."""
EXAMPLE = ROOT / "examples" / "custom-image"
INDEX_PORT = 38918
"""Fixed, so a second run hits the build cache (the index URL is a build arg)."""


def python_in(image: str, code: str, check: bool = True) -> str:
    proc = run([docker_cli(), "run", "--rm", "--entrypoint", "python", image, "-c", code], check=check)
    return proc.stdout if proc.returncode == 0 else ""


@pytest.fixture(autouse=True)
def suite_image_without_the_extra() -> None:
    engine_running()
    image_present(IMAGE)
    image_present(BASE_IMAGE)
    assert not python_in(IMAGE, f"import {EXTRA}; print('present')", check=False), \
        f"{IMAGE} already has {EXTRA}: the tests below would prove nothing"


def test_extra_requirements_build_arg_adds_a_package_beside_safetensors() -> None:
    if not any(WHEELHOUSE.glob("*.whl")):
        unavailable("docker/wheelhouse is empty (docker/wheelhouse.sh fills it)")
    assert any(WHEELHOUSE.glob(f"{EXTRA}-*.whl")), \
        f"no {EXTRA} wheel: EXTRA_REQUIREMENTS={EXTRA} docker/wheelhouse.sh should have downloaded it (docker/e2e.sh)"
    tag = "assayer:e2e-extra"
    run(
        [docker_cli(), "build", "--force-rm", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
         "--build-arg", f"EXTRA_REQUIREMENTS={EXTRA}", "-t", tag, "."],
        timeout=600, env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    try:
        out = python_in(tag, f"import {EXTRA}, safetensors.torch, torch, assayer.cli; print(torch.__version__)")
        assert out.startswith("2.13.0"), "the extra requirement must not replace torch: " + out
        assert "assayer" in run([docker_cli(), "run", "--rm", tag, "--version"]).stdout
    finally:
        run([docker_cli(), "rmi", "--no-prune", tag], check=False)


def test_an_image_from_the_assayer_image_installs_requirements_and_runs_as_10001() -> None:
    requirements = (EXAMPLE / "requirements.txt").read_text()
    assert EXTRA in requirements, "the example's requirements.txt is what this test installs"
    tag = "assayer:e2e-custom"
    # pip inside a build cannot verify TLS to PyPI here: the wheelhouse, served on the loopback,
    # is the index (the example's PIP_INDEX_URL build arg, a user's mirror otherwise).
    with wheelhouse_index(INDEX_PORT) as (url, _served):
        run([docker_cli(), "build", "--force-rm", "--network", "host", "--build-arg", f"ASSAYER_IMAGE={IMAGE}",
             "--build-arg", f"PIP_INDEX_URL={url}", "-t", tag, str(EXAMPLE)],
            timeout=300, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    try:
        user = run([docker_cli(), "image", "inspect", "--format", "{{.Config.User}}", tag]).stdout.strip()
        assert user == "10001:10001"
        out = python_in(tag, f"import os, {EXTRA}, torch; print(os.getuid(), torch.__version__)")
        uid, torch_version = out.split()
        assert uid == "10001" and torch_version.startswith("2.13.0"), out
        # Still the Assayer image: its entrypoint and CLI.
        assert "assayer" in run([docker_cli(), "run", "--rm", tag, "--version"]).stdout
    finally:
        run([docker_cli(), "rmi", "--no-prune", tag], check=False)
