#!/usr/bin/env bash
# Builds only the executor: the static wasm-exec binary and its FROM-scratch image.
# scripts/build-images.sh builds all three images (wasm-exec, apiserver, dispatcher).
#
#   scripts/build-exec-image.sh [IMAGE]      (default IMAGE: jobico/wasm-exec:dev)
#
# An IMAGE other than the default is tagged from jobico/wasm-exec:dev (which is rebuilt too).
# Set SKIP_DOCKER=1 to build only the binary (scripts/bench-wasm-exec.sh does).
set -euo pipefail

image="${1:-jobico/wasm-exec:dev}"
root="$(cd "$(dirname "$0")/.." && pwd)"

IMAGE_PREFIX=jobico "$root/scripts/build-images.sh" dev wasm-exec

if [[ "${SKIP_DOCKER:-0}" != 1 && "$image" != "jobico/wasm-exec:dev" ]]; then
    docker tag jobico/wasm-exec:dev "$image"
    echo "image: $image"
fi
