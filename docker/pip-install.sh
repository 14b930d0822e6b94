#!/bin/sh
# pip install "$@" from the wheelhouse copied into the build (/build/*.whl) when there is one,
# else from the package index. PIP_OFFLINE=1 insists on the wheelhouse, PIP_OFFLINE=0 on the
# index; the default, auto, takes the wheelhouse when it holds wheels.
set -eu

wheelhouse="${WHEELHOUSE:-/build}"
mode="${PIP_OFFLINE:-auto}"

have_wheels() {
    for wheel in "$wheelhouse"/*.whl; do
        [ -e "$wheel" ] && return 0
    done
    return 1
}

case "$mode" in
    1 | true | yes) offline=1 ;;
    0 | false | no) offline=0 ;;
    auto) if have_wheels; then offline=1; else offline=0; fi ;;
    *) echo "pip-install.sh: PIP_OFFLINE must be auto, 1 or 0, not '$mode'" >&2; exit 2 ;;
esac

if [ "$offline" = 1 ]; then
    have_wheels || { echo "pip-install.sh: PIP_OFFLINE=$mode but no wheels in $wheelhouse (run docker/wheelhouse.sh)" >&2; exit 1; }
    echo "pip-install.sh: offline, from $wheelhouse"
    # --no-index also drops any --index-url in "$@".
    exec pip install --no-cache-dir --no-index --find-links "$wheelhouse" "$@"
fi
echo "pip-install.sh: from the package index"
exec pip install --no-cache-dir "$@"
