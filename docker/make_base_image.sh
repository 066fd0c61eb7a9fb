#!/usr/bin/env bash
# A local base image for docker/Dockerfile where no image registry is reachable (python:3.11-slim cannot be
# pulled): a minimal Debian bookworm root file system made with debootstrap from Debian's package mirror, with
# Python 3.11 (python3, python3-venv, python-is-python3) and ca-certificates, imported into podman.
#
#   docker/make_base_image.sh [TAG]        (as root; default TAG localhost/mood-base:bookworm)
#
# then `podman build --build-arg PYTHON_IMAGE=TAG ...` (docker/README.md). Does nothing when TAG exists already,
# so the image is made once per machine. DEBIAN_MIRROR chooses the mirror (default http://deb.debian.org/debian);
# podman reads docker/containers.conf unless CONTAINERS_CONF names another file.
set -euo pipefail
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf}

tag=${1:-localhost/mood-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,python-is-python3,ca-certificates,libgomp1

if podman image exists "$tag"; then
    echo "make_base_image: $tag exists"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "make_base_image: error: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "make_base_image: error: no debootstrap (apt-get install debootstrap)" >&2; exit 1; }

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/mood-base.XXXXXX")
trap 'rm -rf -- "$rootfs"' EXIT
echo "make_base_image: debootstrap bookworm ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; echo "make_base_image: error: debootstrap failed" >&2; exit 1; }
rm -f "$rootfs.log"
# the downloaded packages and the package lists are not needed in the image
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "make_base_image: $tag: $(podman run --rm --network none "$tag" python --version)"
