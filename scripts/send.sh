#!/usr/bin/env bash
# Sends one event to the cluster's ingress with a token obtained for you (like JobicoK8S's
# hacks/test.sh): a 10-minute token of ServiceAccount default/jobico-client (made by
# scripts/kind-up.sh) for audience jobico.coeux.dev, then PUT /execute/default/EVENT.
#   scripts/send.sh EVENT [JSON]        JSON defaults to {}
# Environment: JOBICO_INGRESS (default http://localhost:8080), JOBICO_NAMESPACE (default
# default), JOBICO_SERVICE_ACCOUNT (default jobico-client). Prints the ingress's answer
# ({"ids":[...]}); exits non-zero unless it is 202. `jobico send` does the same in Rust.
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
event="$1"
data="${2:-{\}}"
ingress="${JOBICO_INGRESS:-http://localhost:8080}"
namespace="${JOBICO_NAMESPACE:-default}"
account="${JOBICO_SERVICE_ACCOUNT:-jobico-client}"
token=$(kubectl -n "$namespace" create token "$account" --audience jobico.coeux.dev --duration 10m)
answer=$(mktemp)
trap 'rm -f "$answer"' EXIT
status=$(curl -sS -o "$answer" -w '%{http_code}' -X PUT \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    --data-binary "$data" "$ingress/execute/$namespace/$event")
cat "$answer"
echo
[ "$status" = 202 ] || { echo "send: HTTP $status" >&2; exit 1; }
