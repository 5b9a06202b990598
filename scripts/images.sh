#!/usr/bin/env bash
# Build or push the stage images (make images / images-local / push-images / test-images).
#
#   scripts/images.sh build [KIND...]   # KIND: cpu, train (default both)
#   scripts/images.sh push  [KIND...]   # push :IMAGE_TAG and :GIT_SHA of what was built
#   scripts/images.sh base              # the local Debian base image only (LOCAL=1 builds it)
#
# Names and tags come from pipelines/images.env (IMAGE_REGISTRY, IMAGE_TAG), the setting the
# compiler and CI read; the environment may override both. Each image gets two tags,
# <IMAGE_REGISTRY>/hsissl-<kind>:<IMAGE_TAG> and :<GIT_SHA>.
#
# Environment:
#   BUILDER           docker, podman or buildah (default: the first that works here; docker
#                     only with a reachable daemon)
#   GIT_SHA           default: git rev-parse HEAD
#   BASE_IMAGE, REQUIREMENTS_IMAGE, TORCH_INDEX_URL
#                     passed as build arguments when set (the Dockerfiles' defaults are the
#                     upstream, digest-pinned ones CI uses)
#   LOCAL=1           for a machine that reaches no container registry (buildah or podman):
#                     base = Debian bookworm made here with mmdebstrap (python3, venv, CA
#                     certificates; cached in IMAGES_CACHE), TORCH_INDEX_URL empty (pip's own
#                     index), and this machine's pip configuration passed into the build
#                     (scripts/host_pip.py). The image layers cache between builds.
#   IMAGES_CACHE      where the rootfs tarball lies (default .images/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."

setting() {  # KEY from the environment, else from pipelines/images.env
  local key=$1 value
  value=$(sed -n "s/^$key=//p" pipelines/images.env)
  [ -n "$value" ] || { echo "pipelines/images.env: no $key=" >&2; exit 2; }
  echo "${!key:-$value}"
}
IMAGE_REGISTRY=$(setting IMAGE_REGISTRY)
IMAGE_TAG=$(setting IMAGE_TAG)
GIT_SHA=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOCAL=${LOCAL:-}
IMAGES_CACHE=${IMAGES_CACHE:-.images}
LOCAL_BASE=localhost/hsissl-base:bookworm

pick_builder() {
  if [ -n "${BUILDER:-}" ]; then echo "$BUILDER"; return; fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
  for b in podman buildah; do
    if command -v "$b" >/dev/null; then echo "$b"; return; fi
  done
  echo "scripts/images.sh: needs docker (with a running daemon), podman or buildah on PATH" >&2
  exit 1
}
BUILDER=$(pick_builder)

# How each builder takes a build: docker format (OCI drops the Dockerfiles' SHELL), buildah's
# chroot isolation (no daemon, no user namespaces), --layers (a rebuild redoes only what changed).
build_cmd() {
  case "$BUILDER" in
    docker) echo "docker build" ;;
    podman) echo "podman build --format docker --layers" ;;
    buildah) echo "buildah bud --isolation chroot --format docker --layers" ;;
    *) echo "BUILDER=$BUILDER: expected docker, podman or buildah" >&2; exit 2 ;;
  esac
}

local_base() {
  command -v mmdebstrap >/dev/null || {
    echo "LOCAL=1 needs mmdebstrap (apt-get install mmdebstrap buildah)" >&2; exit 1; }
  local tar="$IMAGES_CACHE/rootfs-bookworm.tar"
  mkdir -p "$IMAGES_CACHE"
  if [ ! -s "$tar" ]; then
    echo "== mmdebstrap bookworm -> $tar"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$tar.partial"
    mv "$tar.partial" "$tar"
  fi
  # buildah has no import verb: FROM scratch + ADD unpacks the tarball as the only layer
  printf 'FROM scratch\nADD rootfs-bookworm.tar /\nCMD ["/bin/bash"]\n' > "$IMAGES_CACHE/base.Dockerfile"
  $(build_cmd) -f "$IMAGES_CACHE/base.Dockerfile" -t "$LOCAL_BASE" "$IMAGES_CACHE"
}

build() {
  local args=(--build-arg "GIT_SHA=$GIT_SHA")
  if [ "$BUILDER" != docker ]; then
    # buildah's layer cache ignores a changed ARG in ENV/LABEL (containers/buildah#5501): a new
    # commit would keep the previous build's revision. Set both on the final image instead.
    args+=(--env "HSISSL_GIT_SHA=$GIT_SHA" --label "org.opencontainers.image.revision=$GIT_SHA")
  fi
  for arg in BASE_IMAGE REQUIREMENTS_IMAGE TORCH_INDEX_URL; do
    if [ -n "${!arg+set}" ]; then args+=(--build-arg "$arg=${!arg}"); fi
  done
  if [ -n "$LOCAL" ]; then
    [ "$BUILDER" != docker ] || { echo "LOCAL=1 needs buildah or podman (build volumes)" >&2; exit 1; }
    local_base
    args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}"
           --build-arg "REQUIREMENTS_IMAGE=${REQUIREMENTS_IMAGE:-$LOCAL_BASE}"
           --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
    HOSTPIP=$(mktemp -d)
    trap 'rm -rf "$HOSTPIP"' EXIT
    mapfile -t -O "${#args[@]}" args < <(python3 scripts/host_pip.py "$HOSTPIP")
  fi
  for kind in "$@"; do
    local name="$IMAGE_REGISTRY/hsissl-$kind" start=$SECONDS
    echo "== $BUILDER: $name:$IMAGE_TAG and :$GIT_SHA"
    $(build_cmd) -f "images/$kind.Dockerfile" "${args[@]}" \
      -t "$name:$IMAGE_TAG" -t "$name:$GIT_SHA" .
    echo "== built $name:$IMAGE_TAG in $((SECONDS - start)) s"
  done
}

push() {
  for kind in "$@"; do
    for tag in "$IMAGE_TAG" "$GIT_SHA"; do
      "$BUILDER" push "$IMAGE_REGISTRY/hsissl-$kind:$tag"
    done
  done
}

verb=${1:-}
shift || true
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(cpu train)
for kind in "${kinds[@]}"; do
  [ -f "images/$kind.Dockerfile" ] || { echo "no images/$kind.Dockerfile (kinds: cpu, train)" >&2; exit 2; }
done
case "$verb" in
  build) build "${kinds[@]}" ;;
  push) push "${kinds[@]}" ;;
  base) local_base ;;
  *) sed -n '2,6p' "$0" >&2; exit 2 ;;
esac
