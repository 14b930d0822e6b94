"""Print the project's requirements from pyproject.toml, one per line.

Used by docker/lock.sh (`make lock`): what docker/requirements.lock, which the image installs,
is resolved from.

    python3 requirements.py pyproject.toml [--extra NAME]... [--exclude NAME]...
"""

from __future__ import annotations

import argparse
import re
import sys

import tomllib


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="optional-dependencies group to add")
    parser.add_argument("--exclude", action="append", default=[], help="distribution name to leave out")
    args = parser.parse_args(argv)

    with open(args.pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    requirements = list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    for extra in args.extra:
        if extra not in extras:
            parser.error(f"no optional-dependencies group {extra!r} in {args.pyproject}")
        requirements += extras[extra]
    excluded = {_name(name) for name in args.exclude}
    for requirement in requirements:
        if _name(requirement) not in excluded:
            print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
