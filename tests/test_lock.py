"""docker/requirements.lock, which the image installs as it is, still answers pyproject.toml: a
dependency added or re-pinned there without `make lock` fails here, not as an image that lacks it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "requirements.lock"
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "os_name": "posix"}
"""The image's interpreter (Debian bookworm's python3 is the oldest one it gets)."""

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Each pinned package of the lock: its version and the hashes its entry carries."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            pins[name] = (Version(match.group(2)), [])
        elif line.strip().startswith("--hash=sha256:") and name:
            pins[name][1].append(line.strip())
    return pins


def image_requirements() -> list[Requirement]:
    """What the image installs besides torch, as docker/lock.sh asks for it."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml"),
         "--extra", "torch", "--extra", "plot", "--exclude", "torch"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [Requirement(line.split("#")[0]) for line in out.splitlines() if line.strip()]


def test_the_lock_pins_every_requirement_of_the_image_within_its_specifier() -> None:
    pins = locked()
    wanted = [r for r in image_requirements() if r.marker is None or r.marker.evaluate(IMAGE_PYTHON)]
    assert len(wanted) > 10
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in docker/requirements.lock: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"docker/requirements.lock has {name}=={version}, pyproject.toml wants {requirement}: run `make lock`"


def test_every_pin_has_a_hash_and_torch_is_left_to_its_own_index() -> None:
    pins = locked()
    unhashed = sorted(name for name, (_version, hashes) in pins.items() if not hashes)
    assert not unhashed, f"pip --require-hashes refuses these: {unhashed}"
    assert "torch" not in pins, "torch comes from TORCH_INDEX_URL (CPU or CUDA build), not from the lock"
    assert "async-timeout" in pins, "redis needs it on Debian bookworm's python3 (3.11.2)"
