#!/usr/bin/env bash
# Quick start of libpagedvl on Debian/Ubuntu: install the build packages that
# are missing (as root, or through sudo), fetch jemalloc's source package
# (scripts/fetch-jemalloc.sh; it is compiled into the library), configure
# (CUDA when nvcc exists), build, and run examples/batched_decode, which picks
# the GPU itself when the CUDA backend is built and a device is usable, else
# the CPU.
#
#   scripts/quickstart.sh [batched_decode flags...]     from any directory
#
# Build directory: build/ (BUILD_DIR=... to change it).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
BUILD_DIR=${BUILD_DIR:-build}

packages=(cmake build-essential pkg-config libcriterion-dev)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
      grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
else
  echo "quickstart: no dpkg here; make sure these are installed:" \
    "${packages[*]}" >&2
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "quickstart: missing packages: ${missing[*]}" >&2
    echo "quickstart: run as root, or install them, then run this again" >&2
    exit 1
  fi
  echo "quickstart: installing ${missing[*]}"
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Once: later runs find the verified tarball in third_party/jemalloc/.
scripts/fetch-jemalloc.sh >/dev/null

jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B "$BUILD_DIR" -DPVL_CUDA=AUTO
cmake --build "$BUILD_DIR" -j"$jobs"
echo
"$BUILD_DIR/batched_decode" "$@"
