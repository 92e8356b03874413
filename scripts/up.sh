#!/usr/bin/env bash
# Local mode with the samples: builds jobico if needed and runs `jobico up` (flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --locked -p jobico -- up "$@"
