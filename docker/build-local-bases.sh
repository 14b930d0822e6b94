#!/usr/bin/env bash
# Build the local stand-ins for the upstream base images, for machines that cannot pull from
# an image registry (CI here). They are used only by tests; the real defaults stay
# python:3.11-slim-bookworm and redis:7.2-bookworm.
#
#   assayer-base:bookworm  debootstrapped Debian bookworm with python3 (3.11, like the cp311
#                          wheels), python3-venv, python3-pip and ca-certificates
#   assayer-redis:7        that base plus Debian's redis-server, laid out like the official
#                          image (data in /data, runs as the redis user)
#
# Idempotent: an image that already exists is kept (FORCE=1 rebuilds both).
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), BASE_TAG, REDIS_TAG.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base_tag="${BASE_TAG:-assayer-base:bookworm}"
redis_tag="${REDIS_TAG:-assayer-redis:7}"
force="${FORCE:-0}"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [[ "$force" == 1 ]] || ! have_image "$base_tag"; then
    command -v debootstrap >/dev/null || { echo "debootstrap missing: run .ci/install-docker.sh" >&2; exit 1; }
    rootfs="$(mktemp -d /tmp/assayer-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap bookworm into $rootfs (about 2 minutes)"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 30 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # Same cleanups as the official Debian images: no apt lists, no caches.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$base_tag" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "built $base_tag"
else
    echo "have $base_tag"
fi

if [[ "$force" == 1 ]] || ! have_image "$redis_tag"; then
    DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE_IMAGE=$base_tag" \
        -t "$redis_tag" "$here/redis" >/dev/null
    echo "built $redis_tag"
else
    echo "have $redis_tag"
fi
