#!/usr/bin/env bash
# Rebuilds the sample modules from their WAT sources and refreshes the module ConfigMaps in the
# sample manifests. A test (cli/tests/samples.rs) fails when these are out of step.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p jobico
for pair in echo:ev1 logecho:ev2 printenv:ev3 order:chain echo:chain echo:sink; do
  module=${pair%%:*} manifest=${pair##*:}
  target/debug/jobico wat2wasm "samples/$module.wat" -o "samples/$module.wasm"
  b64=$(base64 -w0 "samples/$module.wasm")
  sed -i "s|^\(  $module\.wasm: \).*|\1$b64|" "samples/$manifest.yaml"
  echo "samples/$module.wasm ($(stat -c %s "samples/$module.wasm") bytes) -> samples/$manifest.yaml"
done
