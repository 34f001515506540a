#!/usr/bin/env bash
# Builds the gateway container image with podman from a static binary
# compiled on this machine (no base image is pulled):
#
#   1. cargo build of a static (glibc, +crt-static) gateway binary into a
#      separate target dir (target/static), so it never fights the normal build;
#   2. stages it, stripped of debug info and symbols, in target/static/image/ (with the
#      empty data and config folders of the image);
#   3. podman build -f docker/Dockerfile --build-arg BINARIES=prebuilt:
#      the same Dockerfile a Docker host builds from source.
#
# Usage: docker/build-image.sh [--tag NAME:TAG] [--demo]
#   --tag   image name (default: localhost/twin-gateway:<version>)
#   --demo  also build the plc-sim and twinctl images of the compose demo
#           (tags localhost/twin-plc-sim:<version>, localhost/twin-twinctl:<version>)
# Prints the image id on the last line of stdout. Installs podman and runc
# with apt when missing (as root or through sudo) and fails if it cannot.
#
# Podman runs with --runtime runc --cgroup-manager cgroupfs (set PODMAN to
# override), which also works in containers and sandboxes without systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="localhost/twin-gateway:${version}"
demo=false
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --demo) demo=true; shift ;;
    *) echo "usage: $0 [--tag NAME:TAG] [--demo]" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
  echo "== installing podman and runc (apt)" >&2
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >&2
fi
command -v podman >/dev/null 2>&1 || { echo "error: podman is not installed and could not be installed" >&2; exit 1; }
command -v runc >/dev/null 2>&1 || { echo "error: runc is not installed and could not be installed" >&2; exit 1; }
read -r -a podman <<< "${PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"

target=x86_64-unknown-linux-gnu
bins=(gateway)
packages=(-p gateway)
if $demo; then
  bins+=(twinctl plc-sim)
  packages+=(-p twinctl -p twin-testkit)
fi
bin_args=()
for b in "${bins[@]}"; do bin_args+=(--bin "$b"); done

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  revision="${revision}-dirty"
fi

echo "== static build (${bins[*]}) in target/static" >&2
# The commit goes into the binary (inventory, `gateway sbom`).
TWIN_BUILD_COMMIT="$revision" RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target "$target" --target-dir target/static \
  "${packages[@]}" "${bin_args[@]}" >&2

stage=target/static/image
rm -rf "$stage"
mkdir -p "$stage/skel-gateway/data" "$stage/skel-root/config"
chmod 0755 "$stage" "$stage/skel-gateway" "$stage/skel-root" "$stage/skel-root/config"
chmod 0700 "$stage/skel-gateway/data"
# All symbols go (the unstripped binaries stay in target/static for
# debugging a crash report); the image stays within its 25 MB budget.
for b in "${bins[@]}"; do
  strip --strip-all -o "$stage/$b" "target/static/$target/release/$b"
done

source_url=$(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml | head -1)

build() { # target tag
  "${podman[@]}" build --format docker \
    -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
    --build-arg BINARIES=prebuilt --build-arg PREBUILT_DIR="$stage" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg SOURCE="$source_url" \
    --target "$1" -t "$2" . >&2
}

echo "== podman build $tag" >&2
build gateway "$tag"
if $demo; then
  build plc-sim "localhost/twin-plc-sim:${version}"
  build twinctl "localhost/twin-twinctl:${version}"
fi
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "== image $tag: $((size / 1000)) kB ($(awk "BEGIN{printf \"%.1f\", $size/1e6}") MB)" >&2
"${podman[@]}" image inspect --format '{{.Id}}' "$tag"
