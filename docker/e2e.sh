#!/usr/bin/env bash
# End-to-end tests of the container bundle on a real Docker engine: what `make e2e` and CI run.
#
#   bash docker/e2e.sh [PYTEST ARGS...]
#
# 1. a running engine and docker compose v2, checked (.ci/install-docker.sh sets them up, with
#    hadolint, chromium and debootstrap; CI runs it first)
# 2. local base images (no image registry here: docker/build-local-bases.sh)
# 3. the wheelhouse (pip inside builds cannot verify TLS here: docker/wheelhouse.sh), with the
#    extra requirement the custom-image tests install
# 4. the image from the repo's own Dockerfile, classic builder: assayer:local
# 5. pytest -m e2e tests/e2e (the README's `docker compose up -d --wait --scale eval=4`, and the rest)
# Every compose project of this run is removed at the end, whatever happened.
# Env: PYTHON (default .venv/bin/python), ASSAYER_E2E_IMAGE (assayer:local).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export ASSAYER_E2E_IMAGE="${ASSAYER_E2E_IMAGE:-assayer:local}"
export ASSAYER_E2E_REDIS_IMAGE="${ASSAYER_E2E_REDIS_IMAGE:-assayer-redis:7}"
# The tests name their compose projects with this prefix, so the cleanup below finds them all.
export ASSAYER_E2E_PREFIX="assayer-e2e-$$-"
artifacts="$root/tests/artifacts"
mkdir -p "$artifacts"

step_started=$SECONDS
step() {
    echo "e2e: [$((SECONDS - step_started))s] $*"
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local project
    for project in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' 2>/dev/null | sort -u); do
        [[ "$project" == "$ASSAYER_E2E_PREFIX"* ]] || continue
        echo "e2e: removing leftover compose project $project"
        docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null
        docker volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker volume rm >/dev/null
        docker network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker network rm >/dev/null
    done
    # Images that compose built for this run's projects (the layers stay cached).
    docker images --format '{{.Repository}}:{{.Tag}}' assayer-e2e 2>/dev/null \
        | grep -F ":$ASSAYER_E2E_PREFIX" | xargs -r docker rmi --no-prune >/dev/null || true
}
trap cleanup EXIT

step "engine and compose"
# Checked, never installed here: setting up a machine is .ci/install-docker.sh's job (CI runs it).
if ! docker info >/dev/null 2>&1; then
    echo "e2e: no Docker engine answers (docker info). Run \`bash .ci/install-docker.sh\` (as root on" \
        "Debian: docker.io, dockerd started, compose v2, debootstrap, chromium, hadolint), or install" \
        "and start Docker yourself." >&2
    exit 1
fi
if ! docker compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
    echo "e2e: no docker compose v2 (docker compose version). Run \`bash .ci/install-docker.sh\`, or" \
        "install the compose v2 plugin yourself." >&2
    exit 1
fi

step "local base images"
bash docker/build-local-bases.sh

step "wheelhouse"
# tabulate: EXTRA in tests/e2e/test_e2e_custom_image.py. Downloaded now, before any build: the
# wheelhouse is part of the build context, and a change mid-run would miss every cached layer.
EXTRA_REQUIREMENTS=tabulate PYTHON="$python" bash docker/wheelhouse.sh

step "image $ASSAYER_E2E_IMAGE (classic builder; log: tests/artifacts/build.log)"
if ! DOCKER_BUILDKIT=0 docker build --force-rm -f docker/Dockerfile \
    --build-arg BASE_IMAGE=assayer-base:bookworm -t "$ASSAYER_E2E_IMAGE" . >"$artifacts/build.log" 2>&1; then
    tail -n 40 "$artifacts/build.log" >&2
    exit 1
fi

step "pytest -m e2e tests/e2e"
status=0
"$python" -m pytest -m e2e tests/e2e -p no:cacheprovider "$@" || status=$?
step "done (pytest exit $status)"
exit "$status"
