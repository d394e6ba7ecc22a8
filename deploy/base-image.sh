#!/usr/bin/env bash
# Build a local base image for the ps Dockerfile where no image can be pulled: a Debian rootfs
# (debootstrap) with Python 3 and a virtual environment holding torch at the version the
# Dockerfile pins (its TORCH_VERSION; the image build keeps that torch), imported into Docker.
# The Dockerfile's default base is the official Python image; pass this one instead:
#   deploy/base-image.sh [--wheels DIR] [--tag ps-base:local]      (as root: debootstrap, chroot)
#   docker build --network host --build-arg BASE_IMAGE=ps-base:local -t ps:local .
# --wheels DIR: a directory of wheels pip may use (e.g. a local CPU torch 2.13.0 wheel); without
#   it pip downloads torch from the package index.
# --ca-bundle FILE: CA certificates to trust (default: $PIP_CERT when set), for sites whose
#   package traffic passes through a proxy with its own CA; the image's pip keeps trusting them.
set -euo pipefail

tag=ps-base:local
wheels=""
ca_bundle=${PIP_CERT:-}
suite=bookworm
torch_version=2.13.0  # the Dockerfile's TORCH_VERSION: keep the two equal
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    *) echo "base-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

rootfs=$(mktemp -d)
chmod 755 "$rootfs"  # it becomes the image's /, which every user must be able to enter
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" \
  http://deb.debian.org/debian
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
changes=()
if [[ -n "$ca_bundle" ]]; then
  cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  export PIP_CERT=/etc/ssl/certs/ca-certificates.crt  # inside the chroot
  changes=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
fi
find_links=()
if [[ -n "$wheels" ]]; then
  mkdir -p "$rootfs/tmp/wheels"
  cp "$wheels"/*.whl "$rootfs/tmp/wheels/"
  find_links=(--find-links /tmp/wheels)
fi
chroot "$rootfs" python3 -m venv /opt/venv
PIP_FIND_LINKS="" chroot "$rootfs" /opt/venv/bin/pip install --no-cache-dir "${find_links[@]}" "torch==$torch_version"
rm -rf "$rootfs/tmp/wheels" "$rootfs/var/cache/apt/archives"/*.deb "$rootfs/var/lib/apt/lists"/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' "${changes[@]}" - "$tag"
echo "built base image $tag"
