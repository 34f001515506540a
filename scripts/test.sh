#!/usr/bin/env bash
# Runs the whole test suite, provisioning what it needs first:
#   - Mosquitto (Debian package `mosquitto`), installed with apt when missing;
#   - podman and runc (Debian packages), for the container test;
#   - the Python peers (pymodbus, PyJWT, cryptography, asyncua) in ./.venv.
# A test whose component is missing fails; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
  echo "== installing podman and runc (apt), for the container test"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null
fi

req=tests/py/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== preparing the Python peers in .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
export TWIN_PYTHON="$PWD/.venv/bin/python"

# The static build behind the container image is the heaviest step: do it
# first, so the container test only reuses it instead of competing for the
# CPU with the timing-sensitive end-to-end tests.
echo "== container image (static build)"
docker/build-image.sh > /dev/null

echo "== cargo test (workspace)"
cargo test --workspace --all-targets -- --test-threads=2
