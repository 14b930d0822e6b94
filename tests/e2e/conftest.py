"""Fixtures of the end-to-end tests: a real compose project of the repo's compose.yaml.

docker/e2e.sh prepares what they need (engine, compose v2, local base images, the image
``assayer:local``); under CI=true a missing piece fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2elib import (
    BASE_IMAGE,
    DASHBOARD_USER,
    HERE,
    ODD_PASSWORD_CHARACTERS,
    REDIS_IMAGE,
    ROOT,
    UP,
    Compose,
    Stack,
    docker_cli,
    engine_running,
    free_port,
    image_present,
    project_name,
    run,
    write_checkpoint,
)

READABLE_DIR = stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """compose.yaml up, with the README's very arguments (``UP``), on a temp CHECKPOINT_DIR;
    always torn down.

    As a user's first `up`: the Assayer image does not exist under the project's tag, and compose
    builds it from docker/Dockerfile once, on the watch service (``pull_policy: build``; the
    others run it, ``pull_policy: never``; the classic builder's cache makes this quick after
    docker/e2e.sh built the same Dockerfile) and pulls nothing (the Redis image is a local one).
    """
    engine_running()
    image_present(BASE_IMAGE)
    image_present(REDIS_IMAGE)

    workdir = Path(tempfile.mkdtemp(prefix="assayer-e2e-"))
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir()
    # The containers run as uid 10001: the mounted directories must be readable by others.
    for path in (workdir, checkpoints):
        path.chmod(READABLE_DIR)
    # A watch declared in a watches file (the other way in is `assayer watch add`, in the tests),
    # with a checkpoint already there for eval_existing.
    # Plus the demo profile's watch, as docker/watches.demo.yaml declares it (the last test runs
    # the demo trainer).
    demo = yaml.safe_load((ROOT / "docker" / "watches.demo.yaml").read_text())["watches"]
    declared = {"name": "declared", "directory": "/checkpoints/declared",
                "evaluator": "/evaluators/probe.py:evaluate", "eval_existing": True}
    watches_file = workdir / "watches.yaml"
    watches_file.write_text(yaml.safe_dump({"watches": [declared, *demo]}))
    watches_file.chmod(0o644)
    # The test's evaluators, beside the digits example the demo profile trains and evaluates.
    evaluators = workdir / "evaluators"
    shutil.copytree(HERE / "evaluators", evaluators, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "examples" / "digits", evaluators / "digits", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [evaluators, *evaluators.rglob("*")]:
        path.chmod(READABLE_DIR if path.is_dir() else 0o644)
    declared_sum = write_checkpoint(checkpoints / "declared" / "step_000001.pt", tag=1)

    password = "dash-" + os.urandom(6).hex() + ODD_PASSWORD_CHARACTERS
    redis_password = "redis-" + os.urandom(6).hex() + ODD_PASSWORD_CHARACTERS
    port = free_port()
    project = project_name()
    image = f"assayer-e2e:{project}"
    compose = Compose(
        project=project,
        env={
            "CHECKPOINT_DIR": str(checkpoints),
            "ASSAYER_REDIS_PASSWORD": redis_password,
            "ASSAYER_DASHBOARD_USER": DASHBOARD_USER,
            "ASSAYER_DASHBOARD_PASSWORD": password,
            "ASSAYER_DASHBOARD_PORT": str(port),
            "ASSAYER_EVALUATORS_DIR": str(evaluators),
            "ASSAYER_WATCHES_FILE": str(watches_file),
            "ASSAYER_IMAGE": image,
            "BASE_IMAGE": BASE_IMAGE,
            "REDIS_IMAGE": REDIS_IMAGE,
            "DOCKER_BUILDKIT": "0",
            "ASSAYER_LOG_LEVEL": "INFO",
        },
    )
    try:
        up = compose(*UP, timeout=600)
        yield Stack(compose, checkpoints, f"http://127.0.0.1:{port}", password, redis_password, declared_sum,
                    up_output=up.stdout + up.stderr)
    finally:
        log = compose.save_logs()
        compose.down()
        # Only the tag: the layers stay cached for the next run.
        run([docker_cli(), "rmi", "--no-prune", image], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\ncompose logs of {compose.project}: {log}")
