#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image needs (Linux x86_64, glibc <= 2.36 as in
# Debian bookworm, CPython 3.11), so that docker/Dockerfile can install offline
# (`pip install --no-index --find-links`). For machines where pip inside a build cannot reach or
# verify the package index; the host's pip can.
# Users with a working index don't need this: without wheels the build uses the index.
#
# Env: TORCH_SPEC (default torch==2.13.0, as the Dockerfile), EXTRA_REQUIREMENTS (the same
#      space-separated requirement specs as the build arg; default none), PYTHON (default: the
#      project venv's python, else python3), PYTHON_VERSION (default 3.11: the base image's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/docker/wheelhouse"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python_version="${PYTHON_VERSION:-3.11}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi

mkdir -p "$out"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
"$py" "$root/docker/requirements.py" "$root/pyproject.toml" --extra torch --extra plot --exclude torch >"$requirements"
{
    echo "$torch_spec"
    # setuptools and wheel: the project's build backend, for the offline build of the project.
    echo "setuptools>=68"
    echo "wheel"
    # pip evaluates environment markers against the Python running it, not --python-version:
    # add what the base images' own Python needs on top (Debian bookworm's 3.11.2 < 3.11.3).
    echo "async-timeout>=4.0.3"  # redis: python_full_version < "3.11.3"
    # The build arg of the same name, one word per requirement (read -a: no globbing), resolved
    # together with the rest as the build installs them on top of it.
    read -ra extra <<<"${EXTRA_REQUIREMENTS:-}"
    [[ ${#extra[@]} -eq 0 ]] || printf '%s\n' "${extra[@]}"
} >>"$requirements"

abi="cp${python_version/./}"
"$py" -m pip download --quiet --disable-pip-version-check \
    --dest "$out" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform linux_x86_64 --python-version "$python_version" \
    --implementation cp --abi "$abi" \
    -r "$requirements" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
