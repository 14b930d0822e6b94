#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image needs (Linux x86_64, glibc <= 2.36 as in
# Debian bookworm, CPython 3.11), so that docker/Dockerfile can install offline
# (`pip install --no-index --find-links`). For machines where pip inside a build cannot reach or
# verify the package index; the host's pip can.
# Users with a working index don't need this: without wheels the build uses the index.
# What: every file of docker/requirements.lock (hashes checked), torch per TORCH_SPEC, the build
# backend, EXTRA_REQUIREMENTS; all at the locked versions where the lock has the package.
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
lock="$root/docker/requirements.lock"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The lock's pins without their hashes: constraints for what is downloaded beside it.
sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ]*\).*/\1/p' "$lock" >"$work/constraints.txt"
{
    echo "$torch_spec"
    # setuptools and wheel: the project's build backend, for the offline build of the project.
    echo "setuptools>=68"
    echo "wheel"
    # The build arg of the same name, one word per requirement (read -a: no globbing), resolved
    # together with the rest as the build installs them on top of it.
    read -ra extra <<<"${EXTRA_REQUIREMENTS:-}"
    [[ ${#extra[@]} -eq 0 ]] || printf '%s\n' "${extra[@]}"
} >"$work/requirements.txt"

abi="cp${python_version/./}"
download() {
    "$py" -m pip download --quiet --disable-pip-version-check \
        --dest "$out" --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 --python-version "$python_version" \
        --implementation cp --abi "$abi" \
        "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# The lock as the image installs it: exactly those files (pip checks each one's hash).
download --no-deps --require-hashes -r "$lock"
download -c "$work/constraints.txt" -r "$work/requirements.txt"
echo "wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
