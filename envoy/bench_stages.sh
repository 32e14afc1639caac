#!/usr/bin/env bash
# Where tenantgate's time per request goes in real Envoy: measuring builds of
# the filter that stop each request after one stage and let it through
# (`early`: before any work; `map`: headers read and mapped; `decide`: policy
# and quota decided, nothing counted or sent), benchmarked in interleaved
# rounds beside the floor (c) and the whole filter (d). The JSON line gives
# `stage_<name>_us_over_floor` and `tenantgate_us_over_floor`.
#
#   envoy/bench_stages.sh                     # 5 rounds of 5 s
#   BENCH_ROUNDS=3 envoy/bench_stages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/bench-stages
mkdir -p "$dir"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
for stage in early map decide; do
  echo "bench_stages.sh: building the \`$stage\` measuring build" >&2
  TENANTGATE_BENCH_STAGE=$stage cargo build -q -p tenantgate-filter --target wasm32-wasip1 --release \
    --target-dir "$dir/build"
  cp "$dir/build/wasm32-wasip1/release/tenantgate_filter.wasm" "$dir/tenantgate-$stage.wasm"
done
BENCH_STAGE_DIR="$PWD/$dir" BENCH_ONLY="${BENCH_ONLY:-c,s_early,s_map,s_decide,d}" \
  BENCH_ROUNDS="${BENCH_ROUNDS:-5}" BENCH_DURATION="${BENCH_DURATION:-5}" BENCH_WARMUP="${BENCH_WARMUP:-1}" \
  BENCH_CALIBRATE="${BENCH_CALIBRATE:-0}" exec envoy/bench.sh
