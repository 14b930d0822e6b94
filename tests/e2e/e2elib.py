"""Helpers for the end-to-end tests: the docker CLI, one compose project, waiting, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "tests" / "artifacts"

IMAGE = os.environ.get("ASSAYER_E2E_IMAGE", "assayer:local")
"""The Assayer image under test, built from docker/Dockerfile by docker/e2e.sh."""
REDIS_IMAGE = os.environ.get("ASSAYER_E2E_REDIS_IMAGE", "assayer-redis:7")
"""Redis image; the local stand-in from docker/build-local-bases.sh where no registry is reachable."""
BASE_IMAGE = os.environ.get("ASSAYER_E2E_BASE_IMAGE", "assayer-base:bookworm")
"""BASE_IMAGE build arg where python:3.11-slim-bookworm cannot be pulled."""
WHEELHOUSE = ROOT / "docker" / "wheelhouse"
"""Filled by docker/wheelhouse.sh; pip inside the builds installs from it (or from it served as an index)."""

# Variables compose.yaml reads: the tests set every one they need and clear the others, so
# neither the developer's shell nor a .env file in the repo changes what is tested.
COMPOSE_VARIABLE_PREFIXES = ("ASSAYER_", "CHECKPOINT_DIR", "REDIS_IMAGE", "BASE_IMAGE", "TORCH_", "COMPOSE_")


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail under CI, where the e2e tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the end-to-end tests must run; see docker/e2e.sh)", pytrace=False)
    pytest.skip(f"{reason}; run `make e2e` or docker/e2e.sh")


def run(cmd: list[str], timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def docker_cli() -> str:
    found = shutil.which("docker")
    if not found:
        unavailable("no docker CLI on PATH")
    return str(found)


@lru_cache(maxsize=1)
def _compose_cli() -> tuple[str, ...]:
    """`docker compose` (v2 plugin); its version must be 2.x."""
    docker = docker_cli()
    proc = subprocess.run([docker, "compose", "version", "--short"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip().lstrip("v").startswith("2."):
        unavailable(f"no docker compose v2 plugin ({(proc.stderr or proc.stdout).strip()[:200]})")
    return (docker, "compose")


def compose_cli() -> list[str]:
    return list(_compose_cli())


def engine_running() -> None:
    proc = subprocess.run([docker_cli(), "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable(f"no Docker engine answers ({proc.stderr.strip()[:200]})")


def image_present(name: str) -> None:
    if subprocess.run([docker_cli(), "image", "inspect", name], capture_output=True).returncode != 0:
        unavailable(f"image {name} is missing")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(COMPOSE_VARIABLE_PREFIXES)}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = cond()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


@dataclass
class Compose:
    """One compose project of the repo's compose.yaml, with its own name, env file and volumes."""

    project: str
    env: dict[str, str]
    files: list[str] = field(default_factory=lambda: ["compose.yaml"])
    profiles: list[str] = field(default_factory=list)

    def base(self) -> list[str]:
        cmd = [*compose_cli(), "--project-directory", str(ROOT), "-p", self.project]
        for name in self.files:
            cmd += ["-f", str(ROOT / name)]
        for profile in self.profiles:
            cmd += ["--profile", profile]
        return cmd

    def __call__(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.base(), *args], timeout=timeout, check=check, env=clean_env(**self.env))

    def exec(self, service: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("exec", "-T", service, *cmd, timeout=timeout, check=check)

    def container_ids(self, service: str) -> list[str]:
        return sorted(self("ps", "--all", "-q", service).stdout.split())

    def results(self) -> list[dict[str, Any]]:
        return list(json.loads(self.exec("watch", "assayer", "results", "--format", "json").stdout))

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.exec("watch", "assayer", "status", "--format", "json").stdout))

    def jsonl_lines(self, watch: str) -> list[dict[str, Any]]:
        """Every attempt the eval workers appended to the results volume for ``watch``."""
        proc = self.exec("watch", "cat", f"/results/{watch}.jsonl", check=False)
        if proc.returncode != 0:
            return []
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def save_logs(self) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"compose-{self.project}.log"
        every_profile = dataclasses.replace(self, profiles=["*"])
        proc = every_profile("logs", "--no-color", "--timestamps", timeout=60, check=False)
        path.write_text(proc.stdout + proc.stderr)
        return path

    def down(self) -> None:
        every_profile = dataclasses.replace(self, profiles=["*"])
        every_profile("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=180, check=False)


EVAL_REPLICAS = 4
"""`--scale eval=4`, as in the README."""
UP = ("up", "-d", "--wait", "--scale", f"eval={EVAL_REPLICAS}")
"""The arguments of the README's `docker compose up`, exactly: the stack fixture runs them
(test_e2e_bundle checks that the README still says so)."""
DASHBOARD_USER = "e2e"
ODD_PASSWORD_CHARACTERS = " %x %(ENV_HOME)s \"q\" 's' a,b=c \\ $HOME `id` ;# "
"""Part of every password of the stack: what compose, a shell, supervisor or a URL could mangle."""


@dataclass
class Stack:
    """The running compose project the stack tests share."""

    compose: Compose
    checkpoints: Path
    """Host directory mounted read-only at /checkpoints."""
    dashboard_url: str
    dashboard_password: str
    redis_password: str
    declared_sum: float
    """Weight sum of the checkpoint the declared watch finds at start."""
    up_output: str = ""
    """What the first `docker compose up` printed (stdout and stderr)."""

    def container_path(self, path: Path) -> str:
        return "/checkpoints/" + path.relative_to(self.checkpoints).as_posix()


def project_name() -> str:
    """Unique per run; docker/e2e.sh removes every project with its ASSAYER_E2E_PREFIX at exit."""
    prefix = os.environ.get("ASSAYER_E2E_PREFIX", f"assayer-e2e-{os.getpid()}-")
    return f"{prefix}{secrets.token_hex(3)}"


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of a GET (0 when nothing answers), with basic auth when given."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError):
        return 0  # nothing answers (yet)


# -- checkpoints --------------------------------------------------------------------------------

CHECKPOINT_SHAPE = (64, 1024)
"""256 KiB of float32: big enough that a slow write takes several chunks."""


def checkpoint_bytes(tag: int) -> tuple[bytes, float]:
    """A real torch checkpoint (torch.save zip) whose weight sums to a value known in advance."""
    import torch

    weight = torch.full(CHECKPOINT_SHAPE, float(tag))
    buffer = io.BytesIO()
    torch.save({"weight": weight, "tag": tag}, buffer)
    return buffer.getvalue(), float(weight.sum())


def write_checkpoint(path: Path, tag: int, chunks: int = 1, pause: float = 0.0, long_pause_at: int | None = None,
                     long_pause: float = 0.0) -> float:
    """Write a checkpoint in place, in ``chunks`` pieces with ``pause`` seconds between them.

    ``long_pause_at``: the chunk after which to pause ``long_pause`` seconds instead (longer than
    the settle time, so only a format-aware completeness check keeps the partial file out).
    Returns the weight's sum, which the probe evaluator reports back.
    """
    data, total = checkpoint_bytes(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    size = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for index in range(chunks):
            fh.write(data[index * size:(index + 1) * size])
            fh.flush()
            os.fsync(fh.fileno())
            if index < chunks - 1:
                time.sleep(long_pause if index == long_pause_at else pause)
    os.chmod(path, 0o644)
    return total


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


# -- a package index on the host's loopback -----------------------------------------------------

class _IndexHandler(http.server.SimpleHTTPRequestHandler):
    served: list[str]

    def log_message(self, format: str, *args: object) -> None:
        self.served.append(self.path)


@contextlib.contextmanager
def wheelhouse_index(port: int) -> Iterator[tuple[str, list[str]]]:
    """docker/wheelhouse served as a PEP 503 "simple" index over HTTP on 127.0.0.1.

    For builds that must use an index (no index on the internet is reachable from a build here):
    they run with ``--network host``. ``port`` is fixed by the caller where the URL is a build arg,
    so a second run hits the build cache; a free one is taken when it is busy.
    Yields the index URL and the list of paths requested so far.
    """
    wheels = sorted(WHEELHOUSE.glob("*.whl"))
    if not wheels:
        unavailable("docker/wheelhouse is empty (docker/wheelhouse.sh fills it)")
    root = Path(tempfile.mkdtemp(prefix="assayer-index-"))
    for wheel in wheels:
        project = root / "simple" / canonicalize_name(parse_wheel_filename(wheel.name)[0])
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).symlink_to(wheel)
    served: list[str] = []
    handler = functools.partial(type("Handler", (_IndexHandler,), {"served": served}), directory=str(root))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/", served
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)
