#!/usr/bin/env bash
# The sample event ev1 (the seed's `make ex1`): its schema and module ConfigMaps and the Job
# resource declaring it, from samples/ev1.yaml, into namespace default; waits until the
# dispatcher reports the resource Ready.
set -euo pipefail
cd "$(dirname "$0")/.."
kubectl apply -n default -f samples/ev1.yaml
kubectl -n default wait --for=condition=Ready jobs.jobico.coeux.dev/job-for-ev1 --timeout=120s
echo "ev1 is ready: scripts/send.sh ev1 '{\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}'"
