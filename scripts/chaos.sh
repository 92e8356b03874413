#!/usr/bin/env bash
# The fault and hostile-input suite: real nats-server and jobico binaries on loopback, processes
# killed by PID only. Prints one table and `chaos: <N> scenarios, <L> lost, <D> duplicated,
# <C> crashes`; exits 0 only when all are 0. `--short` (the default; what CI runs) or `--full`.
# Extra arguments pass through (e.g. `--seed 42` to repeat a run).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/nats-server-env.sh
source scripts/nats-server-env.sh
# The test profile, like the rest of the suite: one build serves both.
cargo build --quiet --locked -p jobico -p jobico-apiserver -p jobico-dispatcher -p wasm-exec -p jobico-chaos
exec target/debug/jobico-chaos --jobico target/debug/jobico --repo . "${@:---short}"
