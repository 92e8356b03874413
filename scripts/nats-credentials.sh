#!/usr/bin/env bash
# Creates the NATS passwords of Jobico's components as Kubernetes Secrets, before the first
# `kubectl apply -k deploy/`:
#
#   jobico-nats-apiserver   key `password`: NATS user jobico-apiserver (the ingress)
#   jobico-nats-dispatcher  key `password`: NATS user jobico-dispatcher
#   jobico-nats-routes      key `password`: the route user NATS servers of one cluster join
#                           each other with (deploy/production/; unused by a single server)
#   jobico-results-key      key `key`: what the dispatcher signs results tokens with and the
#                           ingress checks them with (chaining: executors of events with
#                           `then` routes post their outcomes to the ingress); both mount it
#
# NATS reads both from its environment (deploy/nats.yaml); each component mounts only its own.
# Each password is 40 random letters and digits from /dev/urandom (~238 bits), starting with a
# letter, so nats-server's configuration parser takes it as a string, never as a number.
#
#   scripts/nats-credentials.sh [--namespace NS]   create the Secrets that do not exist yet
#                                                  (existing ones are kept: safe to re-run)
#   scripts/nats-credentials.sh --rotate           replace them with new passwords, then run
#       kubectl -n jobico-system rollout restart statefulset/nats deployment/jobico-apiserver deployment/jobico-dispatcher
#   scripts/nats-credentials.sh --stdout           print the Secrets as YAML, apply nothing
#                                                  (for GitOps: encrypt them, e.g. sealed-secrets)
#
# Nothing here is committed: every cluster gets passwords of its own.
set -euo pipefail

namespace=jobico-system
mode=create
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace="$2"; shift 2 ;;
        --rotate) mode=rotate; shift ;;
        --stdout) mode=stdout; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

password() {
    # Finite reads (no SIGPIPE under pipefail); 4096 bytes give ~1000 candidates for 40.
    local letters alnum
    letters=$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z')
    alnum=$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
    if [ "${#letters}" -lt 1 ] || [ "${#alnum}" -lt 39 ]; then
        echo "not enough random bytes from /dev/urandom" >&2
        exit 1
    fi
    printf '%s%s' "${letters:0:1}" "${alnum:0:39}"
}

secret() {
    local name="$1" user="$2"
    if [ "$user" = "-" ]; then
        cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: $name
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: jobico
  annotations:
    jobico.coeux.dev/purpose: results-token-key
type: Opaque
stringData:
  key: $(password)
YAML
        return
    fi
    cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: $name
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: jobico
  annotations:
    jobico.coeux.dev/nats-user: $user
type: Opaque
stringData:
  password: $(password)
YAML
}

first=1
for pair in jobico-nats-apiserver:jobico-apiserver jobico-nats-dispatcher:jobico-dispatcher jobico-nats-routes:jobico-route jobico-results-key:-; do
    name="${pair%%:*}"
    user="${pair#*:}"
    case "$mode" in
        stdout)
            [ "$first" = 1 ] || echo "---"
            first=0
            secret "$name" "$user"
            ;;
        create)
            if kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
                echo "secret $namespace/$name exists, kept (--rotate replaces it)"
            else
                secret "$name" "$user" | kubectl create -f - >/dev/null
                echo "secret $namespace/$name created"
            fi
            ;;
        rotate)
            secret "$name" "$user" | kubectl apply -f - >/dev/null
            if [ "$user" = "-" ]; then
                echo "secret $namespace/$name replaced: restart jobico-apiserver and jobico-dispatcher"
            else
                echo "secret $namespace/$name replaced: restart NATS and $user"
            fi
            ;;
    esac
done
