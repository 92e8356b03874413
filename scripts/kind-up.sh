#!/usr/bin/env bash
# The kind quick start, from a clone to a cluster serving events:
#   1. create the kind cluster from kind/cluster.yaml (name: $JOBICO_KIND_CLUSTER, default jobico)
#   2. build the three images (scripts/build-images.sh dev) and load them on the nodes
#   3. apply the CRD, the NATS passwords (scripts/nats-credentials.sh), deploy/ and the tenant
#      policy of namespace default, and a client ServiceAccount default/jobico-client bound
#      to the jobico-client ClusterRole (what scripts/send.sh and `jobico send` use)
#   4. wait until NATS, the ingress and the dispatcher are ready, and say how to reach them
# Needs docker, kind and kubectl. Safe to re-run: existing objects are kept or updated.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${JOBICO_KIND_CLUSTER:-jobico}"

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "kind-up: $1 is required: $2" >&2
        exit 1
    fi
}
need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"

step() { printf '\n== %s\n' "$*"; }

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    step "kind cluster $cluster exists, kept"
else
    step "creating kind cluster $cluster"
    kind create cluster --name "$cluster" --config kind/cluster.yaml
fi
kubectl config use-context "kind-$cluster" >/dev/null

step "building the images (release build; the first one takes a while)"
scripts/build-images.sh dev
for image in jobico/wasm-exec:dev jobico/apiserver:dev jobico/dispatcher:dev; do
    kind load docker-image --name "$cluster" "$image"
done

step "installing Jobico"
kubectl apply -f crds/job.yaml
kubectl wait --for condition=established crd/jobs.jobico.coeux.dev --timeout=60s
kubectl apply -f deploy/namespace.yaml
scripts/nats-credentials.sh
kubectl apply -k deploy/
kubectl apply -n default -f deploy/tenant/
kubectl -n default create serviceaccount jobico-client --dry-run=client -o yaml | kubectl apply -f -
kubectl -n default create rolebinding jobico-client --clusterrole=jobico-client \
    --serviceaccount=default:jobico-client --dry-run=client -o yaml | kubectl apply -f -

step "waiting for NATS, the ingress and the dispatcher"
kubectl -n jobico-system rollout status statefulset/nats --timeout=300s
kubectl -n jobico-system rollout status deployment/jobico-apiserver --timeout=300s
kubectl -n jobico-system rollout status deployment/jobico-dispatcher --timeout=300s

cat <<DONE

Jobico is up on kind cluster $cluster (kubectl context kind-$cluster).
  ingress:  http://localhost:8080 (the node port 30080, mapped by kind/cluster.yaml)
  next:     scripts/ex1.sh                       # the sample event ev1 with its module
            scripts/send.sh ev1 '{"firstName":"Ada","lastName":"Lovelace"}'
            kubectl get jobs; kubectl logs -l event=ev1
  remove:   scripts/kind-down.sh
DONE
