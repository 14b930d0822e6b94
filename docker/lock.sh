#!/usr/bin/env bash
# Write docker/requirements.lock (`make lock`): every package docker/Dockerfile installs besides
# torch itself, pinned (==) with the sha256 of every file the package index has for that version.
# The Dockerfile installs exactly this set (pip --no-deps --require-hashes) and docker/wheelhouse.sh
# downloads it; rerun this after changing pyproject.toml's dependencies, and commit the result.
#
# What goes in: pyproject.toml's dependencies and its torch, plot and trackers' extras (tensorboard,
# mlflow, which also serves compose's mlflow profile, and wandb), resolved together with
# TORCH_SPEC, so that torch's own dependencies (sympy, networkx, ...) are locked too; torch is left
# out: its build (CPU or CUDA, and the CUDA libraries that come with it) is chosen by the build args
# TORCH_SPEC and TORCH_INDEX_URL. Plus async-timeout, which redis needs on Python < 3.11.3 (Debian
# bookworm's python3 is 3.11.2).
#
# pip-compile resolves for the Python running it: run it with Python 3.11 on Linux x86_64, as the
# image. Env: PYTHON (default: the project venv's python, which has pip-tools from the dev extra),
# TORCH_SPEC (torch==2.13.0), TORCH_INDEX_URL (PyTorch's CPU index, as the Dockerfile: where the
# CPU build of torch and its dependencies are resolved from; empty: the default index only).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
lock=docker/requirements.lock

version="$("$py" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]} {platform.machine()}")')"
if [[ "$version" != "3.11 x86_64" ]]; then
    echo "lock: $py is Python $version; the image is CPython 3.11 on x86_64 and pip-compile resolves" \
        "for the Python running it (PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
"$py" -m piptools compile --help >/dev/null 2>&1 || {
    echo "lock: pip-tools is missing in $py (make install: it is in the dev extra)" >&2
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    "$py" docker/requirements.py pyproject.toml --extra torch --extra plot --extra tensorboard --extra mlflow \
        --extra wandb --exclude torch
    echo "$torch_spec"
    echo "async-timeout>=4.0.3"
} >"$work/requirements.in"

# An index that does not answer costs pip retries for every package (minutes): ask it once first.
if [[ -n "$torch_index" ]] && ! "$py" - "$torch_index" <<'EOF'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=10).close()
except Exception as exc:
    sys.exit(f"lock: {sys.argv[1]} does not answer ({exc})")
EOF
then
    echo "lock: resolving torch from the indexes and find-links pip is set up with instead" >&2
    torch_index=""
fi
index_args=()
[[ -z "$torch_index" ]] || index_args=(--extra-index-url "$torch_index")
# --unsafe-package torch: resolved (its dependencies are locked) but not written.
# The header pip-compile writes names this script, not itself.
CUSTOM_COMPILE_COMMAND="make lock" "$py" -m piptools compile --quiet --generate-hashes --strip-extras \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host --unsafe-package torch \
    --resolver backtracking "${index_args[@]}" --output-file "$work/requirements.lock" "$work/requirements.in" \
    2> >(grep -v "may be rejected by pip install" >&2)
# A CUDA build of torch (PyPI's Linux default) would lock its CUDA libraries for every image.
if grep -qiE '^(nvidia-|triton|cuda-)' "$work/requirements.lock"; then
    echo "lock: torch resolved to a CUDA build (its CUDA libraries are in the lock): make the CPU index" \
        "TORCH_INDEX_URL reachable (or a find-links with the CPU build) and run it again" >&2
    exit 1
fi

# Comments that name the temp directory would change on every run: name pyproject.toml instead.
# pip-compile's closing warning about the unpinned torch is replaced by the reason.
{
    sed -e "s|-r $work/requirements.in|pyproject.toml|g" -e '/^# WARNING: The following packages were not pinned/,$d' \
        "$work/requirements.lock"
    echo "# torch ($torch_spec) is not here: docker/Dockerfile installs it first, from TORCH_INDEX_URL"
    echo "# (CPU or CUDA build); what it depends on is locked above."
} >"$lock"
echo "lock: $(grep -c '^[a-z0-9]' "$lock") packages in $lock ($torch_spec resolved beside them, left out)"
