#!/usr/bin/env bash
# `docker compose` for this stack, with whichever engine is installed: docker compose, or podman-compose with
# docker/podman/containers.conf (and docker/podman-hostnet for Debian 12's podman-compose, see there).
#   docker/compose.sh up -d          docker/compose.sh ps          docker/compose.sh down
# Settings (ports, POSTGRES_PASSWORD, DICOM_NODE_CONFIG, MODELS_DIR) come from docker/.env or the environment.
# COMPOSE_FILES="compose.yaml compose.gpu.yaml" adds the GPU override; COMPOSE_PROJECT_NAME names the stack.
set -euo pipefail
cd "$(dirname "$0")"
project="${COMPOSE_PROJECT_NAME:-dicom-ai-node}"
files=()
for f in ${COMPOSE_FILES:-compose.yaml}; do files+=(-f "$f"); done
if [ "${ENGINE:-}" != podman ] && command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  exec docker compose -p "$project" "${files[@]}" "$@"
fi
command -v podman-compose >/dev/null || { echo "error: neither docker compose nor podman-compose is installed" >&2; exit 1; }
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/podman/containers.conf}"
exec podman-compose --podman-path "$PWD/podman-hostnet" -p "$project" "${files[@]}" "$@"
