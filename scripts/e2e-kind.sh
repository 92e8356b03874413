#!/usr/bin/env bash
# End to end on kind (opt-in: needs docker, kind and kubectl, so CI does not run it): the
# user's day from a clone, asserted at each step.
#   scripts/kind-up.sh → scripts/ex1.sh → scripts/send.sh ev1 → the Job completes →
#   `kubectl logs -l event=ev1` shows the echoed event → GET /events/default/<id> says
#   succeeded.
# JOBICO_E2E_KEEP=1 keeps the cluster afterwards (else scripts/kind-down.sh runs at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "e2e-kind: FAILED: $*" >&2; exit 1; }
cleanup() { [ "${JOBICO_E2E_KEEP:-}" = 1 ] || scripts/kind-down.sh; }
trap cleanup EXIT

scripts/kind-up.sh
scripts/ex1.sh

marker="e2e-$(date +%s)"
answer=$(scripts/send.sh ev1 "{\"firstName\":\"Ada\",\"lastName\":\"$marker\"}") || fail "send: $answer"
id=$(printf '%s' "$answer" | sed -n 's/.*"ids":\["\([^"]*\)".*/\1/p')
[ -n "$id" ] || fail "no id in the answer: $answer"
echo "e2e-kind: sent event $id"

# The Job completes (one Job per event with the default batch settings).
deadline=$((SECONDS + 180))
until kubectl -n default get jobs -l event=ev1 \
        -o jsonpath='{range .items[*]}{.metadata.annotations.jobico\.coeux\.dev/event-ids}={.status.succeeded}{"\n"}{end}' \
        | grep -q "$id=1"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "no completed Job holds $id: $(kubectl -n default get jobs -l event=ev1 2>&1)"
    sleep 2
done
echo "e2e-kind: its Job completed"

# The module's output, tagged with the event id.
logs=$(kubectl -n default logs -l event=ev1 --tail=-1 --prefix=false)
printf '%s\n' "$logs" | grep -q "^$id stdout .*$marker" || fail "kubectl logs -l event=ev1 lacks the echoed event:\n$logs"
echo "e2e-kind: kubectl logs -l event=ev1 shows the echoed event"

# The recorded outcome.
token=$(kubectl -n default create token jobico-client --audience jobico.coeux.dev --duration 10m)
state=""
deadline=$((SECONDS + 60))
until printf '%s' "$state" | grep -q '"state":"succeeded"'; do
    [ "$SECONDS" -lt "$deadline" ] || fail "GET /events/default/$id: $state"
    state=$(curl -sS -H "Authorization: Bearer $token" "${JOBICO_INGRESS:-http://localhost:8080}/events/default/$id")
    sleep 1
done
echo "e2e-kind: GET /events/default/$id says succeeded"
echo "e2e-kind: passed"
