#!/usr/bin/env bash
# Builds the static wasm-exec binary and the FROM-scratch executor image.
#
#   scripts/build-exec-image.sh [IMAGE]      (default IMAGE: jobico/wasm-exec:dev)
#
# The binary is linked statically against glibc (`+crt-static`, no musl target needed) so the
# image holds nothing else. Set SKIP_DOCKER=1 to build only the binary.
set -euo pipefail

image="${1:-jobico/wasm-exec:dev}"
target=x86_64-unknown-linux-gnu
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked -p wasm-exec --target "$target"

binary="target/$target/release/wasm-exec"
if ldd "$binary" 2>&1 | grep -q "=>"; then
    echo "error: $binary is dynamically linked" >&2
    exit 1
fi
echo "binary: $binary ($(stat -c %s "$binary") bytes)"

if [[ "${SKIP_DOCKER:-0}" == 1 ]]; then
    exit 0
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/wasm-exec"
# The release profile keeps symbols (strip = "debuginfo"); the image does not need them.
if command -v strip > /dev/null; then
    strip "$context/wasm-exec"
fi
echo "image binary: $(stat -c %s "$context/wasm-exec") bytes"
docker build --file wasm-exec/Dockerfile --tag "$image" "$context"
echo "image: $image"
