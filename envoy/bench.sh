#!/usr/bin/env bash
# tenantgate's benchmark in real Envoy. One run takes about 5 minutes (15 with the calibration configs).
#
#   envoy/bench.sh
#   BENCH_ROUNDS=5 BENCH_DURATION=15 envoy/bench.sh
#
# Configurations (all answer the same GET with a direct_response):
#   (a) no filter, (b) native RBAC + local_ratelimit, (c) a no-op proxy-wasm
#   filter (envoy/noop-filter: the Wasm boundary alone), (d) tenantgate with the
#   bundle of policies/, (e) tenantgate with a generated bundle of 1,000
#   tenants and 10,000 policies (envoy/gen_large_policies.py), (f) tenantgate
#   without limits, (g) tenantgate with a per_request fleet limit checked with
#   tenantgate-rls and Redis (on wrk's CPU), (n) a no-op dynamic module
#   (envoy/noop-native: the native floor), (m) tenantgate's native build
#   (dist/libtenantgate.so) with the bundle of (d), (h) and (o) tenantgate
#   Wasm and native with a fleet limit in mode assigned (tenantgate-rls over
#   RLQS, Redis).
# Envoy (1 worker) is pinned to CPU 0 and wrk (from Debian) to CPU 1 with
# taskset; at least 3 interleaved rounds; medians reported. The last line of
# output is one JSON object: baseline_rps, native_rps, wasm_floor_rps,
# tenantgate_rps, tenantgate_large_rps and the p50/p99 latency (ms) of each.
# Details and environment knobs: envoy/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(nproc)" -lt 2 ]; then
  echo "bench.sh: needs 2 CPUs (Envoy on one, wrk on the other)" >&2
  exit 1
fi
if [ "${BENCH_ROUNDS:-3}" -lt 3 ]; then
  echo "bench.sh: note: fewer than 3 rounds (BENCH_ROUNDS=${BENCH_ROUNDS})" >&2
fi

log() { echo "bench.sh: $*" >&2; }
log "installing Envoy and wrk if missing"
scripts/install-envoy.sh --bench
log "building tenantgate.wasm, the no-op filter and the CLI"
scripts/build-wasm.sh >&2
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
cargo build -q --manifest-path envoy/noop-filter/Cargo.toml --target wasm32-wasip1 --release \
  --target-dir target/noop-filter
cargo build -q --manifest-path envoy/noop-native/Cargo.toml --release --target-dir target/noop-native
scripts/build-native.sh >&2
cargo build -q -p tenantgate-cli
cargo build -q --release -p tenantgate-rls
scripts/install-redis.sh
export TENANTGATE_CLI="$PWD/target/debug/tenantgate"
export NOOP_NATIVE="$PWD/target/noop-native/release/libtenantgate_noop.so"
export NOOP_WASM="$PWD/target/noop-filter/wasm32-wasip1/release/tenantgate_noop_filter.wasm"
exec python3 envoy/bench.py
