#!/usr/bin/env bash
# Prepares podman to build and run the node's images on a host without a Docker daemon:
#   1. the Debian packages (podman, runc, debootstrap, podman-compose) when --install is given and one is missing;
#   2. docker/podman/containers.conf (runc, cgroupfs, no default ulimits, host network), which the caller exports as
#      CONTAINERS_CONF;
#   3. the base image debian:bookworm-slim: pulled when a registry can be reached, otherwise made locally with
#      debootstrap from the host's Debian mirror and imported under the same name, so every Dockerfile's
#      `FROM debian:bookworm-slim` builds unchanged.
# Idempotent: a second run finds everything in place and returns at once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman/containers.conf}"
BASE=docker.io/library/debian:bookworm-slim

if [ "${1:-}" = "--install" ]; then
  missing=""
  for p in podman runc debootstrap podman-compose; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi

command -v podman >/dev/null || { echo "error: podman is not installed (apt-get install podman runc)" >&2; exit 1; }

if podman image exists "$BASE"; then
  exit 0
fi
# A registry that answers gives the real image; here none does, and the pull fails within seconds.
if [ "${DICOM_NODE_LOCAL_BASE:-0}" != 1 ] && timeout 60 podman pull -q "$BASE" >/dev/null 2>&1; then
  echo "pulled $BASE"
  exit 0
fi
command -v debootstrap >/dev/null || {
  echo "error: $BASE cannot be pulled and debootstrap is not installed to make it (apt-get install debootstrap)" >&2
  exit 1
}
# The host's own Debian mirror (deb822 sources first, then the classic list), else the public one.
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
rootfs=$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "making $BASE locally: debootstrap --variant=minbase bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# What the official slim image leaves out: apt lists and caches, documentation, man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
echo "imported $BASE"
