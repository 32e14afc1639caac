#!/usr/bin/env bash
# Installs redis-server (and redis-cli) from Debian when missing: the fleet
# tests, scripts/test-rls.sh and scripts/demo-fleet.sh start their own.
set -euo pipefail
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "== installing redis-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
