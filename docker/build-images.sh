#!/usr/bin/env bash
# Builds the node's images with podman (set up by podman-setup.sh) or docker, whichever is installed, and prints
# their sizes. Run from anywhere; `make images` runs it.
#   TORCH_VARIANT=cpu|cuda|cuXYZ   torch build of the inference image (default cpu; see docker/Dockerfile)
#   ENGINE=podman|docker           force one engine
#   WHEELHOUSE=/path               a local folder of wheels (podman only; default: $PIP_FIND_LINKS or pip.conf's find-links)
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${TORCH_VARIANT:-cpu}"
engine="${ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null; then engine=docker
  else echo "error: neither podman nor docker is installed (Debian: apt-get install podman runc)" >&2; exit 1
  fi
fi
args=(--build-arg "TORCH_VARIANT=$variant")
if [ "$engine" = podman ]; then
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/podman/containers.conf}"
  docker/podman-setup.sh
  # Host network (no bridge needed), docker format (keeps HEALTHCHECK), the host's CA bundle for pip.
  args+=(--network host --format docker)
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    args+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
  fi
  wheels="${WHEELHOUSE:-${PIP_FIND_LINKS:-}}"
  if [ -z "$wheels" ]; then  # the host's pip configuration, as pip on the host would use it
    wheels=$(sed -n 's/^[[:space:]]*find-links[[:space:]]*=[[:space:]]*//p' /etc/pip.conf "$HOME/.config/pip/pip.conf" \
      "$HOME/.pip/pip.conf" 2>/dev/null | head -n1 || true)
  fi
  if [ -n "$wheels" ] && [ -d "$wheels" ]; then args+=(-v "$wheels:/run/wheels:ro"); fi
fi
build() {  # target tag dockerfile
  local started=$SECONDS
  local ignore=()  # docker finds <Dockerfile>.dockerignore itself; podman is told
  if [ "$engine" = podman ]; then ignore=(--ignorefile "$3.dockerignore"); fi
  "$engine" build -q "${args[@]}" "${ignore[@]}" -f "$3" --target "$1" -t "$2" . >/dev/null
  echo "built $2 in $((SECONDS - started)) s"
}
started=$SECONDS
build node dicom-ai-node:latest docker/Dockerfile
build inference "dicom-ai-inference:$variant" docker/Dockerfile
build redis dicom-ai-redis:latest docker/Dockerfile.services
build postgres dicom-ai-postgres:latest docker/Dockerfile.services
echo "all images built in $((SECONDS - started)) s with $engine:"
for image in dicom-ai-node:latest "dicom-ai-inference:$variant" dicom-ai-redis:latest dicom-ai-postgres:latest; do
  size=$("$engine" image inspect --format '{{.Size}}' "$image")
  printf '  %-28s %6d MB\n' "$image" $((size / 1000000))
done
