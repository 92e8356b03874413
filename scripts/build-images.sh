#!/usr/bin/env bash
# Builds Jobico's three static binaries in one release build and a FROM-scratch image for each.
#
#   scripts/build-images.sh [TAG] [COMPONENT...]
#
#   TAG         image tag (default: dev). Avoid `latest`: Kubernetes always pulls `:latest`,
#               which fails for images loaded with `kind load docker-image`.
#   COMPONENT   wasm-exec, apiserver, dispatcher (default: all three)
#
# Images (what deploy/ references with TAG=dev):
#   jobico/wasm-exec:TAG    binary wasm-exec            wasm-exec/Dockerfile
#   jobico/apiserver:TAG    binary jobico-apiserver     apiserver/Dockerfile
#   jobico/dispatcher:TAG   binary jobico-dispatcher    dispatcher/Dockerfile
#
# Environment: IMAGE_PREFIX (default: jobico) replaces `jobico/`; SKIP_DOCKER=1 builds only the
# binaries (target/x86_64-unknown-linux-gnu/release/).
#
# The binaries are linked statically against glibc (`+crt-static`, no musl target needed), so
# each image holds one file. Each image is built from a temporary context holding only its
# stripped binary: nothing is pulled and no other file can leak into an image.
set -euo pipefail

tag="${1:-dev}"
shift || true
components=("$@")
if [[ ${#components[@]} -eq 0 ]]; then
    components=(wasm-exec apiserver dispatcher)
fi
prefix="${IMAGE_PREFIX:-jobico}"
target=x86_64-unknown-linux-gnu
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# component -> "cargo package:binary name"
declare -A crate_bin=(
    [wasm-exec]="wasm-exec:wasm-exec"
    [apiserver]="jobico-apiserver:jobico-apiserver"
    [dispatcher]="jobico-dispatcher:jobico-dispatcher"
)

packages=()
for component in "${components[@]}"; do
    if [[ -z "${crate_bin[$component]:-}" ]]; then
        echo "error: unknown component '$component' (wasm-exec, apiserver, dispatcher)" >&2
        exit 2
    fi
    packages+=(-p "${crate_bin[$component]%%:*}")
done

# One cargo invocation: the shared dependencies are compiled once for all the binaries.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" "${packages[@]}"

for component in "${components[@]}"; do
    binary="target/$target/release/${crate_bin[$component]#*:}"
    if ldd "$binary" 2>&1 | grep -q "=>"; then
        echo "error: $binary is dynamically linked" >&2
        exit 1
    fi
    echo "binary: $binary ($(stat -c %s "$binary") bytes)"
done

if [[ "${SKIP_DOCKER:-0}" == 1 ]]; then
    exit 0
fi

contexts="$(mktemp -d)"
trap 'rm -rf "$contexts"' EXIT
built=()
for component in "${components[@]}"; do
    name="${crate_bin[$component]#*:}"
    context="$contexts/$component"
    mkdir "$context"
    cp "target/$target/release/$name" "$context/$name"
    # The release profile keeps symbols (strip = "debuginfo"); the images do not need them.
    if command -v strip > /dev/null; then
        strip "$context/$name"
    else
        echo "warning: no strip on PATH; $name keeps its symbols" >&2
    fi
    image="$prefix/$component:$tag"
    echo "image binary: $name $(stat -c %s "$context/$name") bytes"
    docker build --file "$component/Dockerfile" --tag "$image" "$context"
    built+=("$image")
done

echo
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "${built[@]/#/--filter=reference=}" \
    2> /dev/null || true
printf 'built: %s\n' "${built[@]}"
