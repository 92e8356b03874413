#!/usr/bin/env bash
# Deletes the kind cluster scripts/kind-up.sh made (name: $JOBICO_KIND_CLUSTER, default jobico).
set -euo pipefail
cluster="${JOBICO_KIND_CLUSTER:-jobico}"
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    kind delete cluster --name "$cluster"
else
    echo "kind-down: no kind cluster named $cluster"
fi
