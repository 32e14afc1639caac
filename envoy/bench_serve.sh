#!/usr/bin/env bash
# Decisions per second and p50/p99 of `tenantgate serve` over HTTP and over
# ext_authz through Envoy, beside the filter's (envoy/bench_serve.py). About
# 30 seconds after the builds; not part of scripts/test.sh.
#
#   envoy/bench_serve.sh
#   BENCH_DURATION=10 BENCH_ONLY=http,ext_authz envoy/bench_serve.sh
#
# The last line of output is one JSON object: rps, p50_ms, p99_ms per config.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(nproc)" -lt 2 ]; then
  echo "bench_serve.sh: needs 2 CPUs (Envoy and the service on one, wrk on the other)" >&2
  exit 1
fi
log() { echo "bench_serve.sh: $*" >&2; }
log "installing Envoy and wrk if missing"
scripts/install-envoy.sh --bench
log "building tenantgate.wasm and the CLI (release)"
scripts/build-wasm.sh >&2
cargo build -q --release -p tenantgate-cli
target="${CARGO_TARGET_DIR:-$PWD/target}"
export TENANTGATE_CLI="$target/release/tenantgate"
exec python3 envoy/bench_serve.py
